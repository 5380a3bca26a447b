"""Typed results of every section, and the run's JSON (`bench.json`), rewritten after each section.

Numbers are in milliseconds (latencies), tokens per second, and seconds (wall times); every field is
plain data so `dataclasses.asdict` gives the JSON.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .stats import LatencyStats

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class StreamRun:
    """One measured run of `streams` concurrent streams of `tokens_per_stream` tokens each."""
    label: str                 # e.g. "greedy", "temperature 1"
    streams: int
    tokens_per_stream: int     # tokens every stream produced (checked equal across streams)
    total_tokens: int
    itl: LatencyStats
    tokens_per_s: float        # all streams together, steady window (stats.steady_tokens_per_s)
    wall_s: float              # first submission to the last stream's end
    ttft: LatencyStats | None = None   # request sent -> first token (HTTP and baselines)


@dataclass(frozen=True)
class StepTraffic:
    """What one decode step of a run moves, against the step time (bench/bandwidth.py)."""
    rows: int                  # state rows the step advances (the graph bucket on CUDA)
    bytes_per_step: int        # weights read once + each row's state read and written
    gb_per_s: float            # bytes_per_step / ITL p50
    share_of_copy: float       # gb_per_s / the device's measured copy bandwidth


@dataclass(frozen=True)
class BackboneRuns:
    """The engine's runs on one backbone implementation (backbone/__init__.py IMPLS)."""
    backbone: str
    runs: list[StreamRun]
    traffic: list[StepTraffic]   # one per run


@dataclass(frozen=True)
class EngineResult:
    engine_config: dict[str, Any]
    copy_gb_per_s: float             # device-to-device copy, bytes read + written per second
    backbones: list[BackboneRuns]    # the run's backbone (every section's) first, then the compared ones

    @property
    def runs(self) -> list[StreamRun]:
        """The runs of the run's own backbone."""
        return self.backbones[0].runs


@dataclass(frozen=True)
class BaselineResult:
    backend: str               # "mamba_ssm" | "transformers"
    status: Status
    reason: str | None         # why skipped, or the error when failed
    weights: str               # where the weights came from
    notes: str
    runs: list[StreamRun] = field(default_factory=list)


@dataclass(frozen=True)
class BaselinesResult:
    backends: list[BaselineResult]

    def skip_reason(self) -> str | None:
        """Why the whole section measured nothing, when every backend was skipped."""
        if self.backends and all(b.status == "skipped" for b in self.backends):
            return "; ".join(f"{b.backend}: {b.reason}" for b in self.backends)
        return None


@dataclass(frozen=True)
class DeliberationRow:
    planner_mode: str
    sessions: int
    off: StreamRun
    on: StreamRun
    p50_ratio: float           # on / off, same engine, back to back
    p99_ratio: float
    state_steps: int           # sum over sessions of the done events' deliberation["state_steps"]
    state_steps_per_s: float   # state_steps / the "on" run's wall time
    rows_stepped_per_s: float  # rows the planner runtime stepped during the "on" run, finished plans or not
    plans_launched: int        # snapshots handed to a planner
    plans_finished: int        # launched, minus those cut short by their session's end or failed
    injections: dict[str, int]  # by outcome, summed over sessions
    counters: dict[str, int]   # every deliberation counter, summed over sessions
    landing_ratio: float | None  # applied (on time or caught up) over the results that were not vetoed


@dataclass(frozen=True)
class PlanAlone:
    """Batched plans of `roots` sessions run by the planner worker with nothing else on the device."""
    roots: int
    plans: int
    latency: LatencyStats       # per batched plan
    state_steps_per_plan: float # all roots together
    state_steps_per_s: float    # what the planner worker can do when it has the machine to itself


@dataclass(frozen=True)
class DeliberationResult:
    deliberation_config: dict[str, Any]
    tokens_per_session: int
    plans_alone: list[PlanAlone]
    rows: list[DeliberationRow]


@dataclass(frozen=True)
class LongPromptResult:
    streams: int
    prompt_tokens: int
    prefill_chunk: int
    window_ms: float           # the long request's submission -> its first token
    long_ttft_ms: float        # the same, as the long request's client saw it
    itl_before: LatencyStats   # the running streams' gaps before the submission (after warm-up)
    itl_during: LatencyStats   # their gaps overlapping the window
    p99_ratio: float           # itl_during.p99 / itl_before.p99


@dataclass(frozen=True)
class HttpDesign:
    """The server measured with the engine in its process ("one-process") or in its own ("engine-process")."""
    design: str
    server: dict[str, Any]     # its settings by their flat names
    runs: list[StreamRun]      # one per count of clients arriving together
    long_prompt: LongPromptResult


@dataclass(frozen=True)
class HttpResult:
    designs: list[HttpDesign]

    def design(self, name: str) -> HttpDesign | None:
        return next((d for d in self.designs if d.design == name), None)


@dataclass
class SectionOutcome:
    name: str
    status: Status
    elapsed_s: float
    error: str | None = None   # "ExceptionType: message" when failed
    reason: str | None = None  # when skipped
    result: Any = None         # the section's result dataclass when ok


@dataclass(frozen=True)
class TargetCheck:
    name: str
    goal: str                  # e.g. "<= 1.30 ms"
    measured: float | None     # None when the section did not produce the number
    unit: str
    met: bool | None           # None: not measured
    margin: str                # how far inside or outside the goal, in words


@dataclass
class BenchRun:
    meta: dict[str, Any]
    settings: dict[str, Any]
    sections: dict[str, SectionOutcome] = field(default_factory=dict)
    targets: list[TargetCheck] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)   # what the run wrote: "json", "markdown", "plot", "docs"

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "settings": self.settings,
                "sections": {name: dataclasses.asdict(o) for name, o in self.sections.items()},
                "targets": [dataclasses.asdict(t) for t in self.targets], "files": self.files}

    def write_json(self, path: Path) -> None:
        """Atomic, so a run killed mid-write keeps the previous section's file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
