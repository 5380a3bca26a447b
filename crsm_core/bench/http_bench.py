"""Section "http": the real server on loopback, streamed by httpx clients in this process.

The server is handed in (`BenchServer`; crsm/bench_server.py starts the real one, `crsm serve` in a
process of its own, on the workload's model saved to a directory), since the core does not import the
server. It is measured in both designs (`HTTP_DESIGNS`): the engine in the server's process, and the engine
in a process of its own (`--engine-process`). The clients run on this process's event loop, so that
their own Python never holds the server's interpreter. Timestamps are the clients': the moment each SSE
`token` event is read.

Measured per design: time to first token and ITL with 1, 16 and 64 streaming clients arriving together;
then the long-prompt test: 16 streams running, a 4,096-token prompt submitted, and the 16 streams' gaps
during the window from its submission to its first token, against the same streams' gaps before it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import httpx

from .engine_bench import release_device_memory
from .settings import HTTP_DESIGNS
from .results import HttpDesign, HttpResult, LongPromptResult, StreamRun
from .stats import LatencyStats, gaps, pooled_gaps, steady_tokens_per_s, window_gaps
from .workload import Workload

log = logging.getLogger(__name__)

ENDLESS = 1_000_000          # max_tokens of streams that run until the client stops reading
PHASE_TIMEOUT_S = 600.0


class BenchServer(Protocol):
    """A server on 127.0.0.1 serving the workload's model, with max_new_tokens >= ENDLESS and room for
    the long prompt; `url` is set once `start` returns (ready)."""
    url: str

    def start(self) -> "BenchServer": ...

    def stop(self) -> None: ...

    def settings(self) -> dict[str, Any]:
        """Its settings by their flat names (`prefill_chunk`, `max_sessions`, ...), as the report records them."""


ServerFactory = Callable[[Workload, str], BenchServer]   # (workload, design)


@dataclass
class StreamRecord:
    """What one client saw: token timestamps (client clock) and the final event."""
    sent_at: float = 0.0
    token_times: list[float] = field(default_factory=list)
    done: dict | None = None


def body(prompt: tuple[int, ...], max_tokens: int) -> dict:
    return {"token_ids": list(prompt), "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0}


async def stream(client: httpx.AsyncClient, request: dict, record: StreamRecord,
                 stop: asyncio.Event | None = None) -> StreamRecord:
    """POST /v1/generate with stream: true and read its SSE events until `done` (or until `stop` is set:
    then the connection is closed, which cancels the session on the server)."""
    record.sent_at = time.perf_counter()
    async with client.stream("POST", "/v1/generate", json=request) as response:
        if response.status_code != 200:
            raise RuntimeError(f"/v1/generate answered {response.status_code}: {(await response.aread())[:500]!r}")
        event = "message"
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
            elif line.startswith("data:"):
                if event == "token":
                    record.token_times.append(time.perf_counter())
                    if stop is not None and stop.is_set():
                        return record
                elif event == "done":
                    record.done = json.loads(line[len("data:"):])
                elif event == "error":
                    raise RuntimeError(f"the server ended a stream with an error: {line}")
            elif line == "":
                event = "message"
    if stop is None and record.done is None:
        raise RuntimeError("a stream ended without its done event")
    return record


async def streaming_run(client: httpx.AsyncClient, workload: Workload, clients: int, salt: int) -> StreamRun:
    s = workload.settings
    records = [StreamRecord() for _ in range(clients)]
    start = time.perf_counter()
    await asyncio.gather(*(stream(client, body(p, s.tokens), r) for p, r in zip(workload.prompts(clients, salt=salt),
                                                                                 records)))
    wall = time.perf_counter() - start
    for r in records:
        completion = r.done["usage"]["completion_tokens"]
        if len(r.token_times) != s.tokens or completion != s.tokens:
            raise RuntimeError(f"a stream got {len(r.token_times)} token events (usage {completion}), "
                               f"expected {s.tokens}")
    times = [r.token_times for r in records]
    return StreamRun(label="http", streams=clients, tokens_per_stream=s.tokens, total_tokens=clients * s.tokens,
                     itl=LatencyStats.of(pooled_gaps(times, s.warmup_gaps)),
                     tokens_per_s=steady_tokens_per_s(times, s.warmup_gaps), wall_s=wall,
                     ttft=LatencyStats.of([r.token_times[0] - r.sent_at for r in records]))


async def _wait_until(predicate, what: str, timeout: float = PHASE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def long_prompt_run(client: httpx.AsyncClient, workload: Workload, prefill_chunk: int) -> LongPromptResult:
    """16 streams running; a long prompt arrives; the streams' gaps while it is prefilled."""
    s = workload.settings
    n, before_tokens = s.long_prompt_streams, s.warmup_gaps + max(s.tokens // 2, 3)
    records = [StreamRecord() for _ in range(n)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(stream(client, body(p, ENDLESS), r, stop))
             for p, r in zip(workload.prompts(n, salt=700), records)]
    long_record = StreamRecord()
    try:
        await _wait_until(lambda: all(len(r.token_times) >= before_tokens for r in records) or
                          any(t.done() for t in tasks), "the streams to run")
        for t in tasks:  # a stream that failed already: raise its error now
            if t.done():
                t.result()
        submitted = time.perf_counter()
        [long_prompt] = workload.prompts(1, length=s.long_prompt_tokens, salt=701)
        long_task = asyncio.create_task(stream(client, body(long_prompt, 2), long_record))
        await _wait_until(lambda: bool(long_record.token_times) or long_task.done(), "the long prompt's first token")
        if not long_record.token_times:
            long_task.result()
            raise RuntimeError("the long request ended without a token")
        first = long_record.token_times[0]
        # one more token per stream, so that the gap spanning the window's end is complete
        counts = [len(r.token_times) for r in records]
        await _wait_until(lambda: all(len(r.token_times) > c for r, c in zip(records, counts)),
                          "the streams after the window")
        await long_task
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    streams = [r.token_times for r in records]
    before = [g for times in streams for g in gaps([t for t in times if t <= submitted], s.warmup_gaps)]
    during = window_gaps(streams, submitted, first)
    itl_before, itl_during = LatencyStats.of(before), LatencyStats.of(during)
    return LongPromptResult(streams=n, prompt_tokens=s.long_prompt_tokens, prefill_chunk=prefill_chunk,
                            window_ms=(first - submitted) * 1e3, long_ttft_ms=(first - long_record.sent_at) * 1e3,
                            itl_before=itl_before, itl_during=itl_during,
                            p99_ratio=itl_during.p99_ms / itl_before.p99_ms)


async def _measure(workload: Workload, server: BenchServer, design: str) -> HttpDesign:
    s = workload.settings
    limits = httpx.Limits(max_connections=4 * s.max_sessions, max_keepalive_connections=4 * s.max_sessions)
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(PHASE_TIMEOUT_S), limits=limits) as client:
        log.info("http (%s): warm-up (short streams and one %d-token prompt)", design, s.long_prompt_tokens)
        [long_prompt] = workload.prompts(1, length=s.long_prompt_tokens, salt=800)
        await asyncio.gather(stream(client, body(long_prompt, 2), StreamRecord()),
                             *(stream(client, body(p, s.warmup_gaps + 4), StreamRecord())
                               for p in workload.prompts(max(s.http_clients), salt=801)))
        runs = []
        for salt, clients in enumerate(s.http_clients):
            run = await streaming_run(client, workload, clients, salt=810 + salt)
            log.info("http (%s): %d clients: TTFT p50 %.2f ms, ITL p50 %.3f ms, p99 %.3f ms, %.0f tokens/s", design,
                     clients, run.ttft.p50_ms, run.itl.p50_ms, run.itl.p99_ms, run.tokens_per_s)
            runs.append(run)
        settings = server.settings()
        long_prompt_result = await long_prompt_run(client, workload, settings["prefill_chunk"])
        log.info("http (%s): long prompt (%d tokens) under %d streams: ITL p99 %.3f ms before, %.3f ms during (x%.2f)",
                 design, s.long_prompt_tokens, s.long_prompt_streams, long_prompt_result.itl_before.p99_ms,
                 long_prompt_result.itl_during.p99_ms, long_prompt_result.p99_ratio)
    return HttpDesign(design=design, server=settings, runs=runs, long_prompt=long_prompt_result)


def http_section(workload: Workload, serve: ServerFactory) -> HttpResult:
    """Each design in turn, one server at a time (they would share the device)."""
    designs = []
    for design in HTTP_DESIGNS:
        server = serve(workload, design).start()
        try:
            designs.append(asyncio.run(_measure(workload, server, design)))
        finally:
            server.stop()
            release_device_memory()
    return HttpResult(designs=designs)
