"""Admission through the real server (uvicorn on 127.0.0.1): a request whose integers overflow a tensor
is refused with a 400 while concurrent streams finish as if nothing happened."""
from __future__ import annotations

import asyncio
import json

import httpx

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
                                                            "top_k": TOP_K_PAST_INT64, "stream": stream_it})
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
