"""One session's planner (System 2), running beside its generator (System 1) without blocking it.

The generator calls, at each position q (it holds S_q; token q not yet chosen):

    events, suggestion = deliberator.apply_due(q, state_row, tokens)   # blend what is due at q
    deliberator.observe(q, state_row, logits)                          # maybe start a plan from S_q
    ... choose token q (the suggestion, if enabled and ready), step ...

`observe` never waits: if the planner is idle it clones S_q and hands it to the session's asyncio
task, which submits it to the model's `PlannerRuntime` (one worker thread that batches the plans of
all sessions; planner/runtime.py) and awaits the result; if the planner is busy the position is
skipped. The plan fast-forwards S_q by `lag` greedy tokens (dynamics model or exact backbone),
searches from S_p (p = q + lag), gates the chosen child's state per layer, and the task puts the
entry into the session's `TargetBuffer`. Before handing the entry over, the worker fast-forwards it
(exact steps) through the tokens the generator produced meanwhile, so a late entry costs the
generator little.

Synchronous mode runs the plan inline in `observe` (no loop, no thread): deterministic, for tests.
The deliberator knows nothing of the loop that drives it, so the batched engine uses it as it is.
Threading: `observe` and `apply_due` are called from the generator's thread (any thread; one at a
time); in asynchronous mode the deliberator must be created on the event loop's thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .injection import (DEFAULT_MAX_TARGET_NORM_RATIO, InjectionEvent, InjectionOutcome, TargetBuffer, TargetEntry,
                        check_norm_ratio, default_layer_weights)
from .planner import PlannerConfig
from .planner.runtime import PlanCancelled, PlannerRuntime, PlanRequest
from .state import RecurrentState
from .streams import record_current

logger = logging.getLogger(__name__)

Mode = Literal["dynamics", "exact"]


DELIBERATION_FILE = "crsm.json"  # a model directory's deliberation defaults


def load_deliberation_config(directory: str | Path) -> "DeliberationConfig":
    """A model directory's deliberation defaults (crsm.json), or the built-in defaults without one."""
    path = Path(directory) / DELIBERATION_FILE
    if not path.exists():
        return DeliberationConfig()
    try:
        return DeliberationConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


@dataclass(frozen=True)
class DeliberationConfig:
    enabled: bool = True
    lag: int = 3                      # plan for position t + lag from a snapshot at t
    max_lag: int = 8                  # a later entry is pruned
    delta_decay: float = 0.9          # late entries: alpha * delta_decay ** lateness
    injection_rate: float = 0.05      # the seed's experimental sweet spot
    layer_weights: tuple[float, ...] | None = None   # None: 0 for the lower half, 1 for the upper
    veto_threshold: float = 1.0       # std over value heads above this vetoes the entry
    # a target whose ssm norm in a gated layer is above this multiple of the live state's is rejected
    max_target_norm_ratio: float = DEFAULT_MAX_TARGET_NORM_RATIO
    blend_conv: bool = False          # also blend the conv state
    fast_forward: Mode = "dynamics"   # how the snapshot is projected to the target position
    children: Mode = "dynamics"       # how the search expands children
    use_suggestions: bool = False     # the planned token replaces sampling when it is ready in time
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    synchronous: bool = False         # plan inline at observe time (deterministic test mode)

    def __post_init__(self) -> None:
        if self.lag < 1:
            raise ValueError(f"lag must be >= 1, got {self.lag}")
        if self.max_lag < 0:
            raise ValueError(f"max_lag must be >= 0, got {self.max_lag}")
        if not 0.0 <= self.delta_decay <= 1.0:
            raise ValueError(f"delta_decay must be in [0, 1], got {self.delta_decay}")
        if not 0.0 <= self.injection_rate <= 1.0:
            raise ValueError(f"injection_rate must be in [0, 1], got {self.injection_rate}")
        if self.veto_threshold < 0:
            raise ValueError(f"veto_threshold must be >= 0, got {self.veto_threshold}")
        check_norm_ratio(self.max_target_norm_ratio)
        for name in ("fast_forward", "children"):
            if getattr(self, name) not in ("dynamics", "exact"):
                raise ValueError(f"{name} must be 'dynamics' or 'exact', got {getattr(self, name)!r}")
        if self.layer_weights is not None and any(not 0.0 <= w <= 1.0 for w in self.layer_weights):
            raise ValueError("layer_weights must be in [0, 1]")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DeliberationConfig":
        """From JSON-shaped settings (a model's crsm.json, a training config); missing keys take the defaults."""
        values = dict(raw)
        planner = values.pop("planner", {})
        if not isinstance(planner, dict):
            raise ValueError("planner must be a mapping")
        if values.get("layer_weights") is not None:
            values["layer_weights"] = tuple(values["layer_weights"])
        try:
            return cls(planner=PlannerConfig(**planner), **values)
        except TypeError as e:  # unknown or missing fields
            raise ValueError(str(e)) from e

    def weights(self, n_layer: int) -> torch.Tensor:
        """[L] layer weights for a model of n_layer layers."""
        if self.layer_weights is None:
            return default_layer_weights(n_layer)
        if len(self.layer_weights) != n_layer:
            raise ValueError(f"layer_weights has {len(self.layer_weights)} entries for {n_layer} layers")
        return torch.tensor(self.layer_weights, dtype=torch.float32)

    def with_lag(self, lag: int) -> "DeliberationConfig":
        return replace(self, lag=lag)


