"""Section "engine": the batched engine without HTTP, at 1, 16 and 64 concurrent sessions, on each of
`settings.backbones` in turn (same weights), with the bandwidth each step uses.

Each session streams `tokens` tokens after a short random prompt (ignore_eos, so every session runs to
its length). Greedy at each concurrency, sampled at the largest, and greedy with logprobs (5
alternatives a token) at the middle one, beside its run without. Token timestamps are the engine's own (`Session.token_times`, taken in the generator
thread when the token is chosen), so the numbers are the engine's, not the event loop's. Bandwidth:
bench/bandwidth.py, against a device-to-device copy measured at the start of the section.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import asdict, dataclass

import torch

from ..deliberation import DeliberationConfig
from ..engine import Completion, Engine, EngineConfig, GenerationRequest, Session
from ..sampling import SamplingParams
from ..backbone import MambaLM
from .bandwidth import copy_bandwidth_gbs, rows_stepped, step_bytes
from .results import BackboneRuns, EngineResult, StepTraffic, StreamRun
from .settings import BenchSettings
from .stats import LatencyStats, pooled_gaps, steady_tokens_per_s
from .workload import Workload

log = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0.0)
LOGPROBS = 5


@dataclass(frozen=True)
class MeasuredSessions:
    sessions: list[Session]
    completions: list[Completion]
    wall_s: float           # submission to the last final event


def engine_config(settings: BenchSettings, planner_mode: str = "stream") -> EngineConfig:
    # a workload's arrivals are submitted as one request
    return EngineConfig(max_sessions=settings.max_sessions, max_request_sessions=EngineConfig.queue_size,
                        max_new_tokens=max(settings.tokens, settings.deliberation_tokens, 1024),
                        max_prompt_tokens=max(4096, settings.long_prompt_tokens), planner_mode=planner_mode)


def requests_for(workload: Workload, n: int, tokens: int, sampling: SamplingParams, salt: int,
                 deliberation: DeliberationConfig | None = None, logprobs: int | None = None) -> list[GenerationRequest]:
    """n sessions of `tokens` tokens each; sampled sessions get seeds of their own (reproducible);
    `logprobs`: each token's logprob and that many alternatives."""
    requests = []
    for i, prompt in enumerate(workload.prompts(n, salt=salt)):
        params = sampling if sampling.greedy else SamplingParams(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            seed=workload.settings.seed + salt * 1000 + i)
        requests.append(GenerationRequest(prompt, tokens, params, ignore_eos=True, deliberation=deliberation,
                                          logprobs=logprobs))
    return requests


async def run_sessions(engine: Engine, requests: list[GenerationRequest]) -> MeasuredSessions:
    """Submit all at once (as one batch of arrivals) and wait for every final event. Raises when a
    session ends with an error or short of its max_tokens."""
    start = time.perf_counter()
    sessions = engine.submit_all(requests)
    completions = await asyncio.gather(*(s.collect() for s in sessions))
    wall = time.perf_counter() - start
    for session, done in zip(sessions, completions):
        if len(session.token_times) != session.request.max_tokens or done.done.finish_reason != "length":
            raise RuntimeError(f"session {session.id} ended with {done.done.finish_reason!r} after "
                               f"{len(session.token_times)} of {session.request.max_tokens} tokens")
    return MeasuredSessions(list(sessions), list(completions), wall)


def stream_run(label: str, measured: MeasuredSessions, warmup: int) -> StreamRun:
    streams = [s.token_times for s in measured.sessions]
    per_stream = {len(t) for t in streams}
    if len(per_stream) != 1:
        raise RuntimeError(f"sessions produced different token counts: {sorted(per_stream)}")
    return StreamRun(label=label, streams=len(streams), tokens_per_stream=per_stream.pop(),
                     total_tokens=sum(len(t) for t in streams), itl=LatencyStats.of(pooled_gaps(streams, warmup)),
                     tokens_per_s=steady_tokens_per_s(streams, warmup), wall_s=measured.wall_s)


async def warm_up(engine: Engine, workload: Workload, deliberation: DeliberationConfig | None = None) -> None:
    """A short run at the largest concurrency, greedy and sampled: prefill shapes autotuned, every graph
    bucket the measured runs pass through replayed once, sampling kernels loaded."""
    s = workload.settings
    n, tokens = max(s.concurrency), s.warmup_gaps + 4
    half = n // 2
    requests = requests_for(workload, n - half, tokens, GREEDY, salt=9000, deliberation=deliberation) + \
        requests_for(workload, half, tokens, SamplingParams(temperature=1.0), salt=9001, deliberation=deliberation)
    await run_sessions(engine, requests)
    await run_sessions(engine, requests_for(workload, 1, tokens, GREEDY, salt=9002, deliberation=deliberation))


def traffic(model: MambaLM, run: StreamRun, max_sessions: int, copy_gb_per_s: float) -> StepTraffic:
    rows = rows_stepped(run.streams, max_sessions, model.device)
    moved = step_bytes(model, rows)
    gb_per_s = moved / (run.itl.p50_ms / 1e3) / 1e9
    return StepTraffic(rows=rows, bytes_per_step=moved, gb_per_s=gb_per_s, share_of_copy=gb_per_s / copy_gb_per_s)


async def backbone_runs(workload: Workload, model: MambaLM, impl: str, copy_gb_per_s: float) -> BackboneRuns:
    s = workload.settings
    engine = Engine(model, workload.tokenizer, engine_config(s))  # on CUDA: captures the decode graphs
    engine.start()
    runs: list[StreamRun] = []
    try:
        log.info("engine (%s): warm-up", impl)
        await warm_up(engine, workload)
        # logprobs' cost: the same greedy sessions at the middle concurrency, with 5 alternatives a token
        middle = sorted(s.concurrency)[len(s.concurrency) // 2]
        plan = [(n, "greedy", GREEDY, None) for n in s.concurrency] + \
               [(max(s.concurrency), "temperature 1", SamplingParams(temperature=1.0), None),
                (middle, f"greedy, logprobs {LOGPROBS}", GREEDY, LOGPROBS)]
        for salt, (n, label, sampling, logprobs) in enumerate(plan):
            measured = await run_sessions(engine, requests_for(workload, n, s.tokens, sampling, salt=salt,
                                                               logprobs=logprobs))
            run = stream_run(label, measured, s.warmup_gaps)
            log.info("engine (%s): %d sessions, %s: ITL p50 %.3f ms, p99 %.3f ms, %.0f tokens/s", impl, n, label,
                     run.itl.p50_ms, run.itl.p99_ms, run.tokens_per_s)
            runs.append(run)
    finally:
        await engine.shutdown()
    return BackboneRuns(backbone=impl, runs=runs,
                        traffic=[traffic(model, r, s.max_sessions, copy_gb_per_s) for r in runs])


async def _engine_section(workload: Workload) -> EngineResult:
    s = workload.settings
    copy_gb_per_s = copy_bandwidth_gbs(torch.device(s.device))
    log.info("engine: device-to-device copy %.0f GB/s (read + written)", copy_gb_per_s)
    results = []
    for impl in s.backbones:
        model = workload.backbone_of(impl)
        results.append(await backbone_runs(workload, model, impl, copy_gb_per_s))
        del model
        release_device_memory()
    return EngineResult(engine_config=asdict(engine_config(s)), copy_gb_per_s=copy_gb_per_s, backbones=results)


def engine_section(workload: Workload) -> EngineResult:
    try:
        return asyncio.run(_engine_section(workload))
    finally:
        release_device_memory()


def release_device_memory() -> None:
    """Drop what a finished section's engine held (its state pool and graphs) before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
