"""Section "deliberation": what the planners cost the streams, and how much planning they do.

For each planner mode (`crsm_core.engine_config.PLANNER_MODES`) one engine is built around a CRSMModel
(the shared backbone, untrained dynamics and value heads); at 1 and 16 sessions the same workload
runs with planners off and then on, back to back on that engine, so the ratio compares like with like.
Planner throughput: state-steps (rows advanced by one token, fast-forward and expansions) summed over
the sessions' final counters, per second of the run's wall time. Plans cut short when a session ends
never report theirs, so this is a lower bound; beside it, the rows the engine's planner runtime really
stepped during the run (`PlannerRuntime.rows_stepped`), finished plans or not.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter

import torch

from ..engine import Engine
from ..engine_config import PLANNER_MODES
from ..injection import InjectionOutcome
from ..planner.runtime import PlanRequest, TokenLog
from ..streams import record_current
from .engine_bench import GREEDY, engine_config, release_device_memory, requests_for, run_sessions, stream_run, \
    warm_up
from .results import DeliberationResult, DeliberationRow, PlanAlone
from .stats import LatencyStats
from .workload import Workload

log = logging.getLogger(__name__)

OUTCOMES = tuple(o.value for o in InjectionOutcome)


PLANS_ALONE = 5


@torch.inference_mode()
def plan_alone(workload: Workload, model, roots: int, plans: int = PLANS_ALONE) -> PlanAlone:
    """Time `plans` batched plans of `roots` sessions (after one untimed, which also captures the
    search's graphs), handed to the model's planner worker as sessions hand theirs: the planner's own
    speed, before any contention with a generator. Each plans for the position of its snapshot."""
    runtime = model.runtime
    device = workload.backbone.device
    snapshots = []
    for prompt in workload.prompts(roots, salt=300):
        state = workload.backbone.allocate_state(1)
        logits = workload.backbone.prefill(torch.tensor([prompt], device=device), state)   # [1, V]
        snapshots.append((state, logits, prompt))

    def plan_all() -> tuple[float, float]:
        start = time.perf_counter()
        requests = [PlanRequest(i, model.config, state.clone(), logits.clone(), len(prompt), TokenLog(prompt),
                                GREEDY, 0, 0, 0, model.veto_threshold)
                    for i, (state, logits, prompt) in enumerate(snapshots)]
        for request in requests:
            request.ready = record_current(device)
        results = [future.result() for future in runtime.submit(requests)]
        return time.perf_counter() - start, sum(r.entry.planner_stats["state_steps"] for r in results)

    plan_all()
    timed = [plan_all() for _ in range(plans)]
    latencies = [t for t, _ in timed]
    steps = sum(s for _, s in timed) / plans
    return PlanAlone(roots=roots, plans=plans, latency=LatencyStats.of(latencies), state_steps_per_plan=steps,
                     state_steps_per_s=steps * plans / sum(latencies))


async def _deliberation_section(workload: Workload) -> DeliberationResult:
    s = workload.settings
    model = workload.crsm_model()
    rows: list[DeliberationRow] = []
    try:
        alone = []
        for roots in s.deliberation_concurrency:
            alone.append(plan_alone(workload, model, roots))
            log.info("deliberation: a plan of %d session(s) alone takes %.1f ms (p50) for %.0f state-steps: "
                     "%.0f state-steps/s", roots, alone[-1].latency.p50_ms, alone[-1].state_steps_per_plan,
                     alone[-1].state_steps_per_s)
        for mode in PLANNER_MODES:
            engine = Engine.for_model(model, engine_config(s, planner_mode=mode))
            engine.start()
            try:
                log.info("deliberation (%s): warm-up", mode)
                await warm_up(engine, workload, deliberation=model.config)
                for n in s.deliberation_concurrency:
                    salt = 100 + n
                    tokens = s.deliberation_tokens
                    off = await run_sessions(engine, requests_for(workload, n, tokens, GREEDY, salt=salt))
                    stepped = engine.planner_runtime.rows_stepped
                    on = await run_sessions(engine, requests_for(workload, n, tokens, GREEDY, salt=salt,
                                                                 deliberation=model.config))
                    rows.append(_row(mode, n, off, on, s.warmup_gaps, engine.planner_runtime.rows_stepped - stepped))
                    r = rows[-1]
                    log.info("deliberation (%s), %d sessions: ITL p50 x%.2f, p99 x%.2f, %.0f state-steps/s "
                             "(%.0f rows stepped/s), plans %d launched / %d finished, injections %s", mode, n,
                             r.p50_ratio, r.p99_ratio, r.state_steps_per_s, r.rows_stepped_per_s, r.plans_launched,
                             r.plans_finished, r.injections)
            finally:
                await engine.shutdown()
            del engine
            release_device_memory()
    finally:
        model.close()
    return DeliberationResult(deliberation_config=dataclasses.asdict(model.config),
                              tokens_per_session=s.deliberation_tokens, plans_alone=alone, rows=rows)


def _row(mode: str, n: int, off, on, warmup: int, stepped: int) -> DeliberationRow:
    off_run, on_run = stream_run("planners off", off, warmup), stream_run("planners on", on, warmup)
    counters: Counter[str] = Counter()
    for completion in on.completions:
        if completion.done.deliberation is None:
            raise RuntimeError("a deliberating session ended without deliberation counters")
        counters.update(completion.done.deliberation)
    return DeliberationRow(
        planner_mode=mode, sessions=n, off=off_run, on=on_run,
        p50_ratio=on_run.itl.p50_ms / off_run.itl.p50_ms, p99_ratio=on_run.itl.p99_ms / off_run.itl.p99_ms,
        state_steps=counters["state_steps"], state_steps_per_s=counters["state_steps"] / on.wall_s,
        rows_stepped_per_s=stepped / on.wall_s,
        plans_launched=counters["launched"],
        plans_finished=counters["launched"] - counters["cancelled"] - counters["failed"],
        injections={o: counters[o] for o in OUTCOMES}, counters=dict(sorted(counters.items())),
        landing_ratio=landing_ratio(counters))


def landing_ratio(counters: Counter[str]) -> float | None:
    """Applied (on time or caught up) over the plan results that were not vetoed."""
    judged = counters["produced"] - counters["vetoed"]
    return None if judged <= 0 else (counters["applied"] + counters["applied_late"]) / judged


def deliberation_section(workload: Workload) -> DeliberationResult:
    try:
        return asyncio.run(_deliberation_section(workload))
    finally:
        release_device_memory()
