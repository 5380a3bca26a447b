"""The OpenAI surface through the official `openai` client against a real uvicorn serving a tiny random
model: the fields a request may send are implemented or refused with a 400 naming them (docs/serving.md
has the table), and the endpoints OpenAI and vLLM clients call."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.checkpoint import load_pretrained
from crsm_core.config import tiny_config
from crsm_core.deliberation import DELIBERATION_FILE
from crsm_core.model import CRSMModel
from crsm_core.tokenizer import ByteTokenizer
from crsm_core.value import ValueHeads, ValueHeadsConfig
from server import schemas
from server.chat_template import CHAT_STOPS, render_chat
from server.openai_api import _chunk_dict
from server.settings import MAX_LAG, MAX_LATENESS
from test_server import MODEL, LiveServer, metrics, model_dir, one_torch_thread, settings_for  # noqa: F401


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
    (completion, dict(best_of=2, n=2), "best_of", "unsupported_parameter"),
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
    # vLLM's
    (completion, dict(extra_body={"guided_json": {"type": "object"}}), "guided_json", "unsupported_parameter"),
    (chat, dict(extra_body={"guided_choice": ["a", "b"]}), "guided_choice", "unsupported_parameter"),
    (completion, dict(extra_body={"use_beam_search": True}), "use_beam_search", "unsupported_parameter"),
    (completion, dict(extra_body={"prompt_logprobs": 1}), "prompt_logprobs", "unsupported_parameter"),
    (completion, dict(extra_body={"allowed_token_ids": [1, 2]}), "allowed_token_ids", "unsupported_parameter"),
    (chat, dict(extra_body={"add_generation_prompt": False}), "add_generation_prompt", "unsupported_parameter"),
    (chat, dict(extra_body={"chat_template": "{{ messages }}"}), "chat_template", "unsupported_parameter"),
])
def test_what_is_not_implemented_is_refused_naming_the_field(client, call, fields, param, code):
    with pytest.raises(openai.BadRequestError) as refused:
        call(client, **fields)
    error = refused.value
    assert error.status_code == 400
    assert set(error.body) == {"message", "type", "param", "code"} and error.body["type"] == "invalid_request_error"
    assert (error.param, error.code) == (param, code), error.body["message"]
    assert param.rsplit(".", 1)[-1].split("_")[0] in error.body["message"]


@pytest.mark.parametrize("field", ["top_k", "min_tokens"])
def test_counts_beyond_the_devices_integers_are_refused(client, field):
    # (a top_k of 7e24 used to leave its session waiting for ever: the sampler's int64 could not hold it)
    with pytest.raises(openai.BadRequestError) as refused:
        completion(client, extra_body={field: 7095998033949438729256960})
    assert (refused.value.param, refused.value.code) == (field, "less_than_equal")


def test_what_is_neutral_is_accepted(client):
    """The same fields at the values that ask for nothing are served."""
    assert completion(client, best_of=1, extra_body={"response_format": {"type": "text"}}).choices
    answer = chat(client, tools=[TOOL], tool_choice="none", response_format={"type": "text"}, modalities=["text"],
                  extra_body={"add_generation_prompt": True, "skip_special_tokens": True, "use_beam_search": False},
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


# ---- deliberation through extra_body ------------------------------------------------------------------

SYNCHRONOUS = {"enabled": True, "synchronous": True, "simulations": 4, "injection_rate": 0.5}


def test_deliberation_through_extra_body_is_the_native_one(client, live):
    prompt, seed = "think ahead", 5
    native = httpx.post(live.url + "/v1/generate", json={"prompt": prompt, "max_tokens": 8, "seed": seed,
                                                         "ignore_eos": True, "deliberation": SYNCHRONOUS}).json()
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=seed,
                                       extra_body={"ignore_eos": True, "deliberation": SYNCHRONOUS})
    [choice] = answer.choices
    # synchronous plans make the output a function of the request: the same text and counters
    assert choice.text == native["text"]
    outcomes = ("produced", "applied", "applied_late", "pruned", "vetoed", "diverged", "rejected", "simulations")
    assert {k: choice.model_extra["deliberation"][k] for k in outcomes} == {k: native["deliberation"][k] for k in outcomes}
    assert native["deliberation"]["produced"] >= 8

    replied = chat(client, max_tokens=4, extra_body={"deliberation": SYNCHRONOUS})
    assert replied.choices[0].model_extra["deliberation"]["produced"] >= 1
    assert chat(client).choices[0].model_extra["deliberation"] is None


@pytest.fixture(scope="module")
def trusting_live(tmp_path_factory):
    """A model whose random value heads are declared to rank candidates (so that they value plans, and
    disagree) and whose own veto threshold vetoes nothing."""
    directory = tmp_path_factory.mktemp("trusting-model")
    torch.manual_seed(0)
    backbone = MambaLM(tiny_config())
    heads = ValueHeads(dataclasses.replace(ValueHeadsConfig.for_model(backbone.config, hidden=8), beats_prior=True))
    model = CRSMModel(backbone, tokenizer=ByteTokenizer(), value_heads=heads.eval())
    model.save_pretrained(directory)
    model.close()
    (directory / DELIBERATION_FILE).write_text(json.dumps({"veto_threshold": 1e9}))
    server = LiveServer(settings_for(directory)).start()
    yield server
    server.stop()


def test_the_veto_threshold_of_a_request_decides_the_vetoes(trusting_live):
    client = openai.OpenAI(base_url=trusting_live.url + "/v1", api_key="unused", max_retries=0)

    def counters(**knobs) -> dict:
        deliberation = {**SYNCHRONOUS, **knobs}
        answer = completion(client, max_tokens=6, seed=1, extra_body={"ignore_eos": True, "deliberation": deliberation})
        return answer.choices[0].model_extra["deliberation"]

    strict, lenient, models_own = counters(veto_threshold=0.0, max_lag=8), counters(veto_threshold=1.0), counters()
    assert strict["vetoed"] == strict["produced"] > 0      # heads that disagree at all veto
    assert lenient["vetoed"] == models_own["vetoed"] == 0 and lenient["produced"] > 0


@pytest.mark.parametrize("field, value", [("veto_threshold", 1.5), ("veto_threshold", -0.1), ("max_lag", 129),
                                          ("max_lag", -1), ("simulations", 257), ("wild", 1)])
def test_deliberation_settings_are_bounded(client, field, value):
    for call in (completion, chat):
        with pytest.raises(openai.BadRequestError) as refused:
            call(client, extra_body={"deliberation": {"enabled": True, field: value}})
        assert refused.value.param == f"deliberation.{field}"


# ---- vLLM's sampling fields ---------------------------------------------------------------------------

PROMPT = "Once upon a time"
EOS = ByteTokenizer.eos_id


@pytest.fixture(scope="module")
def backbone(model_dir):  # noqa: F811
    """The served weights on the reference backbone, outside the server."""
    return load_pretrained(model_dir, device="cpu").eval()


def reference_greedy(backbone, prompt: list[int], n: int, adjust=lambda logits, out: logits) -> list[int]:
    """Greedy decoding one token at a time, `adjust(logits [V], tokens so far)` applied before each argmax:
    an independent host-side statement of what a field does."""
    out: list[int] = []
    with torch.no_grad():
        state = backbone.allocate_state(1)
        logits = backbone.prefill(torch.tensor([prompt]), state)[0]
        for _ in range(n):
            out.append(int(adjust(logits.float().clone(), out).argmax()))
            logits = backbone.step(torch.tensor([out[-1]]), state)[0]
    return out


def served(client, live, max_tokens: int, **fields) -> tuple[list[int], object]:
    """One greedy request on both APIs with the same fields: the native answer's token ids, and the
    openai client's answer (whose text must be the native one's)."""
    fields = {"temperature": 0.0, **fields}
    body = {"prompt": PROMPT, "max_tokens": max_tokens, **fields}
    native = httpx.post(live.url + "/v1/generate", json=body)
    assert native.status_code == 200, native.text
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens,
                                       extra_body=fields)
    assert answer.choices[0].text == native.json()["text"]
    return native.json()["token_ids"], answer


def test_repetition_presence_and_frequency_penalties_and_logit_bias(client, live, backbone):
    prompt, n = list(PROMPT.encode()), 24
    plain = reference_greedy(backbone, prompt, n)

    def repetition(p):
        def adjust(logits, out):
            for t in set(prompt + out):
                logits[t] = logits[t] / p if logits[t] > 0 else logits[t] * p
            return logits
        return adjust

    def presence(p):
        def adjust(logits, out):
            for t in set(out):
                logits[t] -= p
            return logits
        return adjust

    def frequency(p):
        def adjust(logits, out):
            for t in out:
                logits[t] -= p
            return logits
        return adjust

    favoured, banned = ord("e"), plain[0]

    def bias(logits, out):
        logits[favoured] += 5.0
        logits[banned] -= 100.0
        return logits

    cases = [({"repetition_penalty": 1.8}, repetition(1.8)), ({"presence_penalty": 1.5}, presence(1.5)),
             ({"frequency_penalty": 0.7}, frequency(0.7)), ({"frequency_penalty": -0.5}, frequency(-0.5)),
             ({"logit_bias": {str(favoured): 5.0, str(banned): -100.0}}, bias)]
    for fields, adjust in cases:
        expected = reference_greedy(backbone, prompt, n, adjust)
        assert expected != plain, fields          # the field changes this output
        tokens, answer = served(client, live, n, ignore_eos=True, **fields)
        assert tokens == expected, fields
        assert answer.usage.completion_tokens == n
    # the bias as OpenAI's clients send it (a top-level field) and in a batch beside an unbiased request
    biased = client.completions.create(model=MODEL, prompt=[PROMPT, PROMPT], max_tokens=n, temperature=0.0,
                                       logit_bias={str(favoured): 5.0, str(banned): -100.0},
                                       extra_body={"ignore_eos": True})
    assert biased.choices[0].text == biased.choices[1].text == ByteTokenizer().decode(
        reference_greedy(backbone, prompt, n, bias))


def test_min_tokens_holds_back_eos_and_stop_token_ids(client, live):
    eos_first = {"logit_bias": {str(EOS): 100.0}}     # eos is then every step's best token
    tokens, answer = served(client, live, 20, **eos_first)
    assert tokens == [EOS] and answer.choices[0].finish_reason == "stop"
    tokens, answer = served(client, live, 20, min_tokens=5, **eos_first)
    assert len(tokens) == 6 and tokens[-1] == EOS and EOS not in tokens[:5]
    assert (answer.usage.completion_tokens, answer.choices[0].finish_reason) == (6, "stop")
    # stop_token_ids end it as eos does; min_tokens holds them back too
    stopper = {"logit_bias": {"120": 100.0}, "stop_token_ids": [120]}     # "x"
    tokens, answer = served(client, live, 20, ignore_eos=True, **stopper)
    assert tokens == [120] and answer.choices[0].text == "" and answer.choices[0].finish_reason == "stop"
    tokens, answer = served(client, live, 20, ignore_eos=True, min_tokens=3, **stopper)
    assert len(tokens) == 4 and tokens[-1] == 120 and 120 not in tokens[:3]
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == 4
    # min_tokens over max_tokens: no stop at all before max_tokens
    tokens, answer = served(client, live, 3, min_tokens=10, **eos_first)
    assert EOS not in tokens and answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3


def test_stop_token_ids_end_the_generation_at_that_token(client, live, backbone):
    prompt, n = list(PROMPT.encode()), 24
    plain = reference_greedy(backbone, prompt, n)
    k = next(i for i in range(2, n) if plain[i] not in plain[:i])
    tokens, answer = served(client, live, n, ignore_eos=True, stop_token_ids=[plain[k], 259])
    assert tokens == plain[:k + 1] and answer.choices[0].finish_reason == "stop"
    # its text is the text before it
    assert answer.choices[0].text == completion(client, prompt=PROMPT, max_tokens=k, temperature=0.0,
                                                extra_body={"ignore_eos": True}).choices[0].text


def test_include_stop_str_in_output(client):
    base = dict(prompt=PROMPT, max_tokens=40, seed=2, extra_body={"ignore_eos": True})
    full = completion(client, **base).choices[0].text
    stop = next(full[i:i + 2] for i in range(len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    cut = completion(client, **base, stop=[stop]).choices[0]
    kept = completion(client, **{**base, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
                      stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == cut.text + stop
    # streamed alike
    chunks = completion(client, **{**base, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
                        stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in chunks) == kept.text


def test_min_p_keeps_only_the_likely_tokens(client, live, backbone):
    prompt, n = list(PROMPT.encode()), 24
    sampled = dict(temperature=1.0, seed=9, ignore_eos=True)
    free, _ = served(client, live, n, **sampled)
    assert free != reference_greedy(backbone, prompt, n)
    # min_p 1: only the most likely token is left, whatever the seed
    only_best, _ = served(client, live, n, min_p=1.0, **sampled)
    assert only_best == reference_greedy(backbone, prompt, n)
    # min_p 0.5: every drawn token is at least half as likely as the most likely one at its position
    tokens, _ = served(client, live, n, min_p=0.5, **sampled)
    assert tokens != only_best
    with torch.no_grad():
        state = backbone.allocate_state(1)
        probs = torch.softmax(backbone.prefill(torch.tensor([prompt]), state)[0].float(), dim=-1)
        for token in tokens:
            assert probs[token] >= 0.5 * probs.max() * (1 - 1e-4)
            probs = torch.softmax(backbone.step(torch.tensor([token]), state)[0].float(), dim=-1)


# ---- logprobs -----------------------------------------------------------------------------------------

def reference_logprobs(backbone, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """log_softmax of the reference backbone's logits at each generated position: [V] per token."""
    out = []
    with torch.no_grad():
        state = backbone.allocate_state(1)
        logits = backbone.prefill(torch.tensor([prompt]), state)[0]
        for token in tokens:
            out.append(torch.log_softmax(logits.float(), dim=-1))
            logits = backbone.step(torch.tensor([token]), state)[0]
    return out


