"""The engine in a process of its own (`crsm serve --engine-process`, crsm_core/engine_core.py): a
cancellation crosses the process boundary and frees the slot within one step; a core that dies ends
every open stream with an error, /ready answers 503 until a new core runs, and a core that keeps dying
stops the server with a non-zero status. (That no token is lost or duplicated across the channel:
tests/test_server.py's `test_32_concurrent_streams_match_solo_runs[engine-process]`, and every other
test of that file in both designs.)"""
from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from crsm_core.engine import GenerationRequest, SamplingParams
from crsm_core.engine_config import EngineConfig
from crsm_core.engine_core import CoreSpec, EngineCoreClient
from crsm_core.tokenizer import ByteTokenizer
from harness import ServeProcess, aparse_sse, is_ready, wait_for
from server.runtime import MAX_RESTARTS

LONG = 1000   # tokens: a stream that outlives the test's actions (the server's max_new_tokens is 1024)


def core_pid(server_pid: int) -> int:
    """The engine core among the server's children (the other is multiprocessing's resource tracker)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    cores = [int(c) for c in children
             if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(cores) == 1, f"expected one engine core among {children}"
    return cores[0]


def long_stream(i: int) -> dict:
    return {"prompt": f"stream {i}", "max_tokens": LONG, "ignore_eos": True, "stream": True, "seed": i}


async def test_a_cancelled_session_leaves_the_core_within_one_step(model_dir):
    """Through the client itself (what the server's routes call): cancel a running session and the core
    ends it before its next decode step; the session waiting for that one slot then runs."""
    spec = CoreSpec(model_dir, "cpu", EngineConfig(max_sessions=1, queue_size=4), torch_threads=1)
    client = await EngineCoreClient(spec, ByteTokenizer()).start()
    try:
        assert client.pid != os.getpid()
        [running] = await client.open([GenerationRequest((1, 2, 3), LONG, SamplingParams(seed=1), ignore_eos=True)])
        [waiting] = await client.open([GenerationRequest((4, 5, 6), 3, SamplingParams(seed=2), ignore_eos=True)])
        events = running.stream()
        for _ in range(5):
            await anext(events)
        assert client.num_active == 1 and client.num_waiting == 1
        running.cancel()
        done = [e async for e in events][-1]
        assert done.finish_reason == "cancelled"
        assert done.steps_after_cancel is not None and done.steps_after_cancel <= 1
        completion = await asyncio.wait_for(waiting.collect(), 60)
        assert completion.done.finish_reason == "length" and len(completion.token_ids) == 3
    finally:
        await client.shutdown(1.0)
    assert not client.lost


@pytest.mark.slow
async def test_a_dead_core_ends_every_stream_and_a_new_one_serves(model_dir, tmp_path):
    server = ServeProcess(model_dir, tmp_path / "serve.log", "--engine-process", "--max-sessions", "8").wait_ready()
    try:
        first = core_pid(server.pid)
        streams: list[list[tuple[str, dict]]] = [[] for _ in range(4)]
        reading = [asyncio.Event() for _ in streams]

        async def read(i: int, http: httpx.AsyncClient) -> None:
            async with http.stream("POST", "/v1/generate", json=long_stream(i)) as r:
                assert r.status_code == 200, await r.aread()
                async for event, data in aparse_sse(r.aiter_lines()):
                    streams[i].append((event, json.loads(data)))
                    if len(streams[i]) == 3:
                        reading[i].set()

        async def crash() -> None:
            await asyncio.gather(*(e.wait() for e in reading))   # every stream has tokens
            os.kill(first, signal.SIGKILL)

        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            await asyncio.wait_for(asyncio.gather(crash(), *(read(i, http) for i in range(len(streams)))), 60)
        for events in streams:   # each got tokens, then exactly one final event: the error
            kinds = [e for e, _ in events]
            assert kinds[:3] == ["token"] * 3 and kinds[-1] == "error" and "done" not in kinds
            assert events[-1][1]["error"]["code"] == "internal_error"
        # not ready while the new core loads (a spawned interpreter imports torch: seconds), then ready
        ready = httpx.get(server.url + "/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "engine_restarting"
        wait_for(lambda: is_ready(server.url), 120, 0.1, "a new engine core")
        assert core_pid(server.pid) != first
        answer = httpx.post(server.url + "/v1/generate", json={"prompt": "again", "max_tokens": 4, "ignore_eos": True},
                            timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 4
        assert server.proc.poll() is None
    finally:
        server.stop()


@pytest.mark.slow
def test_a_core_that_keeps_dying_stops_the_server_non_zero(model_dir, tmp_path):
    server = ServeProcess(model_dir, tmp_path / "serve.log", "--engine-process").wait_ready()
    try:
        for _ in range(MAX_RESTARTS):
            os.kill(core_pid(server.pid), signal.SIGKILL)
            wait_for(lambda: not is_ready(server.url), 30, 0.05, "/ready 503 after the core died")
            wait_for(lambda: is_ready(server.url), 120, 0.1, "a new engine core")
        os.kill(core_pid(server.pid), signal.SIGKILL)   # one death more than the restarts allowed
        assert server.proc.wait(timeout=60) != 0
        assert "the engine core died" in server.output()
    finally:
        server.stop()