@dataclass
class PlannerCounters:
    launched: int = 0     # plans started (snapshots taken)
    skipped: int = 0      # positions observed while the planner was busy
    cancelled: int = 0    # plans stopped by close() before producing a result
    failed: int = 0       # plans that raised (logged)
    simulations: int = 0  # MCTS simulations run by the plans that finished
    state_steps: int = 0  # rows advanced by one token (fast-forward and expansions) by those plans

    def as_dict(self) -> dict[str, int]:
        return {"launched": self.launched, "skipped": self.skipped, "cancelled": self.cancelled,
                "failed": self.failed, "simulations": self.simulations, "state_steps": self.state_steps}


class SessionDeliberator:
    """One session's side of deliberation: its target buffer, counters and planner task. The plans
    themselves are computed by the model's `PlannerRuntime`, batched with other sessions' plans."""

    def __init__(self, runtime: PlannerRuntime, config: DeliberationConfig, generation_id: int):
        self.runtime = runtime
        self.config = config
        self.generation_id = generation_id
        self.buffer = TargetBuffer(generation_id, max_lag=config.max_lag, delta_decay=config.delta_decay,
                                   blend_conv=config.blend_conv, max_target_norm_ratio=config.max_target_norm_ratio)
        self.planner_counters = PlannerCounters()
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._tokens: list[int] = []          # the session's tokens by position, for the worker's catch-up
        self._last_position = 0
        self._task: asyncio.Task | None = None
        self._loop = None if config.synchronous else asyncio.get_running_loop()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        return self._busy

    def counters(self) -> dict[str, int]:
        return {**self.buffer.counters.as_dict(), **self.planner_counters.as_dict()}

    # ---- what the runtime's worker calls ------------------------------------------------------

    def tokens_so_far(self) -> list[int]:
        with self._lock:
            return list(self._tokens)

    def record_plan(self, simulations: int, state_steps: float) -> None:
        with self._lock:
            self.planner_counters.simulations += simulations
            self.planner_counters.state_steps += round(state_steps)

    @torch.no_grad()
    def plan(self, snapshot: RecurrentState, position: int, logits: torch.Tensor) -> TargetEntry:
        """Plan inline from S_t (snapshot, 1 row, consumed) and the logits that came with it ([1, V],
        the distribution of token t); returns the entry for p = t + lag."""
        return self.runtime.plan_now([PlanRequest(self, snapshot, logits, position)])[0]

    # ---- the generator's side ------------------------------------------------------------------

    def observe(self, position: int, state_row: RecurrentState, logits: torch.Tensor) -> None:
        """After the generator reached S_position (1 row) with `logits` [1, V] (the distribution of
        token `position`): start a plan from a copy if the planner is idle. Never waits for it."""
        if self._closed or not self.config.enabled:
            return
        if self.config.synchronous:
            self.planner_counters.launched += 1
            self.buffer.put(self.plan(state_row.clone(), position, logits.detach().clone()))
            return
        with self._lock:
            if self._busy:
                self.planner_counters.skipped += 1
                return
            self._busy = True
            self.planner_counters.launched += 1
        # Copies on the generator's stream, then an event the planner's stream waits for.
        request = PlanRequest(self, state_row.clone(), logits.detach().clone(), position)
        request.ready = record_current(request.logits.device)
        self._loop.call_soon_threadsafe(self._launch, request)

    def apply_due(self, position: int, state_row: RecurrentState,
                  generated_tokens: list[int]) -> tuple[list[InjectionEvent], int | None]:
        """Before token `position` is chosen (state_row holds S_position, 1 row): apply what is due.
        generated_tokens[i] = token at position i, prompt included (at least `position` of them).
        Returns the events and, with use_suggestions, the planned token for this position if its
        entry was applied on time (else None)."""
        self._last_position = position
        with self._lock:
            self._tokens.extend(generated_tokens[len(self._tokens):position])
        with torch.no_grad():
            events = self.buffer.apply_due(position, state_row, generated_tokens, self.runtime.generator_step.step)
        suggestion = None
        if self.config.use_suggestions:
            on_time = [e for e in events if e.outcome is InjectionOutcome.APPLIED and e.target_position == position]
            suggestion = on_time[0].action if on_time else None
        return events, suggestion

    # ---- the task ------------------------------------------------------------------------------

    def _launch(self, request: PlanRequest) -> None:
        """Event loop thread: the session's planner task for this plan."""
        if self._closed:
            with self._lock:
                self._busy = False
            self.planner_counters.cancelled += 1
            return
        self._task = self._loop.create_task(self._run(request), name=f"crsm-planner-{self.generation_id}")

    async def _run(self, request: PlanRequest) -> None:
        try:
            [future] = self.runtime.submit([request])
            entry = await asyncio.wrap_future(future)
        except (PlanCancelled, asyncio.CancelledError, concurrent.futures.CancelledError):
            self.planner_counters.cancelled += 1
            if not request.future.done():
                request.future.cancel()
            if asyncio.current_task().cancelling():
                raise
            return
        except Exception:  # a planner bug must not kill the session; it is logged and counted
            logger.exception("planner failed (generation %s, position %d)", self.generation_id, request.position)
            self.planner_counters.failed += 1
            return
        finally:
            with self._lock:
                self._busy = False
        if self._closed:
            self.planner_counters.cancelled += 1
            return
        self.buffer.put(entry)

    async def close(self) -> list[InjectionEvent]:
        """Cancel the planner task and resolve what is left in the buffer (never reached: PRUNED).
        The runtime's worker drops a closed session's plan (and stops at its next step when every
        session of its batch has closed). Idempotent; returns the events of the resolution."""
        if self._closed:
            return []
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])
        return self.buffer.finish(self._last_position)
