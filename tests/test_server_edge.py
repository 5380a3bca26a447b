"""The server's door (server/edge.py) against a real uvicorn on 127.0.0.1: the API key (with the official
openai client), the body limit and deadline, the head deadline and the connection cap (raw sockets), lone
surrogates, and the small things at the edge (strict types, JSON errors, what error bodies echo)."""
from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from typing import Iterator

import httpx
import openai
import pytest

from crsm_core.deliberation import DeliberationConfig
from crsm_core.tokenizer import ByteTokenizer
from server.runtime import LONG_TEXT_CHARS, load_model
from server.settings import RequestDefaults, ServerSettings
from test_server import (ENDLESS, MODEL, LiveServer, gauge, live, model_dir, one_torch_thread,  # noqa: F401 (fixtures)
                         settings_for, wait_for)

KEY = "sk-edge-test-key"
SMALL_BODY = 64 * 1024
TIMEOUT_S = 1.0   # the head and body deadlines of the guarded server
SOCKET_WAIT_S = 30.0  # how long a raw socket waits for the server; far beyond every deadline above


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded(model_dir, request) -> Iterator[LiveServer]:
    """A server with every door limit set low: an API key, a 64 KiB body, 1 s deadlines, 8 connections; with
    each of uvicorn's protocols (the guards are written for both: server/edge.py)."""
    server = LiveServer(settings_for(model_dir, api_key=KEY, max_body_bytes=SMALL_BODY, header_timeout_s=TIMEOUT_S,
                                     body_timeout_s=TIMEOUT_S, keep_alive_s=TIMEOUT_S, max_connections=8,
                                     http_protocol=request.param)).start()
    yield server
    server.stop()


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=SOCKET_WAIT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def request_head(path: str, content_length: int | None = None, chunked: bool = False, key: bool = True) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json"]
    if key:
        lines.append(f"authorization: Bearer {KEY}")
    if content_length is not None:
        lines.append(f"content-length: {content_length}")
    if chunked:
        lines.append("transfer-encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def openai_error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---- item 7: the API key --------------------------------------------------------------------------------

def test_with_an_api_key_the_openai_client_needs_it(guarded):
    right = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    answer = right.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0.0)
    assert answer.usage.completion_tokens == 3
    assert [m.id for m in right.models.list()] == [MODEL]
    wrong = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("headers", [{}, {"authorization": KEY}, {"authorization": f"Basic {KEY}"},
                                     {"authorization": f"Bearer {KEY[:-1]}"}, {"authorization": "Bearer x"}])
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/status", "/v1/models", "/openapi.json"])
def test_without_the_right_key_the_api_is_401_in_openai_shape(guarded, path, headers):
    r = httpx.request("POST" if path == "/v1/generate" else "GET", guarded.url + path, headers=headers,
                      json={"prompt": "hi", "max_tokens": 1} if path == "/v1/generate" else None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = openai_error(r)
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]