SAMPLED = dict(temperature=0.7, seed=3)   # values of the raw distribution, not the tempered one
TOL = 1e-4                                # fp32 on the CPU: chunked prefill against one whole prefill


def test_completion_logprobs_are_the_models(client, live, backbone):
    n, k = 12, 3
    native = httpx.post(live.url + "/v1/generate", json={"prompt": PROMPT, "max_tokens": n, "ignore_eos": True,
                                                         **SAMPLED}).json()
    expected = reference_logprobs(backbone, list(PROMPT.encode()), native["token_ids"])
    answer = completion(client, prompt=PROMPT, max_tokens=n, logprobs=k, extra_body={"ignore_eos": True}, **SAMPLED)
    [choice] = answer.choices
    assert choice.text == native["text"]
    lp = choice.logprobs
    tokenizer = ByteTokenizer()
    assert lp.tokens == [tokenizer.decode([t]) for t in native["token_ids"]]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token, got, top, ref in zip(native["token_ids"], lp.token_logprobs, lp.top_logprobs, expected):
        assert abs(got - float(ref[token])) < TOL
        best = ref.topk(k)
        # the k best by their text, and the sampled token's (as OpenAI: up to k + 1); tokens of one text
        # (bytes that are not a character alone) are listed once, with the best of their logprobs
        texts: dict[str, float] = {}
        for i, v in [*zip(best.indices.tolist(), best.values.tolist()), (token, float(ref[token]))]:
            texts[tokenizer.decode([i])] = max(v, texts.get(tokenizer.decode([i]), v))
        assert top.keys() == texts.keys()
        assert all(abs(top[t] - texts[t]) < TOL for t in texts)
    # each offset is where the token's text starts (texts released so far)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # streamed: every token once, with the same values
    chunks = list(completion(client, prompt=PROMPT, max_tokens=n, logprobs=k, stream=True,
                             extra_body={"ignore_eos": True}, **SAMPLED))
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    # without logprobs: none
    assert completion(client).choices[0].logprobs is None


