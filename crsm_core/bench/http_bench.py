"""Section "http": the real server on loopback, streamed by clients in this process.

The server is handed in (`BenchServer`; crsm/bench_server.py starts the real one, `crsm serve` in a
process of its own, on the workload's model saved to a directory), since the core does not import the
server. It is measured in both designs (`HTTP_DESIGNS`): the engine in the server's process, and the engine
in a process of its own (`--engine-process`). The clients run on this process's event loop, so that
their own Python never holds the server's interpreter. They are a load generator's (sse_client.py): one
keep-alive connection per stream, opened and warmed before the clock starts, each request's bytes built
beforehand, so that what is measured is the server, not the client's connection set-up or its HTTP
library. Timestamps are the clients': a request's is taken as its bytes are written, a token's as the
chunk holding its SSE `token` event is read.

Measured per design: time to first token and ITL with 1, 16 and 64 streaming clients arriving together;
then the long-prompt test: 16 streams running, a 4,096-token prompt submitted, and the 16 streams' gaps
during the window from its submission to its first token, against the same streams' gaps before it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

from .engine_bench import release_device_memory
from .settings import HTTP_DESIGNS
from .results import HttpDesign, HttpResult, LongPromptResult, StreamRun
from .sse_client import ConnectionPool, SseConnection, StreamRecord, body
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


async def _streams(connections: list[SseConnection], requests: list[dict], records: list[StreamRecord]) -> None:
    """The requests, one per connection, all sent in one pass of the event loop (bytes built first)."""
    messages = [c.request_bytes(r) for c, r in zip(connections, requests)]
    await asyncio.wait_for(asyncio.gather(*(c.stream(m, r) for c, m, r in zip(connections, messages, records))),
                           PHASE_TIMEOUT_S)


async def streaming_run(pool: ConnectionPool, workload: Workload, clients: int, salt: int) -> StreamRun:
    s = workload.settings
    records = [StreamRecord() for _ in range(clients)]
    connections = await pool.take(clients)
    requests = [body(p, s.tokens) for p in workload.prompts(clients, salt=salt)]
    start = time.perf_counter()
    await _streams(connections, requests, records)
    wall = time.perf_counter() - start
    pool.give_back(connections)
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


async def long_prompt_run(pool: ConnectionPool, workload: Workload, prefill_chunk: int) -> LongPromptResult:
    """16 streams running; a long prompt arrives; the streams' gaps while it is prefilled."""
    s = workload.settings
    n, before_tokens = s.long_prompt_streams, s.warmup_gaps + max(s.tokens // 2, 3)
    records = [StreamRecord() for _ in range(n)]
    stop = asyncio.Event()
    *connections, long_connection = await pool.take(n + 1)
    [long_prompt] = workload.prompts(1, length=s.long_prompt_tokens, salt=701)
    long_request = long_connection.request_bytes(body(long_prompt, 2))
    tasks = [asyncio.create_task(c.stream(c.request_bytes(body(p, ENDLESS)), r, stop))
             for c, p, r in zip(connections, workload.prompts(n, salt=700), records)]
    long_record = StreamRecord()
    try:
        await _wait_until(lambda: all(len(r.token_times) >= before_tokens for r in records) or
                          any(t.done() for t in tasks), "the streams to run")
        for t in tasks:  # a stream that failed already: raise its error now
            if t.done():
                t.result()
        submitted = time.perf_counter()
        long_task = asyncio.create_task(long_connection.stream(long_request, long_record))
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
        pool.give_back([long_connection])   # the streams' connections were closed to stop them
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
    url = urlsplit(server.url)
    pool = ConnectionPool(url.hostname, url.port)
    try:
        # every connection a run takes is open and has carried a stream before the clock starts
        connections = await pool.take(max(max(s.http_clients), s.long_prompt_streams + 1))
        log.info("http (%s): warm-up (short streams on %d connections and one %d-token prompt)", design,
                 len(connections), s.long_prompt_tokens)
        [long_prompt] = workload.prompts(1, length=s.long_prompt_tokens, salt=800)
        warm = [body(long_prompt, 2)] + [body(p, s.warmup_gaps + 4)
                                         for p in workload.prompts(len(connections) - 1, salt=801)]
        await _streams(connections, warm, [StreamRecord() for _ in warm])
        pool.give_back(connections)
        runs = []
        for salt, clients in enumerate(s.http_clients):
            run = await streaming_run(pool, workload, clients, salt=810 + salt)
            log.info("http (%s): %d clients: TTFT p50 %.2f ms, ITL p50 %.3f ms, p99 %.3f ms, %.0f tokens/s", design,
                     clients, run.ttft.p50_ms, run.itl.p50_ms, run.itl.p99_ms, run.tokens_per_s)
            runs.append(run)
        settings = server.settings()
        long_prompt_result = await long_prompt_run(pool, workload, settings["prefill_chunk"])
        log.info("http (%s): long prompt (%d tokens) under %d streams: ITL p99 %.3f ms before, %.3f ms during (x%.2f)",
                 design, s.long_prompt_tokens, s.long_prompt_streams, long_prompt_result.itl_before.p99_ms,
                 long_prompt_result.itl_during.p99_ms, long_prompt_result.p99_ratio)
    finally:
        pool.close()
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