def test_with_an_api_key_probes_metrics_and_the_page_stay_open(guarded):
    for path in ("/health", "/ready", "/metrics", "/ui/", "/ui/app.js"):
        assert httpx.get(guarded.url + path).status_code == 200, path
    assert httpx.get(guarded.url + "/").status_code == 307
    r = httpx.post(guarded.url + "/v1/generate", json={"prompt": "hi", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_the_api_key_comes_from_the_environment_and_is_not_shown():
    settings = ServerSettings.from_env({"CRSM_API_KEY": KEY})
    assert settings.api_key == KEY and KEY not in repr(settings)
    assert ServerSettings.from_env({}).api_key is None


# ---- item 4: the body limit, and long prompts off the event loop ------------------------------------------

def test_a_content_length_over_the_limit_is_413_before_the_body_is_read(guarded):
    with connect(guarded.url) as sock:
        sock.sendall(request_head("/v1/generate", content_length=100 * 2**20) + b'{"prompt": "' + b"a" * 1000)
        status, headers, body = parse_response(read_until_closed(sock))  # answered with 100 MB still unsent
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "body_too_large"
    # counted, as a request refused before routing (finding its route raised here once)
    metrics = httpx.get(guarded.url + "/metrics").text
    assert re.search(r'crsm_requests_total\{endpoint="unmatched",status="413"\} [1-9]', metrics), metrics[-2000:]


def test_a_chunked_body_growing_over_the_limit_is_413_before_it_ends(guarded):
    with connect(guarded.url) as sock:
        sock.sendall(request_head("/v1/completions", chunked=True))
        chunk = b"a" * 8192
        for _ in range(SMALL_BODY // len(chunk) + 1):  # just over the limit; the final chunk is never sent
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, _, body = parse_response(read_until_closed(sock))
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"


def test_a_body_at_the_limit_is_served(guarded):
    prompt = "a" * 100
    body = json.dumps({"prompt": prompt, "max_tokens": 1})
    padded = body[:-1] + " " * (SMALL_BODY - len(body)) + "}"  # exactly the limit: whitespace is valid JSON
    r = httpx.post(guarded.url + "/v1/generate", content=padded, headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 200, r.text


class ThreadRecordingTokenizer(ByteTokenizer):
    """The byte tokenizer, recording the thread each encode ran on."""

    def __init__(self) -> None:
        self.threads: list[tuple[int, int]] = []  # (characters, thread id)

    def encode(self, text: str) -> list[int]:
        self.threads.append((len(text), threading.get_ident()))
        return super().encode(text)


def test_long_prompts_are_tokenized_off_the_event_loop(model_dir):
    tokenizer = ThreadRecordingTokenizer()

    def loader(settings: ServerSettings):
        model = load_model(settings)
        model.tokenizer = tokenizer
        return model

    server = LiveServer(settings_for(model_dir, max_prompt_tokens=4 * LONG_TEXT_CHARS), loader).start()
    try:
        loop_thread = server.thread.ident
        long = "b" * (2 * LONG_TEXT_CHARS)
        for path, body in (("/v1/generate", {"prompt": long}),
                           ("/v1/completions", {"model": MODEL, "prompt": [long, "short"]}),
                           ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": long}]}),
                           ("/v1/generate", {"prompt": "short"})):
            r = httpx.post(server.url + path, json={**body, "max_tokens": 1}, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        server.stop()
    long_ones = [thread for chars, thread in tokenizer.threads if chars > LONG_TEXT_CHARS]
    assert len(long_ones) == 3 and loop_thread not in long_ones
    assert tokenizer.threads[-1] == (len("short"), loop_thread)  # a short prompt is not worth a thread


# ---- item 5: slow clients -----------------------------------------------------------------------------

def test_a_head_that_never_ends_is_408_after_the_header_timeout(guarded):
    with connect(guarded.url) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ")
        start = time.monotonic()
        status, headers, body = parse_response(read_until_closed(sock))
        waited = time.monotonic() - start
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "header_timeout"
    assert waited < SOCKET_WAIT_S  # closed by the server, not by the test's socket timeout


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(guarded):
    with connect(guarded.url) as sock:
        assert read_until_closed(sock) == b""


def test_a_head_dribbled_byte_by_byte_is_cut_off(guarded):
    """Each byte in time for an idle timeout, but the head as a whole not in time."""
    head = request_head("/v1/generate", content_length=2)
    with connect(guarded.url) as sock:
        for byte in head[:-4]:
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], TIMEOUT_S / 8)[0]:  # answered: stop writing to a closing socket
                break
        status, _, _ = parse_response(read_until_closed(sock))
    assert status == 408


def test_a_body_shorter_than_its_content_length_is_408_after_the_body_timeout(guarded):
    with connect(guarded.url) as sock:
        sock.sendall(request_head("/v1/generate", content_length=100) + b'{"prompt": "hi"')
        status, headers, body = parse_response(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "body_timeout" and "15 bytes received" in error["message"]


def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_s(guarded):
    with connect(guarded.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        status, _, _ = parse_response(read_until_closed(sock))  # then closed: the keep-alive ran out
    assert status == 200


def test_connections_over_max_connections_are_answered_503_and_closed(guarded):
    open_connections = guarded.server.server_state.connections
    deadline = time.monotonic() + SOCKET_WAIT_S
    while open_connections:  # earlier clients' idle connections: closed after keep_alive_s
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sockets = [connect(guarded.url) for _ in range(9)]  # at once: well within the 1 s head deadline
    try:
        status, headers, body = parse_response(read_until_closed(sockets[-1]))
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "server_overloaded"
        # the 8 within the cap were kept until their head deadline, then closed without a word
        assert [read_until_closed(sock) for sock in sockets[:-1]] == [b""] * 8
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(guarded.url + "/health").status_code == 200  # and the server serves again


# ---- pipelined requests ---------------------------------------------------------------------------------
# Requests sent behind one still being answered, on one connection. httptools parses them at once and
# queues them (reading paused while one waits); h11 leaves them unparsed until the response is done.

def generate_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return request_head("/v1/generate", content_length=len(data)) + data


STREAM = {"prompt": "a", "max_tokens": ENDLESS, "ignore_eos": True, "stream": True}


def read_tokens(sock: socket.socket, n: int) -> bytes:
    data = b""
    while data.count(b"event: token") < n:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data.count(b'event: token')} tokens: {data[-300:]!r}"
        data += chunk
    return data


def test_a_client_that_leaves_with_a_request_pipelined_behind_a_stream_frees_its_session(guarded):
    with connect(guarded.url) as sock:
        sock.sendall(generate_request(STREAM) + generate_request({"prompt": "b", "max_tokens": 2}))
        read_tokens(sock, 3)
        assert gauge(guarded.url, "crsm_running_sessions") == 1
    wait_for(lambda: gauge(guarded.url, "crsm_running_sessions") == 0, 10.0)


def test_a_pipelined_head_the_server_has_not_read_yet_is_not_cut_off_by_the_head_deadline(guarded):
    """Behind a queued request the server reads nothing until the responses before it are done, so the
    rest of a head sent in time waits unread; its deadline is not the client's fault, and a 408 written
    then would land inside the running stream's body."""
    third = generate_request({"prompt": "c", "max_tokens": 2})
    with connect(guarded.url) as sock:
        sock.sendall(generate_request(STREAM))
        read_tokens(sock, 1)
        sock.sendall(generate_request({"prompt": "b", "max_tokens": 2}) + third[:20])
        sock.sendall(third[20:])   # in time, but not read while the second request waits
        streamed = b""
        until = time.monotonic() + 3 * TIMEOUT_S
        while time.monotonic() < until:
            chunk = sock.recv(65536)
            assert chunk, f"the stream was cut off: {streamed[-300:]!r}"
            streamed += chunk
    assert b"HTTP/1.1 408" not in streamed
    wait_for(lambda: gauge(guarded.url, "crsm_running_sessions") == 0, 10.0)


def test_crsm_serve_has_the_door_settings():
    names = {"api_key", "max_body_bytes", "header_timeout_s", "body_timeout_s", "keep_alive_s", "max_connections",
             "default_chat_max_tokens"}
    defaults = ServerSettings()
    assert names <= set(defaults.flat())
    assert defaults.max_body_bytes == 4 * 2**20 and defaults.keep_alive_s == 65 and defaults.max_connections == 1024


# ---- item 3: lone surrogates ---------------------------------------------------------------------------

SURROGATE_BODIES = [
    ("/v1/generate", '{"prompt": "abc\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/generate", '{"prompt": "abc", "stop": ["\\udfff"], "max_tokens": 2}', "stop.0"),
    ("/v1/completions", '{"model": "tiny", "prompt": "abc\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\ud800x"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "abc", "max_tokens": 2}', "model"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a\\udc00"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": '
                             '[{"type": "text", "text": "\\ud83d"}]}]}', "messages.0.content.0.text"),
]


@pytest.mark.parametrize("path, body, param", SURROGATE_BODIES)
def test_a_lone_surrogate_is_400_naming_the_field(live, path, body, param):
    r = httpx.post(live.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    error = openai_error(r)
    assert error["code"] == "invalid_unicode" and error["param"] == param
    assert "lone UTF-16 surrogate" in error["message"]


def test_a_surrogate_pair_is_text(live):
    """An escaped character outside the BMP (a valid pair) is served: 4 UTF-8 bytes with the byte tokenizer."""
    r = httpx.post(live.url + "/v1/generate", content='{"prompt": "a\\ud83d\\ude00", "max_tokens": 1}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5


# ---- item 9: the small things at the edge ---------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/generate", {"prompt": "a", "max_tokens": "16"}, "max_tokens"),
    ("/v1/generate", {"prompt": "a", "max_tokens": True}, "max_tokens"),
    ("/v1/generate", {"token_ids": [72, True], "max_tokens": 2}, "token_ids.1"),
    ("/v1/generate", {"prompt": "a", "seed": True}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "16"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": True}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "seed": False}, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                              "max_completion_tokens": "4"}, "max_completion_tokens"),
])
def test_integers_are_strict(live, path, body, param):
    r = httpx.post(live.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = openai_error(r)
    assert error["param"] == param and error["code"] == "int_type"


def test_an_integral_float_is_the_integer_json_schema_says_it_is(live):
    """16.0 is an integer in JSON Schema, so /openapi.json's integer fields take it (schemathesis sends such
    bodies, tests/test_openapi.py); 16.5 is refused."""
    r = httpx.post(live.url + "/v1/generate", json={"prompt": "a", "max_tokens": 3.0, "top_k": 2.0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    r = httpx.post(live.url + "/v1/generate", json={"prompt": "a", "max_tokens": 3.5}, timeout=60)
    assert r.status_code == 400 and openai_error(r)["param"] == "max_tokens"


def test_a_token_id_list_with_a_boolean_is_not_a_prompt_of_ids(live):
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": [72, True], "max_tokens": 2})
    assert r.status_code == 400 and openai_error(r)["param"].startswith("prompt")


@pytest.mark.parametrize("content, content_type", [
    (b'{"prompt": "a",', "application/json"),          # cut short
    (b'{"prompt": "\xff\xfe"}', "application/json"),   # not UTF-8
    (b'[1, 2]', "application/json"),                   # not an object
    (b'"hello"', "application/json"),
    (b'{"prompt": "a"}', None),                       # no content type: not read as JSON
    (b'{"prompt": "a"}', "text/plain"),
])
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_body_that_is_no_json_object_is_400_json_invalid(live, path, content, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    r = httpx.post(live.url + path, content=content, headers=headers)
    assert r.status_code == 400, r.text
    error = openai_error(r)
    assert error["code"] == "json_invalid" and error["message"].startswith("the request body")


def test_a_huge_model_name_is_not_echoed_back_whole(live):
    name = "m" * 1_000_000
    r = httpx.post(live.url + "/v1/completions", json={"model": name, "prompt": "a", "max_tokens": 1}, timeout=60)
    assert r.status_code == 404   # an unknown model, as OpenAI answers
    error = openai_error(r)
    assert error["code"] == "model_not_found" and len(r.content) < 1000
    assert "(1000000 characters)" in error["message"] and repr(MODEL) in error["message"]


def test_chat_without_max_tokens_takes_the_chat_default(model_dir):
    server = LiveServer(settings_for(model_dir, max_new_tokens=64, default_chat_max_tokens=5)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story"}],
                                                temperature=0.0, extra_body={"ignore_eos": True})
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 5
        # the chat default is kept within max_new_tokens
        assert server.server.runtime.defaults.chat_max_tokens == 5
    finally:
        server.stop()
    capped = ServerSettings(max_new_tokens=8)
    assert capped.default_chat_max_tokens == 256
    assert RequestDefaults.of(capped, DeliberationConfig()).chat_max_tokens == 8


def test_ready_after_a_failed_load_says_so_without_paths_or_exception_names(model_dir, caplog):
    secret_path = str(model_dir / "model.safetensors")

    def failing(settings: ServerSettings):
        raise ValueError(f"{secret_path}: corrupt or unreadable weights file (header too large)")

    server = LiveServer(settings_for(model_dir), failing)
    server.server.runtime.on_load_failure = None  # kept up here, to read /ready (crsm serve exits instead)
    server.start(wait_ready=False)
    try:
        deadline = time.monotonic() + 30
        while (r := httpx.get(server.url + "/ready")).json()["error"]["code"] != "model_load_failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.status_code == 503 and r.headers["retry-after"]
        text = r.text
        assert "/" not in text.replace("the server's log", "") and "ValueError" not in text and "safetensors" not in text
        assert "failed to load" in r.json()["error"]["message"]
    finally:
        server.stop()
    assert any(secret_path in record.getMessage() for record in caplog.records)  # the log has it