def test_chat_logprobs_are_the_models(client, live, backbone):
    n, k = 10, 5
    prompt = render_chat([("user", "hi")])
    native = httpx.post(live.url + "/v1/generate", json={"prompt": prompt, "max_tokens": n, "ignore_eos": True,
                                                         "stop": list(CHAT_STOPS), **SAMPLED}).json()
    expected = reference_logprobs(backbone, list(prompt.encode()), native["token_ids"])
    tokenizer = ByteTokenizer()
    answer = chat(client, max_tokens=n, logprobs=True, top_logprobs=k, extra_body={"ignore_eos": True}, **SAMPLED)
    content = answer.choices[0].logprobs.content
    assert answer.choices[0].message.content == native["text"] and len(content) == len(native["token_ids"])
    for token, entry, ref in zip(native["token_ids"], content, expected):
        text = tokenizer.decode([token])
        assert (entry.token, entry.bytes) == (text, list(text.encode()))
        assert abs(entry.logprob - float(ref[token])) < TOL
        best = ref.topk(k)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([int(i)]) for i in best.indices]
        assert torch.allclose(torch.tensor([t.logprob for t in entry.top_logprobs]), best.values, atol=TOL)
    chunks = list(chat(client, max_tokens=n, logprobs=True, top_logprobs=k, stream=True,
                       extra_body={"ignore_eos": True}, **SAMPLED))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    # logprobs alone: no alternatives; top_logprobs without logprobs is refused, as OpenAI does
    plain = chat(client, max_tokens=3, logprobs=True).choices[0].logprobs.content
    assert len(plain) == 3 and all(e.top_logprobs == [] for e in plain)
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, top_logprobs=2)
    assert refused.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as refused:
        completion(client, logprobs=2, echo=True)
    assert (refused.value.param, refused.value.code) == ("logprobs", "unsupported_parameter")


