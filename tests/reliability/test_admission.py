"""Admission through the real server (uvicorn on 127.0.0.1): a request whose integers overflow a tensor
is refused with a 400 while concurrent streams finish as if nothing happened; a request for more
sessions than may ever be queued is a 400, not a retryable 429; a session that finds no slot within the
queue deadline ends with 503 and Retry-After (an `error` event when streamed)."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from harness import InProcessServer, aparse_sse, gauges, settings_for, wait_for

TOP_K_PAST_INT64 = 9223372036854775808   # 2**63: the repro of the outage (SamplingTable.set_row overflowed)


async def test_an_overflowing_top_k_is_refused_and_the_other_streams_finish(model_dir):
    server = InProcessServer(settings_for(model_dir)).start()
    try:
        n_streams, max_tokens = 8, 40
        first_token = [asyncio.Event() for _ in range(n_streams)]

        async def stream(http: httpx.AsyncClient, i: int) -> tuple[int, tuple[str, dict]]:
            count, final = 0, None
            body = {"prompt": f"concurrent stream {i}", "max_tokens": max_tokens, "seed": i, "ignore_eos": True,
                    "stream": True}
            if i % 2:   # planners that must all be closed at the end
                body["deliberation"] = {"enabled": True, "simulations": 4}
            async with http.stream("POST", "/v1/generate", json=body) as r:
                assert r.status_code == 200
                async for name, data in aparse_sse(r.aiter_lines()):
                    if name == "token":
                        count += 1
                        first_token[i].set()
                    else:
                        final = (name, json.loads(data))
            return count, final

        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as http:
            tasks = [asyncio.create_task(stream(http, i)) for i in range(n_streams)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_token)), 30)
            for stream_it in (True, False):
                bad = await http.post("/v1/generate", json={"prompt": "hello", "max_tokens": 5,
                                                            "top_k": TOP_K_PAST_INT64, "stream": stream_it,
                                                            "deliberation": {"enabled": True}})
                assert bad.status_code == 400, bad.text
                error = bad.json()["error"]
                assert error["param"] == "top_k" and error["type"] == "invalid_request_error", error
            results = await asyncio.gather(*tasks)
            for i, (count, (name, data)) in enumerate(results):
                assert name == "done" and data["finish_reason"] == "length", (i, name, data)
                assert count == data["usage"]["completion_tokens"] == max_tokens
            ok = await http.post("/v1/generate", json={"prompt": "hello", "max_tokens": 5, "top_k": 40})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        await asyncio.to_thread(wait_for, lambda: not any(gauges(server.url).values()), 10.0, 0.02, "gauges at 0")
    finally:
        await asyncio.to_thread(server.stop)   # prompt: stop() fails if the server thread outlives 30 s


def test_a_request_for_more_sessions_than_may_be_queued_is_a_400(model_dir):
    server = InProcessServer(settings_for(model_dir, queue_size=8, max_request_sessions=6)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as over_cap:        # 2 prompts x n 4 = 8 > 6
            client.completions.create(model="tiny", prompt=["one", "two"], n=4, max_tokens=2)
        assert over_cap.value.status_code == 400 and over_cap.value.body["param"] == "n"
        answer = client.completions.create(model="tiny", prompt=["one", "two"], n=3, max_tokens=2)
        assert len(answer.choices) == 6
    finally:
        server.stop()
    narrow = InProcessServer(settings_for(model_dir, queue_size=4, max_request_sessions=16)).start()
    try:
        client = openai.OpenAI(base_url=narrow.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as never_fits:      # 5 > the whole queue, empty as it is
            client.completions.create(model="tiny", prompt="one", n=5, max_tokens=2)
        assert "the queue holds 4" in never_fits.value.body["message"]
    finally:
        narrow.stop()


async def test_a_session_with_no_slot_within_the_queue_deadline_gets_503_with_retry_after(model_dir):
    server = InProcessServer(settings_for(model_dir, max_sessions=1, queue_timeout_s=0.3, retry_after_s=7,
                                          max_new_tokens=100_000)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            async with http.stream("POST", "/v1/generate", json={"prompt": "hold the only slot", "stream": True,
                                                                  "max_tokens": 100_000, "ignore_eos": True}) as held:
                lines = held.aiter_lines()
                while not (await anext(lines)).startswith("event: token"):
                    pass
                whole = await http.post("/v1/generate", json={"prompt": "no slot for me", "max_tokens": 4})
                assert whole.status_code == 503 and whole.headers["retry-after"] == "7", whole.text
                assert whole.json()["error"]["code"] == "queue_timeout"
                async with http.stream("POST", "/v1/generate", json={"prompt": "nor for me", "max_tokens": 4,
                                                                      "stream": True}) as r:
                    assert r.status_code == 200
                    events = [(name, json.loads(data)) async for name, data in aparse_sse(r.aiter_lines())]
                assert [name for name, _ in events] == ["error"]
                assert events[0][1]["error"]["code"] == "queue_timeout"
                # the session holding the slot streams on
                while not (await asyncio.wait_for(anext(lines), 30)).startswith("event: token"):
                    pass
        # the client closed the held stream: its slot comes free and the server serves again
        await asyncio.to_thread(wait_for, lambda: not any(gauges(server.url).values()), 10.0, 0.02, "gauges at 0")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            ok = await http.post("/v1/generate", json={"prompt": "on time", "max_tokens": 3, "ignore_eos": True})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    finally:
        await asyncio.to_thread(server.stop)
