"""The client against a real HTTP server on 127.0.0.1 (uvicorn in a thread) that plays scripted
answers: 429/503 with and without Retry-After, event streams cut into small pieces, slow answers,
broken streams. Real sockets all the way; nothing of httpx is replaced.

Each test gets its own URL prefix `/<key>/<scenario>`, so the server counts the requests of that
test alone. Scenarios:
  ok                      answer (JSON, or SSE when the body asks for a stream)
  busy:N:RETRY_AFTER:CODE the first N requests get CODE (429/503) with that Retry-After ("-" = none)
  bad                     400 with an OpenAI error body
  plain500                500 with a text body
  slow:S                  JSON after S seconds; a stream sends one token, then waits S seconds
  error-mid               a stream that ends with an `error` event
  truncated               a stream that stops without `done`
  not-sse                 JSON where a stream was asked for
  forever                 a stream of a token every 20 ms for 10 s (to see the client hang up)
The "generation" is the prompt reversed, one character per token, cut at max_tokens.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from clients import (APIConnectionError, APIStatusError, APITimeoutError, AsyncCRSMClient,
                     BadRequestError, CRSMClient, DeliberationOptions, DoneEvent, ErrorEvent,
                     GenerateResult, InjectionEvent, ProtocolError, RateLimitError, RetryPolicy,
                     ServiceUnavailableError, StreamError, Timeouts, TokenEvent)
from clients.cli import main as cli_main
from clients.retry import parse_retry_after
from clients.sse import SSEMessage
from clients.types import parse_event

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(max_retries=3, backoff_base_s=0.05, backoff_max_s=0.4)


# ---------------------------------------------------------------- the scripted server

@dataclass
class Script:
    hits: dict[str, list[tuple[float, dict]]] = field(default_factory=lambda: defaultdict(list))
    hung_up: dict[str, threading.Event] = field(default_factory=lambda: defaultdict(threading.Event))


SCRIPT = Script()


def scripted_tokens(body: dict) -> list[tuple[str, int]]:
    text = body["prompt"][::-1][: body.get("max_tokens", 16)]
    return [(ch, ord(ch)) for ch in text]


def scripted_result(body: dict) -> dict:
    tokens = scripted_tokens(body)
    n_prompt = len(body["prompt"])
    finish = "length" if len(tokens) == body.get("max_tokens", 16) else "stop"
    return {
        "id": "gen-1",
        "text": "".join(t for t, _ in tokens),
        "token_ids": [i for _, i in tokens],
        "finish_reason": finish,
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                  "total_tokens": n_prompt + len(tokens)},
        "timings": {"queue_s": 0.001, "ttft_s": 0.01, "mean_itl_s": 0.002, "tokens_per_s": 500.0,
                    "total_s": 0.03, "prefill_s": 0.004},
        "deliberation": {"plans": 1, "applied": 1},
        "injections": [{"position": n_prompt + 1, "target_position": n_prompt + 1,
                        "outcome": "applied", "alpha": [0.0, 0.0, 0.3, 0.4], "lateness": 0,
                        "reason": None}],
    }


def sse(event: str, payload: Any, eol: str = "\r\n", id: str | None = None) -> bytes:
    lines = [f"event: {event}"] + ([f"id: {id}"] if id is not None else [])
    # split the JSON over two data lines: the decoder must join them with "\n" (valid JSON still)
    text = json.dumps(payload, ensure_ascii=False)
    cut = text.find(",") + 1 or len(text)
    lines += [f"data: {text[:cut]}", f"data:{text[cut:]}"]
    return (eol.join(lines) + eol + eol).encode()


def scripted_stream(body: dict) -> list[bytes]:
    """The SSE messages of a whole generation, with comments, an unknown event and retry."""
    result = scripted_result(body)
    n_prompt = result["usage"]["prompt_tokens"]
    parts = [b": stream opened\n", b"retry: 2500\n\n"]
    for i, (text, token_id) in enumerate(scripted_tokens(body)):
        parts.append(sse("token", {"text": text, "token_id": token_id, "position": n_prompt + i},
                         eol=["\r\n", "\n", "\r"][i % 3], id=str(i)))
        if i == 1:
            parts.append(sse("injection", result["injections"][0]))
            parts.append(b": ping\r\n\r\n")
            parts.append(sse("heartbeat", {"unknown": True}))   # a newer server's event type
    parts.append(sse("done", {k: result[k] for k in ("finish_reason", "usage", "timings",
                                                      "deliberation")}))
    return parts


async def dribble(parts: list[bytes]) -> AsyncIterator[bytes]:
    """Sends the bytes in pieces of 1..11 bytes, so lines and UTF-8 characters are cut."""
    data = b"".join(parts)
    sizes = [1, 2, 3, 5, 7, 11]
    at = 0
    for n in range(len(data)):
        if at >= len(data):
            break
        step = sizes[n % len(sizes)]
        yield data[at:at + step]
        at += step
        await asyncio.sleep(0.0005)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def generate_endpoint(request: Request) -> Response:
    key, scenario = request.path_params["key"], request.path_params["scenario"]
    body = await request.json()
    hits = SCRIPT.hits[key]
    hits.append((time.monotonic(), body))
    name, *args = scenario.split(":")
    streaming = bool(body.get("stream"))
    if name == "busy":
        count, retry_after, status = int(args[0]), args[1], int(args[2])
        if len(hits) <= count:
            headers = {} if retry_after == "-" else {"Retry-After": retry_after}
            return JSONResponse(error_body("queue is full", "server_busy", code="queue_full"),
                                status_code=status, headers=headers)
        name = "ok"
    if name == "ok":
        if streaming:
            return StreamingResponse(dribble(scripted_stream(body)), media_type="text/event-stream")
        return JSONResponse(scripted_result(body))
    if name == "bad":
        return JSONResponse(error_body("max_tokens must be >= 1", "invalid_request_error",
                                       param="max_tokens", code="invalid_value"), status_code=400)
    if name == "plain500":
        return PlainTextResponse("boom", status_code=500)
    if name == "not-sse":
        return JSONResponse(scripted_result(body))
    if name == "slow":
        delay = float(args[0])
        if not streaming:
            await asyncio.sleep(delay)
            return JSONResponse(scripted_result(body))

        async def slow_stream() -> AsyncIterator[bytes]:
            parts = scripted_stream(body)
            yield b"".join(parts[:3])       # opening comment, retry, first token
            await asyncio.sleep(delay)
            yield b"".join(parts[3:])
        return StreamingResponse(slow_stream(), media_type="text/event-stream")
    if name in ("error-mid", "truncated"):
        parts = [p for p in scripted_stream(body) if p.startswith(b"event: token")][:2]
        if name == "error-mid":
            parts.append(sse("error", error_body("model step failed", "internal_error",
                                                 code="internal")))
        return StreamingResponse(dribble(parts), media_type="text/event-stream")
    if name == "forever":
        async def forever() -> AsyncIterator[bytes]:
            completed = False
            try:
                for i in range(500):
                    yield sse("token", {"text": "x", "token_id": 120, "position": i})
                    await asyncio.sleep(0.02)
                completed = True
            finally:
                if not completed:
                    SCRIPT.hung_up[key].set()
        return StreamingResponse(forever(), media_type="text/event-stream")
    return JSONResponse(error_body(f"unknown scenario {scenario}", "test_error"), status_code=404)


# OpenAI-shaped endpoints, just enough for the examples in clients/examples/
async def oa_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": "crsm-test", "object": "model", "created": 0, "owned_by": "crsm"}]})


async def oa_completions(request: Request) -> Response:
    body = await request.json()
    SCRIPT.hits["openai-completions"].append((time.monotonic(), body))
    text = body["prompt"][::-1][: body["max_tokens"]]
    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(text),
             "total_tokens": len(body["prompt"]) + len(text)}
    base = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"]}
    if not body.get("stream"):
        return JSONResponse({**base, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                 "finish_reason": "length"}], "usage": usage})
    chunks = [{**base, "choices": [{"index": 0, "text": ch, "logprobs": None,
                                    "finish_reason": None}]} for ch in text]
    if body.get("stream_options", {}).get("include_usage"):
        chunks.append({**base, "choices": [], "usage": usage})
    data = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
    return StreamingResponse(dribble(data), media_type="text/event-stream")


async def oa_chat(request: Request) -> Response:
    body = await request.json()
    SCRIPT.hits["openai-chat"].append((time.monotonic(), body))
    text = body["messages"][-1]["content"][::-1][: body["max_tokens"]]
    base = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
    if not body.get("stream"):
        return JSONResponse({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "length"}]})
    chunks = [{**base, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": ch}, "finish_reason": None}]} for ch in text]
    data = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
    return StreamingResponse(dribble(data), media_type="text/event-stream")


APP = Starlette(routes=[
    Route("/oa/v1/models", oa_models),
    Route("/oa/v1/completions", oa_completions, methods=["POST"]),
    Route("/oa/v1/chat/completions", oa_chat, methods=["POST"]),
    Route("/{key}/{scenario}/v1/generate", generate_endpoint, methods=["POST"]),
])


@pytest.fixture(scope="module")
def server_root():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(APP, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def url(server_root):
    """url(scenario) -> (base_url for the client, key under which the server records hits)."""
    def make(scenario: str) -> tuple[str, str]:
        key = uuid.uuid4().hex
        return f"{server_root}/{key}/{scenario}", key
    return make


def gaps(key: str) -> list[float]:
    times = [t for t, _ in SCRIPT.hits[key]]
    return [b - a for a, b in zip(times, times[1:])]


RETRY_LOG = re.compile(r"; retry (\d+) in ([0-9.]+)s$")


@pytest.fixture
def retry_delays(caplog):
    """retry_delays() -> the delays the client logged, one per retry it scheduled, in order (what the
    client decided, not what the clock measured: the machine may be busy)."""
    caplog.set_level(logging.INFO, logger="clients.client")

    def delays() -> list[float]:
        found = [(int(m[1]), float(m[2])) for r in caplog.records if r.name == "clients.client"
                 if (m := RETRY_LOG.search(r.getMessage()))]
        assert [n for n, _ in found] == list(range(1, len(found) + 1))
        return [delay for _, delay in found]
    return delays


PROMPT = "h\u00e9llo, w\u00f6rld \u2713"   # multi-byte characters, cut by the dribbling server


# ---------------------------------------------------------------- pieces without a server

def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    for bad in (None, "", "-1", "1.5", "soon", "Wed, 21 Oct 2015 07:28:00"):   # last: no zone
        assert parse_retry_after(bad, now) is None, bad


def test_retry_policy_delays():
    policy = RetryPolicy(max_retries=4, backoff_base_s=0.2, backoff_max_s=1.0, max_retry_after_s=10)
    rng = random.Random(0)
    for _ in range(200):
        for retry, step in enumerate([0.2, 0.4, 0.8, 1.0]):      # capped at backoff_max_s
            assert step / 2 <= policy.delay(retry, None, rng) <= step
        assert 3.0 <= policy.delay(0, 3.0, rng) <= 3.2            # Retry-After plus jitter
    assert policy.delay(4, None, rng) is None                     # attempts are bounded
    assert policy.delay(0, 10.5, rng) is None                     # too long to wait: give up
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_parse_event_validates_payloads():
    ok = parse_event(SSEMessage("token", '{"text": "a", "token_id": 97, "position": 3}', ""))
    assert ok == TokenEvent(text="a", token_id=97, position=3)
    assert parse_event(SSEMessage("message", "{}", "")) is None      # not an event of this API
    for data in ('{"text": "a"}', "not json", '{"text": 1, "token_id": "x", "position": 0}'):
        with pytest.raises(ProtocolError):
            parse_event(SSEMessage("token", data, ""))
    with pytest.raises(ProtocolError):
        GenerateResult.from_events([TokenEvent(text="a", token_id=97, position=0)])
    nested = '{"error": {"message": "m", "type": "t", "param": null, "code": "c"}}'
    flat = '{"message": "m", "type": "t", "code": "c"}'
    assert parse_event(SSEMessage("error", nested, "")) == parse_event(SSEMessage("error", flat, "")) \
        == ErrorEvent(message="m", type="t", code="c")


# ---------------------------------------------------------------- non-streaming

def test_generate_sends_only_given_options_and_parses_answer(url):
    base, key = url("ok")
    with CRSMClient(base) as client:
        result = client.generate(PROMPT, max_tokens=5, temperature=0.0, seed=7, stop=["\n"],
                                 deliberation=DeliberationOptions(lag=2, simulations=16))
    assert SCRIPT.hits[key][0][1] == {
        "prompt": PROMPT, "max_tokens": 5, "temperature": 0.0, "seed": 7, "stop": ["\n"],
        "stream": False, "deliberation": {"enabled": True, "lag": 2, "simulations": 16}}
    assert result.text == PROMPT[::-1][:5]
    assert result.token_ids == [ord(c) for c in PROMPT[::-1][:5]]
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 5
    assert result.usage.total_tokens == len(PROMPT) + 5
    assert result.timings.ttft_s == pytest.approx(0.01)
    assert result.timings.model_extra == {"prefill_s": 0.004}   # fields a newer server adds are kept
    assert result.injections[0].alpha == [0.0, 0.0, 0.3, 0.4]
    assert result.injections[0].outcome == "applied"


def test_request_needs_exactly_one_input(url):
    base, key = url("ok")
    with CRSMClient(base) as client:
        with pytest.raises(ValueError):
            client.generate(max_tokens=3)
        with pytest.raises(ValueError):
            client.generate("x", token_ids=[1, 2])
        with pytest.raises(ValueError):
            client.generate("x", max_tokenz=3)    # a misspelt option is refused, not dropped
    assert SCRIPT.hits[key] == []


def test_bad_request_is_not_retried_and_keeps_the_error_fields(url):
    base, key = url("bad")
    with CRSMClient(base, retry=FAST_RETRY) as client, pytest.raises(BadRequestError) as info:
        client.generate("x", max_tokens=0)
    assert len(SCRIPT.hits[key]) == 1
    err = info.value
    assert (err.status_code, err.type, err.param, err.code) == (
        400, "invalid_request_error", "max_tokens", "invalid_value")
    assert err.message == "max_tokens must be >= 1"


def test_non_json_error_body_becomes_the_message(url):
    base, key = url("plain500")
    with CRSMClient(base, retry=FAST_RETRY) as client, pytest.raises(APIStatusError) as info:
        client.generate("x")
    assert type(info.value) is APIStatusError
    assert info.value.status_code == 500 and info.value.message == "boom"
    assert len(SCRIPT.hits[key]) == 1     # 500 is not one of the retried statuses


# ---------------------------------------------------------------- retries

def test_429_then_200_waits_what_retry_after_says(url):
    base, key = url("busy:1:1:429")
    with CRSMClient(base, retry=FAST_RETRY) as client:
        result = client.generate("abc", max_tokens=2)
    assert result.text == "cb"
    assert len(SCRIPT.hits[key]) == 2
    (gap,) = gaps(key)
    assert 1.0 <= gap < 1.0 + FAST_RETRY.backoff_base_s + 0.5


def test_503_without_retry_after_backs_off_exponentially_then_succeeds(url, retry_delays):
    base, key = url("busy:3:-:503")
    policy = RetryPolicy(max_retries=3, backoff_base_s=0.1, backoff_max_s=1.0)
    with CRSMClient(base, retry=policy) as client:
        assert client.generate("abc", max_tokens=1).text == "c"
    assert len(SCRIPT.hits[key]) == 4
    delays = retry_delays()
    assert len(delays) == 3
    for retry, (delay, gap) in enumerate(zip(delays, gaps(key))):
        step = 0.1 * 2 ** retry
        assert step / 2 <= delay <= step, (retry, delay)   # equal jitter: the backoff doubles
        assert gap >= delay - 0.01, (retry, gap, delay)     # and the client waited it out before asking again


def test_gives_up_after_bounded_attempts(url):
    base, key = url("busy:100:0:503")
    with CRSMClient(base, retry=RetryPolicy(max_retries=2, backoff_base_s=0.01)) as client:
        with pytest.raises(ServiceUnavailableError) as info:
            client.generate("abc")
    assert len(SCRIPT.hits[key]) == 3
    assert info.value.retry_after == 0.0
    assert info.value.code == "queue_full"


def test_retry_after_beyond_the_limit_raises_at_once(url, retry_delays):
    base, key = url("busy:100:3600:429")
    with CRSMClient(base, retry=FAST_RETRY) as client, pytest.raises(RateLimitError) as info:
        client.generate("abc")
    assert retry_delays() == []     # no wait was scheduled
    assert len(SCRIPT.hits[key]) == 1
    assert info.value.retry_after == 3600.0


def test_max_retries_zero_means_one_attempt(url):
    base, key = url("busy:1:0:429")
    with CRSMClient(base, retry=RetryPolicy(max_retries=0)) as client, pytest.raises(RateLimitError):
        client.generate("abc")
    assert len(SCRIPT.hits[key]) == 1


def test_stream_is_retried_before_its_first_byte(url):
    base, key = url("busy:2:0:503")
    with CRSMClient(base, retry=FAST_RETRY) as client:
        with client.stream("abcd", max_tokens=3) as events:
            texts = [e.text for e in events if isinstance(e, TokenEvent)]
    assert texts == ["d", "c", "b"]
    assert len(SCRIPT.hits[key]) == 3


# ---------------------------------------------------------------- timeouts and connections

def test_read_timeout_on_a_slow_answer(url, retry_delays):
    base, key = url("slow:3")
    with CRSMClient(base, timeouts=Timeouts(read_s=0.3), retry=FAST_RETRY) as client:
        with pytest.raises(APITimeoutError) as info:
            client.generate("abc")
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)  # the read timeout, not the answer, ended it
    assert len(SCRIPT.hits[key]) == 1 and retry_delays() == []  # the server had the request: not sent again


def test_read_timeout_between_stream_chunks(url):
    base, key = url("slow:3")
    with CRSMClient(base, timeouts=Timeouts(read_s=0.3)) as client:
        events = client.stream("abc", max_tokens=3)
        first = next(iter(events))
        assert isinstance(first, TokenEvent) and first.text == "c"
        with pytest.raises(APITimeoutError) as info:
            list(events)
        assert isinstance(info.value.__cause__, httpx.ReadTimeout)


def test_refused_connection_is_retried_then_raised(retry_delays):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()     # nothing listens on this port now
    policy = RetryPolicy(max_retries=2, backoff_base_s=0.1, backoff_max_s=1.0)
    with CRSMClient(f"http://127.0.0.1:{port}", retry=policy) as client:
        with pytest.raises(APIConnectionError) as info:
            client.generate("abc")
    assert not isinstance(info.value, APITimeoutError)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    first, second = retry_delays()     # two backoff waits, each at least half its step
    assert 0.05 <= first <= 0.1 and 0.1 <= second <= 0.2


def test_connect_timeout(retry_delays):
    # a listener whose accept queue is full: the kernel drops further SYNs, so connect() hangs
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    try:
        client = CRSMClient(f"http://127.0.0.1:{port}", timeouts=Timeouts(connect_s=0.3),
                            retry=RetryPolicy(max_retries=1, backoff_base_s=0.05))
        with client, pytest.raises(APITimeoutError) as info:
            client.generate("abc")
        assert isinstance(info.value.__cause__, httpx.ConnectTimeout)
        assert len(retry_delays()) == 1      # two attempts: a connect timeout is retried (nothing was sent)
    finally:
        for s in fillers + [listener]:
            s.close()


# ---------------------------------------------------------------- streaming

def test_stream_events_in_order_and_equal_to_the_whole_answer(url):
    base, key = url("ok")
    with CRSMClient(base) as client:
        with client.stream(PROMPT, max_tokens=8) as events:
            received = list(events)
            last_id = events.last_event_id
        whole = client.generate(PROMPT, max_tokens=8)
        assembled = client.generate(PROMPT, max_tokens=8, stream=True)
    kinds = [type(e).__name__ for e in received]
    assert kinds == ["TokenEvent"] * 2 + ["InjectionEvent"] + ["TokenEvent"] * 6 + ["DoneEvent"]
    tokens = [e for e in received if isinstance(e, TokenEvent)]
    assert "".join(t.text for t in tokens) == PROMPT[::-1][:8]
    assert [t.position for t in tokens] == list(range(len(PROMPT), len(PROMPT) + 8))
    done = received[-1]
    assert isinstance(done, DoneEvent)
    assert done.usage.completion_tokens == len(tokens)
    assert done.timings.tokens_per_s == 500.0
    assert last_id == "7"
    assert assembled.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})
    assert SCRIPT.hits[key][-1][1]["stream"] is True


def test_error_event_ends_the_stream_and_generate_raises(url):
    base, key = url("error-mid")
    with CRSMClient(base) as client:
        events = list(client.stream("abcd"))
        with pytest.raises(StreamError) as info:
            client.generate("abcd", stream=True)
    assert [type(e) for e in events] == [TokenEvent, TokenEvent, ErrorEvent]
    assert events[-1].message == "model step failed" and events[-1].code == "internal"
    assert info.value.type == "internal_error"


def test_stream_without_done_is_a_protocol_error(url):
    base, _ = url("truncated")
    with CRSMClient(base) as client:
        events = client.stream("abcd")
        seen = []
        with pytest.raises(ProtocolError):
            for event in events:
                seen.append(event)
    assert [e.text for e in seen] == ["d", "c"]


def test_json_where_a_stream_was_asked_is_a_protocol_error(url):
    base, _ = url("not-sse")
    with CRSMClient(base) as client, pytest.raises(ProtocolError):
        client.stream("abcd")


def test_closing_a_stream_early_hangs_up_on_the_server(url):
    base, key = url("forever")
    with CRSMClient(base) as client:
        with client.stream("abc") as events:
            for i, _ in enumerate(events):
                if i == 3:
                    break
        assert SCRIPT.hung_up[key].wait(timeout=5.0)


# ---------------------------------------------------------------- async client

async def test_async_generate_with_retry(url):
    base, key = url("busy:2:0:429")
    async with AsyncCRSMClient(base, retry=FAST_RETRY) as client:
        result = await client.generate(PROMPT, max_tokens=4)
    assert result.text == PROMPT[::-1][:4]
    assert len(SCRIPT.hits[key]) == 3


async def test_async_stream_matches_sync_stream(url):
    base, _ = url("ok")
    async with AsyncCRSMClient(base) as client:
        async with await client.stream(PROMPT, max_tokens=6) as events:
            received = [event async for event in events]
        assembled = await client.generate(PROMPT, max_tokens=6, stream=True)
    with CRSMClient(base) as client:
        expected = list(client.stream(PROMPT, max_tokens=6))
    assert received == expected
    assert isinstance(received[2], InjectionEvent)
    assert assembled.text == PROMPT[::-1][:6]


async def test_async_read_timeout_and_give_up(url):
    base, _ = url("slow:3")
    async with AsyncCRSMClient(base, timeouts=Timeouts(read_s=0.3)) as client:
        with pytest.raises(APITimeoutError):
            await client.generate("abc")
    base, key = url("busy:100:0:503")
    async with AsyncCRSMClient(base, retry=RetryPolicy(max_retries=1, backoff_base_s=0.01)) as client:
        with pytest.raises(ServiceUnavailableError):
            await client.generate("abc")
    assert len(SCRIPT.hits[key]) == 2


async def test_async_many_concurrent_streams(url):
    base, key = url("ok")
    async with AsyncCRSMClient(base) as client:
        async def one(i: int) -> GenerateResult:
            return await client.generate(f"prompt {i:02d}", max_tokens=4, stream=True)
        results = await asyncio.gather(*(one(i) for i in range(16)))
    assert [r.text for r in results] == [f"prompt {i:02d}"[::-1][:4] for i in range(16)]
    assert len(SCRIPT.hits[key]) == 16


# ---------------------------------------------------------------- command line

def test_cli_streams_text_and_sends_deliberation(url):
    base, key = url("ok")
    out, err = io.StringIO(), io.StringIO()
    code = cli_main(["--url", base, "generate", PROMPT, "--stream", "--max-tokens", "6",
                     "--deliberation", "--lag", "2", "--no-use-suggestions", "--show-injections",
                     "--ignore-eos"], out=out, err=err)
    assert code == 0
    assert out.getvalue() == PROMPT[::-1][:6] + "\n"
    assert "outcome=applied" in err.getvalue()
    assert "finish_reason=length" in err.getvalue() and "completion_tokens=6" in err.getvalue()
    body = SCRIPT.hits[key][0][1]
    assert body["deliberation"] == {"enabled": True, "lag": 2, "use_suggestions": False}
    assert body["ignore_eos"] is True and body["max_tokens"] == 6


def test_cli_json_and_errors(url):
    base, _ = url("ok")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--url", base, "generate", "abc", "--json", "--seed", "1"], out=out, err=err) == 0
    assert json.loads(out.getvalue())["text"] == "cba"
    base, _ = url("bad")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--url", base, "generate", "abc"], out=out, err=err) == 1
    assert "HTTP 400" in err.getvalue() and out.getvalue() == ""
    base, _ = url("error-mid")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--url", base, "generate", "abcd", "--stream"], out=out, err=err) == 1
    assert out.getvalue() == "dc" and "model step failed" in err.getvalue()


def test_cli_refuses_planner_knobs_without_deliberation():
    with pytest.raises(SystemExit) as info:
        cli_main(["generate", "abc", "--lag", "3"], out=io.StringIO(), err=io.StringIO())
    assert info.value.code == 2


def test_cli_runs_as_a_module(url):
    base, _ = url("ok")
    done = subprocess.run([sys.executable, "-m", "clients.cli", "--url", base, "generate", "abc",
                           "--stream"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "cba\n"


# ---------------------------------------------------------------- examples with the openai client

def test_openai_examples_run(server_root, capsys):
    sys.path.insert(0, str(ROOT / "clients" / "examples"))
    try:
        import openai_chat
        import openai_completions
    finally:
        sys.path.pop(0)
    base = f"{server_root}/oa/v1"
    assert openai_completions.main("Once upon", base_url=base) == "nopu ecnO"
    body = SCRIPT.hits["openai-completions"][-1][1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "usage=" in capsys.readouterr().out
    assert openai_chat.main("What?", base_url=base) == "?tahW"
    assert SCRIPT.hits["openai-chat"][-1][1]["messages"][0]["role"] == "system"
