"""The OpenAI surface through the official `openai` client against a real uvicorn serving a tiny random
model: the fields a request may send are implemented or refused with a 400 naming them (docs/serving.md
has the table), and the endpoints OpenAI and vLLM clients call."""
from __future__ import annotations

import importlib.metadata

import httpx
import openai
import pytest

from test_server import MODEL, LiveServer, model_dir, one_torch_thread, settings_for  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def live(model_dir):  # noqa: F811
    server = LiveServer(settings_for(model_dir)).start()
    yield server
    server.stop()


@pytest.fixture()
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


MESSAGES = [{"role": "user", "content": "hi"}]


def completion(client: openai.OpenAI, **fields):
    return client.completions.create(**{"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields})


def chat(client: openai.OpenAI, **fields):
    return client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields})


# ---- refusals -----------------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize("call, fields, param, code", [
    (completion, dict(suffix="tail"), "suffix", "unsupported_parameter"),
    (completion, dict(best_of=3, n=2), "best_of", "unsupported_parameter"),
    (completion, dict(best_of=1, n=2), "best_of", "invalid_value"),
    (completion, dict(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (completion, dict(extra_body={"response_format": {"type": "json_object"}}), "response_format",
     "unsupported_parameter"),
    (chat, dict(response_format={"type": "json_object"}), "response_format", "unsupported_parameter"),
    (chat, dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
     "response_format", "unsupported_parameter"),
    (chat, dict(tools=[TOOL]), "tools", "unsupported_parameter"),
    (chat, dict(tools=[TOOL], tool_choice="auto"), "tool_choice", "unsupported_parameter"),
    (chat, dict(tool_choice="required"), "tool_choice", "unsupported_parameter"),
    (chat, dict(functions=[TOOL["function"]]), "functions", "unsupported_parameter"),
    (chat, dict(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (chat, dict(messages=[{"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]}]),
     "messages.0.content", "unsupported_parameter"),
    (chat, dict(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "3",
                                                              "tool_call_id": "c1"}]),
     "messages.1.role", "unsupported_parameter"),
    (chat, dict(messages=[{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}]),
     "messages.0.tool_calls", "unsupported_parameter"),
    (chat, dict(modalities=["text", "audio"]), "modalities", "unsupported_parameter"),
    (chat, dict(audio={"voice": "alloy", "format": "wav"}), "audio", "unsupported_parameter"),
])
def test_what_is_not_implemented_is_refused_naming_the_field(client, call, fields, param, code):
    with pytest.raises(openai.BadRequestError) as refused:
        call(client, **fields)
    error = refused.value
    assert error.status_code == 400
    assert set(error.body) == {"message", "type", "param", "code"} and error.body["type"] == "invalid_request_error"
    assert (error.param, error.code) == (param, code), error.body["message"]
    assert param.rsplit(".", 1)[-1].split("_")[0] in error.body["message"]


def test_what_is_neutral_is_accepted(client):
    """The same fields at the values that ask for nothing are served."""
    assert completion(client, best_of=2, n=2, extra_body={"response_format": {"type": "text"}}).choices
    answer = chat(client, tools=[TOOL], tool_choice="none", response_format={"type": "text"}, modalities=["text"],
                  messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert answer.choices[0].message.role == "assistant"


def test_an_unknown_model_is_404_model_not_found(client):
    for call in (completion, chat):
        with pytest.raises(openai.NotFoundError) as missing:
            call(client, model="gpt-4")
        assert (missing.value.status_code, missing.value.code, missing.value.param) == (404, "model_not_found", "model")


# ---- endpoints ----------------------------------------------------------------------------------------

def test_models_retrieve_and_list_carry_vllms_fields(client, live, model_dir):  # noqa: F811
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "crsm")
    # settings_for: max_prompt_tokens 512, max_new_tokens ENDLESS
    assert card.model_extra == {"root": str(model_dir), "parent": None, "max_model_len": 512 + 100_000}
    [listed] = client.models.list().data
    assert listed == card
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")


def test_tokenize_and_detokenize_round_trip(live):
    r = httpx.post(live.url + "/tokenize", json={"model": MODEL, "prompt": "héllo", "return_token_strs": True})
    assert r.status_code == 200, r.text
    tokenized = r.json()
    assert tokenized["tokens"] == list("héllo".encode()) and tokenized["count"] == 6  # the byte tokenizer
    assert tokenized["max_model_len"] == 512 + 100_000 and len(tokenized["token_strs"]) == 6
    back = httpx.post(live.url + "/detokenize", json={"model": MODEL, "tokens": tokenized["tokens"]}).json()
    assert back == {"prompt": "héllo"}

    # messages are rendered as chat completions renders them: the counts agree with its usage
    chat_prompt = httpx.post(live.url + "/tokenize", json={"messages": MESSAGES}).json()
    answer = openai.OpenAI(base_url=live.url + "/v1", api_key="unused").chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=1)
    assert chat_prompt["count"] == answer.usage.prompt_tokens and chat_prompt["token_strs"] is None

    for path, body, param in [("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
                              ("/tokenize", {"prompt": "a", "messages": MESSAGES}, None),
                              ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model")]:
        r = httpx.post(live.url + path, json=body)
        assert r.status_code == (404 if param == "model" else 400) and r.json()["error"]["param"] == param


def test_version_and_head_health(live):
    assert httpx.get(live.url + "/version").json() == {"version": importlib.metadata.version("crsm-server")}
    head = httpx.head(live.url + "/health")
    assert head.status_code == 200 and head.content == b""
