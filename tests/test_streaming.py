"""The streams' fast paths write what the general ones would (server/streaming.py, the per-token messages
of server/generate_api.py and server/openai_api.py): byte for byte, on texts JSON has to escape."""
from __future__ import annotations

import json

import pytest

from crsm_core.engine import TokenEvent
from server.generate_api import token_message
from server.openai_api import _chunk_dict
from server.schemas import ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice, CompletionResponse
from server.streaming import MessageTemplate, json_string, sse

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
