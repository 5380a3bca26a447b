"""The HTTP server against a real uvicorn on 127.0.0.1 serving a tiny random model: the official openai
client, SSE parsed by hand, concurrency without cross-talk, dropped clients, bad input, 429 and 503,
metrics, and SIGTERM."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from crsm_core.backbone import MambaLM
from crsm_core.model import CRSMModel
from crsm_core.config import tiny_config
from crsm_core.tokenizer import ByteTokenizer
from server.chat_template import render_chat
from server.cli import build_server
from server.runtime import load_model
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny"
ENDLESS = 100_000  # max_tokens of streams that run until their client leaves


# ---- fixtures and helpers -----------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = CRSMModel(MambaLM(tiny_config()), tokenizer=ByteTokenizer())  # backbone, dynamics, value heads
    model.save_pretrained(directory)
    model.close()
    return directory


class LiveServer:
    """uvicorn in a background thread on a free port."""

    def __init__(self, settings: ServerSettings, loader=load_model):
        self.server = build_server(settings.model_copy(update={"port": 0}), "warning", loader)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while wait_ready and httpx.get(self.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.request_exit()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def settings_for(model_dir: Path, **overrides) -> ServerSettings:
    base = dict(model_dir=model_dir, model_name=MODEL, device="cpu", max_sessions=64, max_prompt_tokens=512,
                max_new_tokens=ENDLESS, queue_size=64, shutdown_drain_s=1.0)
    base.update(overrides)
    return ServerSettings(**base)


@pytest.fixture(scope="module", params=[False, True], ids=["one-process", "engine-process"])
def live(model_dir, request) -> Iterator[LiveServer]:
    """The server in both designs: the engine in the server's process, and in a process of its own
    (crsm_core/engine_core.py): every test that uses it runs against both."""
    server = LiveServer(settings_for(model_dir, engine_process=request.param)).start()
    yield server
    server.stop()


@pytest.fixture()
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """A plain Server-Sent Events parser: (event name, data) per dispatched message."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def stream_generate(url: str, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", url + "/v1/generate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [(e, json.loads(d)) for e, d in parse_sse(r.iter_lines())]


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def gauge(url: str, name: str) -> float:
    return metrics(url)[(name, ())]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


# ---- the OpenAI client --------------------------------------------------------------------------------

