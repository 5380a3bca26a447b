"""The streams' fast paths write what the general ones would (server/streaming.py, the per-token messages
of server/generate_api.py and server/openai_api.py): byte for byte, on texts JSON has to escape. And the
SSE response at the ASGI level: what it sends, and that a stream's cleanup has run when it returns."""
from __future__ import annotations

import asyncio
import json

import pytest

from crsm_core.engine import TokenEvent
from server.generate_api import token_message
from server.openai_api import _chunk_dict
from server.schemas import ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice, CompletionResponse
from server.streaming import MessageTemplate, SSEResponse, json_string, sse

TEXTS = ["", "a", " the", "é", "日本", "🙂", '"', "\\", "\n", "\r\n", "\t", "\x00", "\x1f", "\x7f", "\u2028",
         "</script>", "a\"b\\c\nd", "data: x\n\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_json_string_is_what_json_dumps_writes(text):
    assert json_string(text) == json.dumps(text)


@pytest.mark.parametrize("text", TEXTS)
def test_the_token_message_is_the_general_one(text):
    event = TokenEvent(token_id=200, text=text, position=12_345)
    assert token_message(event) == sse({"text": text, "token_id": 200, "position": 12_345}, "token")


def chat_render(include_usage: bool):
    def render(index: int, text: str) -> str:
        chunk = ChatCompletionChunk(id="chatcmpl-1", created=1_700_000_000, model="tiny",
                                    choices=[ChatChunkChoice(index=index, delta=ChatDelta(content=text))])
        return sse(_chunk_dict(chunk, include_usage))
    return render


def completion_render(include_usage: bool):
    def render(index: int, text: str) -> str:
        chunk = CompletionResponse(id="cmpl-1", created=1_700_000_000, model="tiny",
                                   choices=[CompletionChoice(index=index, text=text, finish_reason=None)])
        return sse(_chunk_dict(chunk, include_usage))
    return render


@pytest.mark.parametrize("make", [chat_render, completion_render], ids=["chat", "completions"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_a_template_fills_in_as_the_slow_path_renders(make, include_usage):
    render = make(include_usage)
    template = MessageTemplate(render)
    for index in (0, 1, 7, 123):
        for text in TEXTS:
            assert template(index, text) == render(index, text)


def test_a_rendering_without_both_holes_is_refused():
    with pytest.raises(ValueError):
        MessageTemplate(lambda index, text: sse({"index": index}))
    with pytest.raises(ValueError):
        MessageTemplate(lambda index, text: sse({"text": text, "index": index}))   # text first


# ---- the response -------------------------------------------------------------------------------------

async def test_the_response_sends_each_message_then_ends():
    async def messages():
        yield "event: a\ndata: 1\n\n"
        yield "data: é\n\n"

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.Event().wait()   # the client stays

    await SSEResponse(messages())({"type": "http"}, receive, send)
    assert sent[0] == {"type": "http.response.start", "status": 200, "headers": [
        (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
        (b"content-type", b"text/event-stream; charset=utf-8")]}
    assert [m["body"] for m in sent[1:]] == [b"event: a\ndata: 1\n\n", "data: é\n\n".encode(), b""]
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]


async def test_a_disconnect_ends_the_stream_and_its_cleanup_runs_before_the_response_returns():
    cleaned_up = asyncio.Event()
    gone = asyncio.Event()

    async def messages():
        try:
            yield "data: first\n\n"
            await asyncio.Event().wait()   # no more events come
            yield "data: never\n\n"
        finally:
            cleaned_up.set()   # where a stream cancels its sessions

    sent = []

    async def send(message):
        sent.append(message)
        if message.get("body"):
            gone.set()

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(SSEResponse(messages())({"type": "http"}, receive, send), timeout=10)
    assert cleaned_up.is_set()
    assert [m.get("body") for m in sent[1:]] == [b"data: first\n\n"]


async def test_a_failing_send_closes_the_stream_at_once_and_raises():
    cleaned_up = asyncio.Event()

    async def messages():
        try:
            while True:
                yield "data: x\n\n"
        finally:
            cleaned_up.set()

    async def send(message):
        if message["type"] == "http.response.body":
            raise OSError("the socket is gone")

    async def receive():
        await asyncio.Event().wait()

    with pytest.raises(OSError):
        await SSEResponse(messages())({"type": "http"}, receive, send)
    assert cleaned_up.is_set()
