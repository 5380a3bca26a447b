"""Faults, injected through the app factory's model loader (or, for SIGTERM, sent to `crsm serve`):

- value heads that raise in the middle of a search: the generation completes, the failure is counted,
  the failed plan injects nothing;
- a prefill that raises for one prompt: only that request gets an error, concurrent streams complete
  as if nothing happened, and the server serves afterwards;
- SIGTERM while many streams are open (running and queued): every stream gets a final event and the
  process exits 0.
"""
from __future__ import annotations

import asyncio
import json
import signal
import threading

import httpx
import pytest
import torch

from crsm_core.state import RecurrentState
from harness import (InProcessServer, ServeProcess, aparse_sse, gauges, metrics, settings_for, stream_generate,
                     wait_for)
from server.runtime import load_model
from server.settings import ServerSettings


# ---- a planner that raises mid-search -----------------------------------------------------------------

class RaisingVerifier:
    """A verifier (a plan's value function) that raises in the middle of the search of its plan number
    `fail_at` (its value function's second call: the first expansion round, after the roots), once."""

    def __init__(self, fail_at: int = 1):
        self.fail_at, self.plans, self.calls, self.raised = fail_at, 0, 0, 0
        self._lock = threading.Lock()  # the planner's thread calls it

    def __call__(self, contexts):
        with self._lock:
            self.plans += 1
            plan = self.plans
        evaluations = 0

        def value(states: RecurrentState, roots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            nonlocal evaluations
            evaluations += 1
            with self._lock:
                self.calls += 1
                fail = plan == self.fail_at and evaluations == 2 and not self.raised
                self.raised += fail
            if fail:
                raise RuntimeError(f"the verifier failed on purpose in plan {plan}")
            return torch.full((states.batch, 1), 0.5)
        return value


def test_a_planner_failing_mid_search_leaves_its_generation_complete(model_dir, figures):
    installed: list[RaisingVerifier] = []

    def loader(settings: ServerSettings):
        model = load_model(settings)
        # A search evaluates its roots (call 1), then each round's new leaves: call 2 is the first plan's
        # first expansion round, in the middle of its search.
        model.verifiers["flaky"] = verifier = RaisingVerifier()
        installed.append(verifier)
        return model

    server = InProcessServer(settings_for(model_dir), loader).start()
    try:
        before = metrics(server.url)
        prompt, max_tokens = "plan ahead, then fail", 64
        events = stream_generate(server.url, {"prompt": prompt, "max_tokens": max_tokens, "seed": 5,
                                              "ignore_eos": True,
                                              "deliberation": {"enabled": True, "simulations": 4,
                                                               "verifier": "flaky"}})
        [heads] = installed
        assert heads.raised == 1 and heads.calls > 2, "the fault did not fire as planned"

        name, done = events[-1]
        assert name == "done" and done["finish_reason"] == "length"
        tokens = [d for e, d in events if e == "token"]
        injections = [d for e, d in events if e == "injection"]
        assert len(tokens) == done["usage"]["completion_tokens"] == max_tokens
        counters = done["deliberation"]
        assert counters["failed"] == 1
        assert counters["launched"] == counters["produced"] + counters["failed"] + counters["cancelled"]
        assert counters["produced"] >= 1, "no plan after the failed one finished: planning did not recover"
        # every entry that was produced is streamed; the failed plan (the first, from the first position,
        # the prompt's length) produced none
        assert len(injections) == counters["produced"]
        first_position = len(prompt.encode())
        assert all(e["captured_position"] != first_position for e in injections)

        after = metrics(server.url)
        errors = ("crsm_planner_errors_total", ())
        assert after[errors] - before[errors] == 1
        figures.record("planner_fault", verifier_calls=heads.calls, plans_launched=counters["launched"],
                       plans_failed=counters["failed"], plans_produced=counters["produced"],
                       injections=len(injections))
    finally:
        server.stop()


# ---- a prefill that raises for one prompt -------------------------------------------------------------

POISON = "this prompt breaks the prefill"


def poisoned_prefill_loader(settings: ServerSettings):
    model = load_model(settings)
    poison = model.tokenizer.encode(POISON)
    prefill = model.backbone.prefill

    def prefill_or_fail(ids: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        # ids: [B, n], a piece of each of B prompts; a batch holding the poisoned prompt's first piece fails
        if any(row == poison[:len(row)] for row in ids.tolist()):
            raise RuntimeError("prefill failed on purpose")
        return prefill(ids, state)

    model.backbone.prefill = prefill_or_fail  # the engine prefills through the backbone
    return model


@pytest.mark.slow
async def test_a_failing_prefill_ends_only_its_request(model_dir, figures):
    server = InProcessServer(settings_for(model_dir), poisoned_prefill_loader).start()
    try:
        await check_prefill_failure_is_isolated(server.url, figures)
    finally:
        await asyncio.to_thread(server.stop)


async def check_prefill_failure_is_isolated(url: str, figures) -> None:
    n_streams, max_tokens = 8, 120
    bodies = [{"prompt": f"concurrent stream {i}", "max_tokens": max_tokens, "seed": 40 + i, "ignore_eos": True,
               "temperature": 0.9} for i in range(n_streams)]
    running = [asyncio.Event() for _ in bodies]   # set at a stream's first token
    failed = asyncio.Event()                      # set once the poisoned request has its error
    after_failure = [0] * n_streams               # tokens each stream received after that

    async def stream(http: httpx.AsyncClient, i: int) -> tuple[list[int], dict]:
        ids, final = [], None
        async with http.stream("POST", "/v1/generate", json={**bodies[i], "stream": True}) as r:
            assert r.status_code == 200
            async for name, data in aparse_sse(r.aiter_lines()):
                if name == "token":
                    ids.append(json.loads(data)["token_id"])
                    running[i].set()
                    after_failure[i] += failed.is_set()
                else:
                    final = (name, json.loads(data))
        return ids, final

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=32)) as http:
        tasks = [asyncio.create_task(stream(http, i)) for i in range(n_streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in running)), 30)

        async with http.stream("POST", "/v1/generate", json={"prompt": POISON, "max_tokens": 8,
                                                             "stream": True}) as r:
            assert r.status_code == 200
            poisoned = [(name, json.loads(data)) async for name, data in aparse_sse(r.aiter_lines())]
        failed.set()
        assert [name for name, _ in poisoned] == ["error"]
        assert poisoned[0][1]["error"]["code"] == "internal_error"
        whole = await http.post("/v1/generate", json={"prompt": POISON, "max_tokens": 8})
        assert whole.status_code == 500 and whole.json()["error"]["code"] == "internal_error"

        results = await asyncio.gather(*tasks)
        for i, (ids, final) in enumerate(results):
            assert final[0] == "done" and final[1]["usage"]["completion_tokens"] == max_tokens == len(ids), final
            assert after_failure[i] > 0, f"stream {i} had finished before the failure: nothing was shown"
        # the concurrent streams were not disturbed: each gives what it gives alone, now
        for i, (ids, _) in enumerate(results):
            alone = (await http.post("/v1/generate", json=bodies[i])).json()
            assert alone["token_ids"] == ids, f"stream {i} differs from its solo run"
        await asyncio.to_thread(wait_for, lambda: not any(gauges(url).values()), 10.0, 0.02, "gauges at 0")
    figures.record("prefill_fault", concurrent_streams=n_streams, tokens_each=max_tokens,
                   min_tokens_after_failure=min(after_failure))


