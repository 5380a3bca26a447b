"""Load: 200 concurrent streaming clients for 30 s against `crsm serve` (a subprocess, as users start it)
on a tiny random model. The server has fewer slots and queue places than clients, so some requests get
429 by design; those clients wait Retry-After and try again. Everything else must succeed: every
accepted stream ends with `done` and exactly its max_tokens tokens. The server's resident memory may
not grow by 5% from the end of a warm-up to the end, and the live gauges return to 0 afterwards. A
stream that waited past the queue deadline (an `error` event `queue_timeout`) is overload too: its
client backs off and tries again."""
from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import time
from dataclasses import dataclass, field

import httpx
import pytest

from harness import GAUGES, ServeProcess, gauges, metrics, percentile, resident_kib, wait_for

CLIENTS = 200
WARMUP_S = 8.0
LOAD_S = 30.0
MAX_SESSIONS, QUEUE_SIZE = 64, 120      # 184 places for 200 clients: the streams beyond get 429
DELIBERATING_EVERY = 10                 # every 10th client asks for deliberation
MAX_RSS_GROWTH = 0.05


@dataclass
class LoadStats:
    ttft_s: list[float] = field(default_factory=list)         # client side: request sent -> first token
    headers_s: list[float] = field(default_factory=list)      # client side: request sent -> 200 and headers
    server_ttft_s: list[float] = field(default_factory=list)  # done.timings.ttft_s (submission -> token)
    completed: int = 0
    deliberated: int = 0
    tokens: int = 0
    injections: int = 0
    rejected: int = 0                                          # 429s
    timed_out: int = 0                                         # accepted, then no slot in time: queue_timeout
    open_streams: int = 0                                      # accepted and not finished, now
    peak_open_streams: int = 0
    errors: list[str] = field(default_factory=list)           # anything else that went wrong


async def one_stream(http: httpx.AsyncClient, body: dict, stats: LoadStats) -> float | None:
    """One request. Returns the seconds to wait before the next one (after a 429), else None."""
    sent = time.perf_counter()
    async with http.stream("POST", "/v1/generate", json=body) as r:
        headers = time.perf_counter()
        if r.status_code == 429:
            await r.aread()
            stats.rejected += 1
            return float(r.headers["retry-after"])
        if r.status_code != 200:
            stats.errors.append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
            return None
        stats.open_streams += 1
        stats.peak_open_streams = max(stats.peak_open_streams, stats.open_streams)
        try:
            final, tokens, first_token = await read_stream(r, stats)
        finally:
            stats.open_streams -= 1
    if final is not None and final[0] == "error" and final[1]["error"]["code"] == "queue_timeout":
        # overload, as a 429 is, found later (queue_timeout_s): back off and try again
        stats.timed_out += 1
        return 1.0
    if final is None or final[0] != "done":
        stats.errors.append(f"stream ended with {final!r}")
    elif final[1]["usage"]["completion_tokens"] != body["max_tokens"] or tokens != body["max_tokens"]:
        stats.errors.append(f"{tokens} token events, usage {final[1]['usage']}, asked {body['max_tokens']}")
    else:
        stats.completed += 1
        stats.tokens += tokens
        stats.deliberated += "deliberation" in body
        stats.ttft_s.append(first_token - sent)
        stats.headers_s.append(headers - sent)
        stats.server_ttft_s.append(final[1]["timings"]["ttft_s"])
    return None


async def read_stream(r: httpx.Response, stats: LoadStats) -> tuple[tuple[str, dict] | None, int, float | None]:
    """(final event, token events, time of the first) of one SSE answer."""
    final, tokens, first_token = None, 0, None
    # Whole messages cut from raw chunks, not lines: 200 clients parsing every SSE line cost the load
    # generator more CPU than the server spends. This server writes "event: NAME\ndata: JSON\n\n".
    pending = b""
    async for chunk in r.aiter_bytes():
        *messages, pending = (pending + chunk).split(b"\n\n")
        for message in messages:
            if message.startswith(b"event: token"):
                tokens += 1
                first_token = first_token or time.perf_counter()
            elif message.startswith(b"event: injection"):
                stats.injections += 1
            elif message.startswith((b"event: done", b"event: error")):
                name, _, data = message[len(b"event: "):].partition(b"\ndata: ")
                final = (name.decode(), json.loads(data))
    return final, tokens, first_token