# ---- metrics ------------------------------------------------------------------------------------------

def test_the_schema_and_the_docs_are_counted_under_their_routes(live):
    for path in ("/openapi.json", "/docs", "/version"):
        assert httpx.get(live.url + path).status_code == 200
    counted = {labels for name, labels in metrics(live.url) if name == "crsm_requests_total"}
    for path in ("/openapi.json", "/docs", "/version"):
        assert (("endpoint", path), ("status", "200")) in counted


def test_the_planner_lag_buckets_reach_past_the_latest_plan(live):
    # a plan resolves at most its lead (MAX_LAG) plus max_lag (MAX_LATENESS) plus one positions late
    bounds = sorted(float(dict(labels)["le"]) for name, labels in metrics(live.url)
                    if name == "crsm_planner_lag_tokens_bucket")
    assert bounds[-1] == float("inf") and bounds[-2] > MAX_LAG + MAX_LATENESS + 1


def test_the_version_of_a_checkout_that_is_not_installed(monkeypatch):
    """Run from a checkout on PYTHONPATH (no package metadata), the server still knows its version: it
    failed to import there before."""
    import tomllib

    from server import runtime

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    pyproject = tomllib.loads((Path(runtime.__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert runtime._server_version() == pyproject["project"]["version"]


# ---- the wire -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, model, include_usage", [
    ("/v1/chat/completions", "ChatCompletionChunk", False), ("/v1/chat/completions", "ChatCompletionChunk", True),
    ("/v1/completions", "CompletionResponse", False), ("/v1/completions", "CompletionResponse", True)])
def test_streamed_chunks_are_written_as_their_schema_renders_them(live, path, model, include_usage):
    """Every chunk on the wire, byte for byte, is its schema's rendering of itself (the per-token chunks
    are written from a template: server/streaming.py)."""
    prompt = {"messages": MESSAGES} if path.startswith("/v1/chat") else {"prompt": "hi"}
    body = {"model": MODEL, **prompt, "max_tokens": 24, "n": 2, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": include_usage}}
    raw = httpx.post(live.url + path, json=body, timeout=60).text
    messages = raw.split("\n\n")
    assert messages[-2:] == ["data: [DONE]", ""]
    chunks = [m.removeprefix("data: ") for m in messages[:-2]]
    assert len(chunks) > 4
    for i, chunk in enumerate(chunks):
        parsed = getattr(schemas, model).model_validate_json(chunk)
        usage_chunk = include_usage and i == len(chunks) - 1
        expected = parsed.model_dump() if usage_chunk else _chunk_dict(parsed, include_usage)
        assert chunk == json.dumps(expected, separators=(",", ":"))
