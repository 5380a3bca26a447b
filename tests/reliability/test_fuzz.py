"""Bad input: /v1/generate and /v1/completions fuzzed from the server's own OpenAPI schema.

Bodies come from four sources: the request schema itself (hypothesis-jsonschema), the same schema
narrowed to this server's limits (so that most bodies reach the engine), those bodies with one field
replaced by arbitrary JSON, and arbitrary JSON or bytes. Whatever arrives, the server
answers below 500 within a per-request timeout (a stream is read to its end and carries no
internal_error), and afterwards still serves a normal request. Generation is deterministic unless
CRSM_FUZZ_EXPLORE is set (then every run draws new examples)."""
from __future__ import annotations

import copy
import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis_jsonschema import from_schema

from harness import InProcessServer, MODEL, gauges, parse_sse, settings_for, wait_for

EXAMPLES = 120                # per endpoint: well under a minute for both on a 2-core machine
REQUEST_TIMEOUT_S = 15.0      # any single answer slower than this is a hang
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="CRSM_FUZZ_EXPLORE" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@pytest.fixture(scope="module")
def server(model_dir):
    # small limits: whatever the fuzzer gets accepted finishes in a few milliseconds
    live = InProcessServer(settings_for(model_dir, max_sessions=8, queue_size=16, max_prompt_tokens=64,
                                        max_new_tokens=8, default_max_tokens=4)).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


def request_schema(openapi: dict, path: str) -> dict:
    """The JSON schema of a path's request body, with the components its $refs point into."""
    body = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return {**body, "components": openapi["components"]}


PROMPT_CHARS, MAX_NEW_TOKENS, VOCAB = 64, 8, 260  # the fuzzed server's limits and the model's vocabulary
TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": VOCAB - 1}, "minItems": 1,
             "maxItems": PROMPT_CHARS}
NULL = {"type": "null"}


def within_limits(schema: dict) -> list[dict]:
    """The request schema narrowed to what this server accepts (its model name, prompt and token limits,
    no unsupported features, small plans; /v1/generate: a prompt or token ids, not both), so that most
    of these bodies reach the engine; the schema's other constraints (types, ranges, unknown fields)
    stay as they are."""
    narrowed = copy.deepcopy(schema)
    components = narrowed["components"]["schemas"]
    request = components[narrowed["$ref"].rsplit("/", 1)[1]]
    props = request["properties"]
    text = {"type": "string", "maxLength": PROMPT_CHARS}
    props["max_tokens"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS}, NULL]}
    if "token_ids" not in props:                  # /v1/completions
        props["model"] = {"const": MODEL}
        props["prompt"] = {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 3},
                                     TOKEN_IDS, {"type": "array", "items": TOKEN_IDS, "minItems": 1, "maxItems": 3}]}
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 4}
        for name in ("logprobs", "best_of", "suffix", "logit_bias"):
            props[name] = NULL
        for name in ("presence_penalty", "frequency_penalty"):
            props[name] = {"const": 0}
        return [narrowed]
    deliberation = components["DeliberationRequest"]["properties"]
    for name in ("lag", "simulations"):
        deliberation[name] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 8}, NULL]}
    variants = []
    for given_field, other, value in (("prompt", "token_ids", text), ("token_ids", "prompt", TOKEN_IDS)):
        variant = copy.deepcopy(narrowed)
        request = variant["components"]["schemas"][variant["$ref"].rsplit("/", 1)[1]]
        request["properties"][given_field] = value
        del request["properties"][other]
        request["required"] = sorted(set(request.get("required", [])) | {given_field})
        variants.append(variant)
    return variants


def bodies(openapi: dict, path: str) -> st.SearchStrategy:
    schema = request_schema(openapi, path)
    valid = from_schema(schema)
    served = st.one_of(*(from_schema(narrowed) for narrowed in within_limits(schema)))
    one_field_broken = served.filter(lambda b: isinstance(b, dict) and b).flatmap(
        lambda body: st.tuples(st.sampled_from(sorted(body)), JSON_VALUES).map(
            lambda item: {**body, item[0]: item[1]}))
    raw = st.binary(max_size=64) | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    return st.one_of(served, served, valid, one_field_broken, raw)


def send(url: str, path: str, body) -> tuple[int, str]:
    """POST a body (JSON value, or raw bytes) and read the whole answer; streams to their end."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.stream("POST", url + path, content=content, headers={"content-type": "application/json"},
                      timeout=REQUEST_TIMEOUT_S) as r:
        return r.status_code, r.read().decode(errors="replace")


def assert_no_server_error(status: int, text: str) -> None:
    assert status < 500, text[:500]
    if status == 200 and text.startswith(("event:", "data:")):
        for _, data in parse_sse(text.splitlines()):
            if data == "[DONE]":
                continue
            message = json.loads(data)
            assert not (isinstance(message, dict) and "error" in message
                        and message["error"].get("code") == "internal_error"), data


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])
def test_fuzzed_bodies_never_get_a_5xx(server, openapi, path, figures):
    statuses: dict[int, int] = {}

    @FUZZ
    @given(body=bodies(openapi, path))
    def check(body) -> None:
        status, text = send(server.url, path, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert_no_server_error(status, text)

    check()
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses  # both sides were reached
    # and the server still serves
    normal = {"/v1/generate": {"prompt": "still there?", "max_tokens": 4},
              "/v1/completions": {"model": MODEL, "prompt": "still there?", "max_tokens": 4}}[path]
    r = httpx.post(server.url + path, json=normal, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    wait_for(lambda: not any(gauges(server.url).values()), 10.0, what="no session or planner left")
    figures.record(f"fuzz {path}", examples=sum(statuses.values()),
                   statuses=dict(sorted(statuses.items())))
