"""The goals of issues 5, 15 and 17, checked against a run's results.

Each target names where its number comes from; a section that failed or was not run leaves its targets
"not measured" rather than missed. Engine numbers are those of the run's own backbone (the first of
`--backbones`); "vs mamba_ssm" divides them by mamba_ssm's generate in the same run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..engine_config import PLANNER_MODES
from .settings import HTTP_DESIGNS
from .results import BaselinesResult, BenchRun, DeliberationResult, EngineResult, HttpResult, StreamRun, TargetCheck

# Issue 17: planner state-steps/s of a 16-session plan alone at least twice those measured before it (9,227).
PLANS_ALONE_BEFORE = 9_227


@dataclass(frozen=True)
class Target:
    name: str
    unit: str
    limit: float
    at_most: bool              # True: measured <= limit; False: measured >= limit
    strict: bool = False       # "<" or ">" instead of "<=" or ">="

    @property
    def goal(self) -> str:
        op = ("<" if self.strict else "<=") if self.at_most else (">" if self.strict else ">=")
        if self.unit == "x":
            return f"{op} {self.limit:.2f}x"
        return f"{op} {self.limit:,g} {self.unit}"

    def check(self, measured: float | None) -> TargetCheck:
        if measured is None:
            return TargetCheck(self.name, self.goal, None, self.unit, None, "not measured")
        if self.at_most:
            met = measured < self.limit if self.strict else measured <= self.limit
        else:
            met = measured > self.limit if self.strict else measured >= self.limit
        # how far inside (met) or outside (missed) the goal, relative to the goal
        ratio = measured / self.limit if self.limit else float("nan")
        if self.at_most:
            margin = f"{(1 - ratio) * 100:.0f}% under" if met else f"{(ratio - 1) * 100:.0f}% over"
        else:
            margin = f"{(ratio - 1) * 100:.0f}% above" if met else f"{(1 - ratio) * 100:.0f}% short"
        return TargetCheck(self.name, self.goal, measured, self.unit, met, margin)


def _engine(run: BenchRun) -> EngineResult | None:
    outcome = run.sections.get("engine")
    return outcome.result if outcome is not None and outcome.status == "ok" else None


def _greedy(result: EngineResult | None, sessions: int):
    if result is None:
        return None
    return next((r for r in result.runs if r.streams == sessions and r.label == "greedy"), None)


def _mamba_ssm(run: BenchRun, batch: int) -> StreamRun | None:
    outcome = run.sections.get("baselines")
    if outcome is None or outcome.result is None:
        return None
    result: BaselinesResult = outcome.result
    backend = next((b for b in result.backends if b.backend == "mamba_ssm" and b.status == "ok"), None)
    return None if backend is None else next((r for r in backend.runs if r.streams == batch), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def evaluate_targets(run: BenchRun) -> list[TargetCheck]:
    checks: list[TargetCheck] = []
    engine = _engine(run)
    one = _greedy(engine, 1)
    one_ms = one and one.itl.p50_ms
    checks.append(Target("engine ITL p50, 1 session", "ms", 0.55, at_most=True).check(one_ms))
    mamba_one = _mamba_ssm(run, 1)
    checks.append(Target("engine ITL p50, 1 session, vs mamba_ssm generate", "x", 0.5, at_most=True)
                  .check(_ratio(one_ms, mamba_one and mamba_one.itl.p50_ms)))
    most = max(run.settings["concurrency"])
    full = _greedy(engine, most)
    full_rate = full and full.tokens_per_s
    checks.append(Target(f"engine throughput, {most} sessions", "tokens/s", 20_000, at_most=False).check(full_rate))
    mamba_full = _mamba_ssm(run, most)
    checks.append(Target(f"engine throughput, {most} sessions, vs mamba_ssm generate", "x", 1.5, at_most=False)
                  .check(_ratio(full_rate, mamba_full and mamba_full.tokens_per_s)))

    outcome = run.sections.get("deliberation")
    deliberation: DeliberationResult | None = outcome.result if outcome is not None and outcome.status == "ok" \
        else None
    largest = max(run.settings["deliberation_concurrency"])
    alone = None if deliberation is None else next((a for a in deliberation.plans_alone if a.roots == largest), None)
    checks.append(Target(f"plans alone, {largest} sessions: state-steps/s", "/s", 2 * PLANS_ALONE_BEFORE,
                         at_most=False).check(alone and alone.state_steps_per_s))
    for mode in PLANNER_MODES:
        row = None if deliberation is None else next(
            (r for r in deliberation.rows if r.planner_mode == mode and r.sessions == largest), None)
        where = f"planners ({mode}), {largest} sessions"
        get: Callable[[str], float | None] = lambda name: None if row is None else getattr(row, name)
        checks.append(Target(f"{where}: ITL p50 vs off", "x", 1.10, at_most=True).check(get("p50_ratio")))
        checks.append(Target(f"{where}: ITL p99 vs off", "x", 1.25, at_most=True).check(get("p99_ratio")))
        checks.append(Target(f"{where}: planner state-steps/s", "/s", 10_000, at_most=False)
                      .check(get("state_steps_per_s")))
        checks.append(Target(f"{where}: landing ratio", "", 0.90, at_most=False).check(get("landing_ratio")))

    checks += _http_targets(run, engine)
    return checks


def _http_targets(run: BenchRun, engine: EngineResult | None) -> list[TargetCheck]:
    """Issue 15's, per server design: HTTP against the engine of this run at the same concurrency."""
    outcome = run.sections.get("http")
    http: HttpResult | None = outcome.result if outcome is not None and outcome.status == "ok" else None
    long_tokens = run.settings["long_prompt_tokens"]
    checks = []
    for name in HTTP_DESIGNS:
        design = None if http is None else http.design(name)

        def clients(n: int) -> StreamRun | None:
            return None if design is None else next((r for r in design.runs if r.streams == n), None)

        for n in (16, 64):
            r, e = clients(n), _greedy(engine, n)
            checks.append(Target(f"HTTP ({name}), {n} clients: ITL p50 vs the engine", "x", 1.10, at_most=True)
                          .check(_ratio(r and r.itl.p50_ms, e and e.itl.p50_ms)))
            checks.append(Target(f"HTTP ({name}), {n} clients: ITL p99 vs the engine", "x", 1.5, at_most=True)
                          .check(_ratio(r and r.itl.p99_ms, e and e.itl.p99_ms)))
        for n, limit in ((16, 10.0), (64, 25.0)):
            r = clients(n)
            checks.append(Target(f"HTTP ({name}), {n} clients arriving together: first token p50", "ms", limit,
                                 at_most=True).check(r and r.ttft.p50_ms))
        r, e = clients(64), _greedy(engine, 64)
        checks.append(Target(f"HTTP ({name}), 64 clients: tokens/s vs the engine", "x", 0.90, at_most=False)
                      .check(_ratio(r and r.tokens_per_s, e and e.tokens_per_s)))
        checks.append(Target(f"HTTP ({name}): ITL p99 while a {long_tokens:,}-token prompt is admitted, vs without",
                             "x", 1.5, at_most=True).check(None if design is None else design.long_prompt.p99_ratio))
    return checks