def test_openai_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_completions_streaming_and_not(client):
    # unknown fields ("frobnicate") are ignored, as OpenAI does
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, seed=3, temperature=0.9, user="someone",
                extra_body={"ignore_eos": True, "frobnicate": 1})
    whole = client.completions.create(**args)
    assert whole.object == "text_completion" and len(whole.choices) == 1
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (16, 12)

    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text

    echoed = client.completions.create(**args, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + whole.choices[0].text


def test_openai_completions_prompt_list_and_n(client):
    args = dict(model=MODEL, max_tokens=6, seed=10, extra_body={"ignore_eos": True})
    many = client.completions.create(**args, prompt=["first", "second"], n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    for i, choice in enumerate(many.choices):
        # choice j of a prompt uses seed + j
        alone = client.completions.create(**{**args, "seed": 10 + i % 2}, prompt=["first", "second"][i // 2])
        assert choice.text == alone.choices[0].text
    assert many.usage.completion_tokens == 4 * 6 and many.usage.prompt_tokens == len("first") + len("second")


def test_openai_chat_streaming_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    args = dict(model=MODEL, messages=messages, max_tokens=10, seed=1, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    prompt = render_chat([("system", "Be brief."), ("user", "Hi there")])
    assert prompt.endswith("User: Hi there\n\nAssistant:")
    assert whole.usage.prompt_tokens == len(prompt.encode())
    assert whole.choices[0].finish_reason in ("length", "stop")

    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


# ---- the native SSE stream ----------------------------------------------------------------------------

def test_sse_event_order_and_usage(live):
    body = {"prompt": "The quick brown fox", "max_tokens": 20, "seed": 7, "ignore_eos": True}
    events = stream_generate(live.url, body)
    names = [e for e, _ in events]
    assert names == ["token"] * 20 + ["done"]
    tokens = [d for e, d in events if e == "token"]
    assert [t["position"] for t in tokens] == list(range(19, 39))
    done = events[-1][1]
    assert done["finish_reason"] == "length"
    assert done["usage"] == {"prompt_tokens": 19, "completion_tokens": len(tokens), "total_tokens": 19 + 20}
    assert set(done["timings"]) == {"queue_s", "ttft_s", "mean_itl_s", "tokens_per_s", "total_s"}
    whole = httpx.post(live.url + "/v1/generate", json=body).json()
    assert whole["text"] == "".join(t["text"] for t in tokens)
    assert whole["token_ids"] == [t["token_id"] for t in tokens]
    assert whole["usage"] == done["usage"]


def test_sse_stop_string_from_token_ids(live):
    base = {"token_ids": [72, 105, 33], "max_tokens": 40, "seed": 2, "ignore_eos": True}
    full = httpx.post(live.url + "/v1/generate", json=base).json()["text"]
    stop = next(full[i:i + 2] for i in range(len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    events = stream_generate(live.url, {**base, "stop": [stop]})
    assert events[-1] == ("done", events[-1][1]) and events[-1][1]["finish_reason"] == "stop"
    streamed = [d for e, d in events if e == "token"]
    assert "".join(t["text"] for t in streamed) == full[:full.index(stop)]
    assert events[-1][1]["usage"]["completion_tokens"] == len(streamed)


async def test_32_concurrent_streams_match_solo_runs(live):
    def body(i: int) -> dict:
        return {"prompt": f"stream number {i}: ", "max_tokens": 16, "seed": 100 + i, "temperature": 0.9,
                "top_k": 40 if i % 2 else 0, "top_p": 0.95 if i % 3 else 1.0, "ignore_eos": True, "stream": True}

    async def run(http: httpx.AsyncClient, i: int) -> tuple[str, list[int], dict]:
        async with http.stream("POST", "/v1/generate", json=body(i)) as r:
            assert r.status_code == 200
            events = [(e, json.loads(d)) for e, d in parse_sse([line async for line in r.aiter_lines()])]
        tokens = [d for e, d in events if e == "token"]
        assert events[-1][0] == "done"
        return "".join(t["text"] for t in tokens), [t["token_id"] for t in tokens], events[-1][1]

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=live.url, timeout=60, limits=limits) as http:
        together = await asyncio.gather(*(run(http, i) for i in range(32)))
        for i, (text, ids, done) in enumerate(together):
            assert len(ids) == 16 and done["usage"]["completion_tokens"] == 16
            assert (text, ids) == (await run(http, i))[:2], f"stream {i} differs from its solo run"


async def test_50_dropped_streams_free_their_slots(live):
    reading = asyncio.Event()
    started = 0

    async def drop_after_two_tokens(http: httpx.AsyncClient, i: int) -> None:
        nonlocal started
        body = {"prompt": f"client {i}", "max_tokens": ENDLESS, "ignore_eos": True, "stream": True,
                "deliberation": {"enabled": i % 2 == 0, "simulations": 4}}
        async with http.stream("POST", "/v1/generate", json=body) as r:
            lines = r.aiter_lines()  # kept referenced: a dropped line iterator would close the connection
            seen = 0
            while seen < 2:
                seen += (await anext(lines)).startswith("event: token")
            started += 1
            if started == 50:
                reading.set()
            await reading.wait()  # hold every stream open until all 50 are running

    async with httpx.AsyncClient(base_url=live.url, timeout=60, limits=httpx.Limits(max_connections=64)) as http:
        tasks = [asyncio.create_task(drop_after_two_tokens(http, i)) for i in range(50)]
        await reading.wait()
        assert gauge(live.url, "crsm_running_sessions") == 50
        assert gauge(live.url, "crsm_planner_tasks") == 25
        await asyncio.gather(*tasks)  # every client closes its connection mid-stream

        await asyncio.to_thread(wait_for, lambda: gauge(live.url, "crsm_running_sessions") == 0, 5.0)
        assert gauge(live.url, "crsm_planner_tasks") == 0
        assert gauge(live.url, "crsm_waiting_sessions") == 0

        # a client that gives up on an answer that is not streamed
        pending = asyncio.create_task(http.post("/v1/generate", json={"prompt": "x", "max_tokens": ENDLESS,
                                                                      "ignore_eos": True}))
        await asyncio.to_thread(wait_for, lambda: gauge(live.url, "crsm_running_sessions") == 1)
        pending.cancel()
        await asyncio.to_thread(wait_for, lambda: gauge(live.url, "crsm_running_sessions") == 0, 5.0)


# ---- bad input ----------------------------------------------------------------------------------------

COMPLETIONS, CHAT, GENERATE = "/v1/completions", "/v1/chat/completions", "/v1/generate"
OK_COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, param, code", [
    (COMPLETIONS, {**OK_COMPLETION, "prompt": ""}, "prompt", "invalid_value"),
    (COMPLETIONS, {**OK_COMPLETION, "max_tokens": -1}, "max_tokens", "greater_than_equal"),
    (COMPLETIONS, {**OK_COMPLETION, "max_tokens": ENDLESS + 1}, "max_tokens", "invalid_value"),
    (COMPLETIONS, {**OK_COMPLETION, "temperature": 2.5}, "temperature", "less_than_equal"),
    (COMPLETIONS, {**OK_COMPLETION, "top_p": 0}, "top_p", "greater_than"),
    (COMPLETIONS, {**OK_COMPLETION, "prompt": "x" * 513}, "prompt", "invalid_value"),
    (COMPLETIONS, {**OK_COMPLETION, "prompt": [1, 2, 300]}, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi"}, "model", "missing"),
    (COMPLETIONS, b'{"model": "tiny", "prompt": ', None, "json_invalid"),
    (COMPLETIONS, b'[1, 2]', None, "json_invalid"),
    (CHAT, {**OK_CHAT, "messages": []}, "messages", "too_short"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "literal_error"),
    (GENERATE, {"token_ids": [1, -1], "max_tokens": 2}, "token_ids", "invalid_value"),
    (GENERATE, {"prompt": "a", "token_ids": [1]}, None, "value_error"),
    (GENERATE, {"prompt": "a", "max_token": 3}, "max_token", "extra_forbidden"),
    (GENERATE, {"prompt": "a", "top_p": 1.5}, "top_p", "less_than_equal"),
    (GENERATE, {"prompt": "a", "seed": -2**63 - 1}, "seed", "greater_than_equal"),
    (COMPLETIONS, {**OK_COMPLETION, "seed": 2**64}, "seed", "less_than_equal"),
    (GENERATE, {"prompt": "a", "stop": ["a"] * 9}, "stop", "value_error"),
    (GENERATE, {"prompt": "a", "deliberation": {"lag": -1}}, "deliberation.lag", "greater_than_equal"),
    (GENERATE, {"prompt": "a", "deliberation": {"lag": 33}}, "deliberation.lag", "less_than_equal"),
    (GENERATE, {"prompt": "a", "deliberation": {"simulations": 257}}, "deliberation.simulations",
     "less_than_equal"),
    (GENERATE, {"prompt": "a", "deliberation": {"injection_rate": 2}}, "deliberation.injection_rate",
     "less_than_equal"),
    (GENERATE, {"prompt": "a", "deliberation": {"enabled": True, "wild": 1}}, "deliberation.wild", "extra_forbidden"),
])
def test_bad_input_gets_400_and_an_openai_error_body(live, path, body, param, code):
    if isinstance(body, bytes):
        r = httpx.post(live.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(live.url + path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    # and the server goes on serving
    ok = httpx.post(live.url + COMPLETIONS, json=OK_COMPLETION)
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 2


def test_the_extreme_seeds_are_served(live):
    # choice j uses seed + j, kept to 64 bits: the largest seed's second choice is seed 0
    for body in ({**OK_COMPLETION, "seed": 2**64 - 1, "n": 2}, {**OK_COMPLETION, "seed": -2**63}):
        r = httpx.post(live.url + COMPLETIONS, json=body)
        assert r.status_code == 200, r.text


def test_unknown_route_is_404_in_the_same_shape(live):
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_full_queue_gets_429_with_retry_after(model_dir):
    server = LiveServer(settings_for(model_dir, max_sessions=1, queue_size=1, retry_after_s=2)).start()
    try:
        endless = {"prompt": "busy", "max_tokens": ENDLESS, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + GENERATE, json=endless) as running:
            lines = running.iter_lines()  # kept referenced, or the connection closes
            next(lines)
            with httpx.stream("POST", server.url + GENERATE, json=endless) as queued:
                assert queued.status_code == 200
                wait_for(lambda: gauge(server.url, "crsm_waiting_sessions") == 1)
                r = httpx.post(server.url + COMPLETIONS, json=OK_COMPLETION)
                assert r.status_code == 429 and r.headers["retry-after"] == "2"
                assert r.json()["error"]["code"] == "queue_full"
        wait_for(lambda: gauge(server.url, "crsm_running_sessions") + gauge(server.url, "crsm_waiting_sessions") == 0)
        assert httpx.post(server.url + COMPLETIONS, json=OK_COMPLETION).status_code == 200
    finally:
        server.stop()


def test_503_while_the_model_loads(model_dir):
    release = threading.Event()

    def slow_loader(settings):
        assert release.wait(30)
        return load_model(settings)

    server = LiveServer(settings_for(model_dir), slow_loader).start(wait_ready=False)
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        for r in (httpx.get(server.url + "/ready"), httpx.post(server.url + COMPLETIONS, json=OK_COMPLETION)):
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "model_loading"
        release.set()
        wait_for(lambda: httpx.get(server.url + "/ready").status_code == 200)
        assert httpx.post(server.url + COMPLETIONS, json=OK_COMPLETION).status_code == 200
    finally:
        release.set()
        server.stop()


def test_sse_with_deliberation_streams_every_injection(live):
    before = metrics(live.url)
    body = {"prompt": "think ahead", "max_tokens": 40, "seed": 4, "ignore_eos": True,
            "deliberation": {"enabled": True, "lag": 2, "simulations": 4, "injection_rate": 0.5}}
    events = stream_generate(live.url, body)
    assert events[-1][0] == "done" and {e for e, _ in events[:-1]} <= {"token", "injection"}
    tokens = [d for e, d in events if e == "token"]
    injections = [d for e, d in events if e == "injection"]
    done = events[-1][1]
    assert done["usage"]["completion_tokens"] == len(tokens) == 40
    counters = done["deliberation"]
    outcomes = ("applied", "applied_late", "pruned", "vetoed", "diverged", "rejected")
    assert counters["launched"] >= 1 and injections
    # every planner result is resolved exactly once, streamed, and counted
    assert len(injections) == sum(counters[o] for o in outcomes) == counters["produced"]
    for event in injections:
        assert {"position", "target_position", "outcome", "alpha", "lateness", "reason"} <= set(event)
        assert event["outcome"] in outcomes and len(event["alpha"]) in (0, 4)
        assert event["target_position"] == event["captured_position"] + 2
    # tokens stream in position order, each injection before the token of its position
    positions = [(d["position"], e) for e, d in events[:-1]]
    assert [p for p, e in positions if e == "token"] == list(range(11, 51))
    for i, (position, kind) in enumerate(positions):
        following = [p for p, e in positions[i + 1:] if e == "token"]
        if kind == "injection" and following:  # (entries resolved when the session closed come last)
            assert following[0] == position
    after = metrics(live.url)
    for outcome in outcomes:
        key = ("crsm_injections_total", (("outcome", outcome),))
        assert after[key] - before[key] == counters[outcome]
    lag_count = ("crsm_planner_lag_tokens_count", ())
    assert after[lag_count] - before[lag_count] == len(injections)
    assert after[("crsm_planner_tasks", ())] == 0
    # each finished plan ran its simulations (4 per plan); the counter moves by what the planner reports
    sims = ("crsm_planner_simulations_total", ())
    assert counters["simulations"] >= 4 * counters["produced"] > 0
    assert after[sims] - before[sims] == counters["simulations"]


# ---- metrics ------------------------------------------------------------------------------------------

METRIC_NAMES = [
    "crsm_requests_total", "crsm_prompt_tokens_total", "crsm_generated_tokens_total",
    "crsm_time_to_first_token_seconds_bucket", "crsm_inter_token_latency_seconds_bucket",
    "crsm_request_latency_seconds_bucket", "crsm_running_sessions", "crsm_waiting_sessions",
    "crsm_planner_tasks", "crsm_planner_lag_tokens_bucket",
    "crsm_planner_lag_seconds_bucket", "crsm_planner_simulations_total", "crsm_planner_errors_total",
]


def test_metrics_move_by_exactly_one_request(live):
    before = metrics(live.url)
    assert {name for name, _ in before} >= set(METRIC_NAMES)
    ok = (("endpoint", GENERATE), ("status", "200"))
    bad = (("endpoint", GENERATE), ("status", "400"))

    r = httpx.post(live.url + GENERATE, json={"prompt": "metrics!", "max_tokens": 7, "ignore_eos": True})
    assert r.status_code == 200
    assert httpx.post(live.url + GENERATE, json={"prompt": "", "max_tokens": 7}).status_code == 400
    wait_for(lambda: metrics(live.url).get(("crsm_requests_total", bad), 0) == before.get(("crsm_requests_total", bad), 0) + 1)
    after = metrics(live.url)

    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("crsm_requests_total", ok) == 1
    assert delta("crsm_requests_total", bad) == 1
    assert delta("crsm_prompt_tokens_total") == 8
    assert delta("crsm_generated_tokens_total") == 7
    assert delta("crsm_time_to_first_token_seconds_count") == 1
    assert delta("crsm_inter_token_latency_seconds_count") == 6
    assert delta("crsm_request_latency_seconds_count") == 2
    assert after[("crsm_running_sessions", ())] == 0


# ---- the command line and SIGTERM ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_crsm_serve_ends_open_streams_on_sigterm(model_dir):
    port = free_port()
    env = {**os.environ, "CRSM_TORCH_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "crsm", "serve", "--model", str(model_dir),
         "--port", str(port), "--max-new-tokens", str(ENDLESS), "--shutdown-drain-s", "0.3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(url + "/ready").status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_for(ready, 60, 0.1)
        body = {"prompt": "until the end", "max_tokens": ENDLESS, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + GENERATE, json=body, timeout=30) as r:
            events = parse_sse(r.iter_lines())
            assert next(events)[0] == "token"
            proc.send_signal(signal.SIGTERM)
            rest = list(events)
        name, data = rest[-1]
        assert name == "error" and json.loads(data)["error"]["code"] == "shutdown"
        # a drained stop on SIGTERM is a clean exit (uvicorn alone would re-raise the signal and die of it)
        assert proc.wait(timeout=30) == 0
        assert "Finished server process" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_crsm_serve_refuses_a_missing_model_dir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "crsm", "serve", "--model", str(tmp_path / "none")],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "model directory not found" in result.stderr