# ---- SIGTERM during many open streams -----------------------------------------------------------------

SLOTS, STREAMS = 16, 48
ENDLESS = 100_000


@pytest.fixture()
def serve(model_dir, tmp_path):
    process = ServeProcess(model_dir, tmp_path / "serve.log", "--max-sessions", str(SLOTS), "--queue-size",
                           str(STREAMS), "--max-new-tokens", str(ENDLESS), "--shutdown-drain-s", "2")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.mark.slow
async def test_sigterm_during_open_streams_ends_each_with_a_final_event(serve, figures):
    def body(i: int) -> dict:
        # a third may finish within the drain, the rest would run forever; some deliberate
        request = {"prompt": f"stream {i} until told", "max_tokens": 150 if i % 3 == 0 else ENDLESS,
                   "ignore_eos": True, "stream": True}
        if i % 4 == 1:
            request["deliberation"] = {"enabled": True, "simulations": 4}
        return request

    accepted = [asyncio.Event() for _ in range(STREAMS)]  # the 200 came: the session runs or is queued

    async def stream(http: httpx.AsyncClient, i: int) -> list[tuple[str, dict]]:
        async with http.stream("POST", "/v1/generate", json=body(i)) as r:
            assert r.status_code == 200
            accepted[i].set()
            return [(name, json.loads(data)) async for name, data in aparse_sse(r.aiter_lines())
                    if name != "token"]

    limits = httpx.Limits(max_connections=STREAMS + 8)
    async with httpx.AsyncClient(base_url=serve.url, timeout=60, limits=limits) as http:
        tasks = [asyncio.create_task(stream(http, i)) for i in range(STREAMS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in accepted)), 30)
        open_now = await asyncio.to_thread(gauges, serve.url)
        serve.proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)

    finals = [events[-1] if events else ("nothing", {}) for events in results]
    for i, (name, data) in enumerate(finals):
        assert name in ("done", "error"), f"stream {i} ended without a final event: {results[i][-3:]}"
        if name == "error":
            assert data["error"]["code"] == "shutdown", data
    done = sum(name == "done" for name, _ in finals)
    assert await asyncio.to_thread(serve.proc.wait, 30) == 0
    output = serve.output()
    assert "Traceback" not in output, output[-3000:]
    figures.record("sigterm", streams=STREAMS, running=int(open_now["crsm_running_sessions"]),
                   queued=int(open_now["crsm_waiting_sessions"]), ended_done=done,
                   ended_error_shutdown=STREAMS - done, exit_status=serve.proc.returncode)