async def client(url: str, index: int, until: float, stats: LoadStats, tls: ssl.SSLContext) -> None:
    """One user: its own httpx client and connection (a pool shared by 200 streams spends more CPU
    assigning requests to connections, O(connections x requests), than the server spends serving)."""
    rng = random.Random(index)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0, connect=10.0), verify=tls) as http:
        while time.monotonic() < until:
            body = {"prompt": f"client {index} says: " + "x" * rng.randint(0, 40),
                    "max_tokens": rng.randint(8, 32), "temperature": 0.8, "seed": rng.randrange(1 << 30),
                    "ignore_eos": True, "stream": True}
            if index % DELIBERATING_EVERY == 0:
                body["deliberation"] = {"enabled": True, "simulations": 4}
            try:
                retry_after = await one_stream(http, body, stats)
            except httpx.HTTPError as e:
                stats.errors.append(f"{type(e).__name__}: {e}")
                retry_after = None
            if retry_after is not None:
                # back off as told, with jitter so that the refused clients do not come back in one wave
                await asyncio.sleep(retry_after * rng.uniform(1.0, 1.5))


async def run_load(url: str, seconds: float) -> LoadStats:
    stats = LoadStats()
    # Plain http, but httpx builds a TLS context per client unless given one: 30 ms each, 6 s for 200.
    tls = ssl.create_default_context()
    until = time.monotonic() + seconds
    await asyncio.gather(*(client(url, i, until, stats, tls) for i in range(CLIENTS)))
    return stats


@pytest.fixture()
def server(model_dir, tmp_path):
    serve = ServeProcess(model_dir, tmp_path / "serve.log", "--max-sessions", str(MAX_SESSIONS), "--queue-size",
                         str(QUEUE_SIZE), "--max-new-tokens", "64", "--shutdown-drain-s", "1")
    try:
        yield serve.wait_ready()
    finally:
        serve.stop()


@pytest.mark.slow
def test_200_concurrent_streams_for_30_s(server, figures):
    load_average = os.getloadavg()[0]  # other work on the machine, for reading the figures
    warmup = asyncio.run(run_load(server.url, WARMUP_S))
    assert warmup.errors == [] and warmup.completed > 0
    rss_after_warmup = resident_kib(server.pid)
    before = metrics(server.url)

    started = time.monotonic()
    stats = asyncio.run(run_load(server.url, LOAD_S))
    elapsed = time.monotonic() - started

    assert stats.errors == [], stats.errors[:10]
    assert stats.rejected > 0, "the load never filled the queue: no 429 was exercised"
    assert stats.completed > 0 and stats.deliberated > 0
    # every accepted stream drained: nothing is left running, waiting or planning
    wait_for(lambda: all(v == 0 for v in gauges(server.url).values()), 15.0, what="gauges back to 0")
    assert set(gauges(server.url)) == set(GAUGES)
    rss_end = resident_kib(server.pid)
    growth = rss_end / rss_after_warmup - 1
    after = metrics(server.url)
    ok = (("endpoint", "/v1/generate"), ("status", "200"))
    busy = (("endpoint", "/v1/generate"), ("status", "429"))
    accepted = stats.completed + stats.timed_out
    assert after[("crsm_requests_total", ok)] - before[("crsm_requests_total", ok)] == accepted
    assert after[("crsm_requests_total", busy)] - before[("crsm_requests_total", busy)] == stats.rejected

    figures.record(
        "load", clients=CLIENTS, seconds=round(elapsed, 1), completed=stats.completed,
        deliberating=stats.deliberated, rejected_429=stats.rejected, queue_timeouts=stats.timed_out,
        errors=len(stats.errors),
        peak_open_streams=stats.peak_open_streams,
        tokens=stats.tokens, tokens_per_s=round(stats.tokens / elapsed), injections=stats.injections,
        ttft_p50_s=round(percentile(stats.ttft_s, 50), 3), ttft_p99_s=round(percentile(stats.ttft_s, 99), 3),
        headers_p99_s=round(percentile(stats.headers_s, 99), 3),
        server_ttft_p50_s=round(percentile(stats.server_ttft_s, 50), 3),
        server_ttft_p99_s=round(percentile(stats.server_ttft_s, 99), 3), load_average_before=load_average,
        rss_after_warmup_mib=round(rss_after_warmup / 1024, 1), rss_end_mib=round(rss_end / 1024, 1),
        rss_growth_pct=round(100 * growth, 2))
    assert growth < MAX_RSS_GROWTH, f"resident memory grew {100 * growth:.1f}% ({rss_after_warmup} -> {rss_end} KiB)"
