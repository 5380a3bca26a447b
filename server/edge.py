"""The server's door: what a request must get through before any route sees it.

Two layers, both configured by ServerSettings:
- `GuardedHttpToolsProtocol` (or, with `http_protocol` "h11", `GuardedH11Protocol`), uvicorn's protocol
  with what it lacks: a deadline for a request's head (`header_timeout_s`: uvicorn waits for headers
  forever, so half-open sockets used to pile up until the file descriptors ran out) and a cap on open
  connections (`max_connections`: one more is answered 503 and closed at once, before it holds a file
  descriptor for long). uvicorn's own `limit_concurrency` only
  answers 503 once a request's head has arrived, so it does not bound sockets that send nothing.
- `EdgeGuard`, an ASGI middleware: the API key (`api_key`), then the body, read whole here with a size
  limit (`max_body_bytes`: a Content-Length over it is refused before a byte of the body is read, a
  chunked body as soon as it grows over it) and a deadline (`body_timeout_s`: a Content-Length larger
  than the body sent gets 408, not a hang), and checked for lone UTF-16 surrogates (`"\\ud800"` is valid
  JSON but no Unicode text; every route would fail on it when encoding it).
Refusals are in OpenAI's error shape and close the connection (the rest of the body is not read).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
from typing import Any, Iterator

import h11
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .errors import INVALID_REQUEST, error_body
from .settings import ServerSettings
from .ui import PATH as UI_PATH

log = logging.getLogger(__name__)

# Paths anyone may read when an API key is set: the probes, the metrics (Prometheus scrapes them without a
# key), and the viewer's page and files (a browser cannot send a key to open a page; the page asks for the
# key and sends it with its API calls).
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/", UI_PATH})
OPEN_PREFIXES = (UI_PATH + "/",)

# A lone surrogate can only reach JSON text as an escape (its UTF-8 bytes are invalid UTF-8, which the JSON
# parser refuses): bodies without such an escape, nearly all, are not parsed here.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# ---- the connection -------------------------------------------------------------------------------------

class _ConnectionGuard:
    """What uvicorn's protocols lack, for either of them (put it before the protocol's class among the
    bases): a deadline for a request's head and a cap on open connections. A protocol says when it waits
    for a head (`_awaiting_head`) and calls `_head_arrived` once one is in."""

    # uvicorn's protocols set these
    connections: set
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def __init__(self, *args: Any, header_timeout_s: float, max_connections: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_started = False  # some bytes of the pending head arrived
        self._refused = False       # over the cap: answered 503 and closed, never one of uvicorn's connections

    def _awaiting_head(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refused, self.transport = True, transport
            _log_refusal(len(self.connections))
            transport.write(_raw_response(503, "too many open connections; retry later", "server_overloaded",
                                          "service_unavailable", retry_after=True))
            transport.close()
            return
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        if not self._refused:
            super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head():
            # a new head begins (on a keep-alive connection the keep-alive timer stops here)
            self._head_started = True
            if self._head_deadline is None:
                self._arm_head_deadline()
        super().data_received(data)  # type: ignore[misc]

    def _head_arrived(self) -> None:
        """The head is in: the body has a deadline of its own."""
        self._disarm_head_deadline()
        self._head_started = False

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or not self._awaiting_head():
            return
        if self._head_started:
            self.transport.write(_raw_response(
                408, f"the request's head did not arrive within {self.header_timeout_s:g} s", "header_timeout"))
        self.transport.close()


class GuardedHttpToolsProtocol(_ConnectionGuard, HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, in C: the cheaper one per streamed chunk) with the guards.
    llhttp's callbacks say where a request is: a head is awaited from the end of the last response (or
    the opening) until its headers are complete. A head pipelined behind a response still running gets its
    deadline once the responses are done, as with h11: until then uvicorn may not be reading it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_pending = True
        self._cycles: list[RequestResponseCycle] = []   # this connection's requests not answered yet

    def _awaiting_head(self) -> bool:
        return self._head_pending and not self._responding()

    def _responding(self) -> bool:
        # behind a queued request uvicorn pauses reading, so a pipelined head may sit unread meanwhile
        return self.cycle is not None and not self.cycle.response_complete

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn tells only the newest request that the client is gone: with one pipelined behind a
        # stream, the stream never heard of it and kept its session, writing into a closed socket
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_pending = self._head_started = True   # behind a running response: its deadline comes later

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._head_arrived()
        super().on_headers_complete()
        self._cycles = [cycle for cycle in self._cycles if not cycle.response_complete] + [self.cycle]

    def on_response_complete(self) -> None:
        if not self.pipeline and not self._head_pending:   # nothing of a next request is in
            self._head_pending, self._head_started = True, False
        super().on_response_complete()
        if self._awaiting_head() and self._head_started and not self.transport.is_closing():
            self._arm_head_deadline()   # a pipelined head began meanwhile: its deadline starts now


class GuardedH11Protocol(_ConnectionGuard, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the guards; h11's state says where a request is."""

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def handle_events(self) -> None:
        super().handle_events()
        if not self._awaiting_head():
            self._head_arrived()


# A flood of refused connections logs one line a second, not one a connection.
_REFUSALS = {"logged_at": -math.inf, "since": 0}


def _log_refusal(open_connections: int) -> None:
    _REFUSALS["since"] += 1
    now = time.monotonic()
    if now - _REFUSALS["logged_at"] >= 1.0:
        log.warning("refused %d connection(s) since the last report: %d open (max_connections)", _REFUSALS["since"],
                    open_connections)
        _REFUSALS.update(logged_at=now, since=0)


PROTOCOLS = {"httptools": GuardedHttpToolsProtocol, "h11": GuardedH11Protocol}


def protocol_for(settings: ServerSettings):
    """The protocol class uvicorn's Config takes as `http` (`http_protocol`), bound to the settings' limits."""
    protocol = PROTOCOLS[settings.http_protocol]

    def create(*args: Any, **kwargs: Any) -> _ConnectionGuard:
        return protocol(*args, header_timeout_s=settings.header_timeout_s, max_connections=settings.max_connections,
                        **kwargs)
    return create


def _raw_response(status: int, message: str, code: str, type: str = INVALID_REQUEST,
                  retry_after: bool = False) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers given outside a request cycle."""
    body = json.dumps(error_body(message, type, None, code)).encode()
    reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
    head = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close"]
    if retry_after:
        head.append(b"retry-after: 1")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# ---- the request ----------------------------------------------------------------------------------------

class Refusal(Exception):
    """A request refused at the door: answered in OpenAI's shape, and the connection closed."""

    def __init__(self, status: int, message: str, code: str, type: str = INVALID_REQUEST,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.type, self.param = status, code, type, param
        self.headers = {**(headers or {}), "connection": "close"}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.type, self.param, self.code), self.status, self.headers)


class EdgeGuard:
    """The API key, then the body (size, deadline, Unicode), before the app sees the request."""

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.key = None if settings.api_key is None else settings.api_key.encode()
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout_s = settings.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_key(scope)
            body = await self._read_body(scope, receive)
            if body is None:  # the client left while sending it
                return
            _check_unicode(body)
        except Refusal as refusal:
            await refusal.response()(scope, receive, send)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: http.disconnect, when the client leaves
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check_key(self, scope: Scope) -> None:
        path = scope["path"]
        if self.key is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return
        given = _header(scope, b"authorization") or b""
        scheme, _, token = given.partition(b" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
            raise Refusal(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                          "invalid_api_key", headers={"www-authenticate": "Bearer"})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body (b"" for none), or None when the client disconnected first."""
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise _too_large(self.max_body_bytes)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise Refusal(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                               f"({size} bytes received)", "body_timeout") from None


def _too_large(limit: int) -> Refusal:
    return Refusal(413, f"the request body is larger than this server takes ({limit} bytes)", "body_too_large")


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _check_unicode(body: bytes) -> None:
    """Refuse a JSON body with a string holding a lone surrogate (param: where it is)."""
    if not SURROGATE_ESCAPE.search(body):
        return
    try:
        document = json.loads(body)
    except ValueError:
        return  # not JSON: the route's parser says so
    for where, text in _strings(document, ()):
        if (bad := LONE_SURROGATE.search(text)) is not None:
            param = ".".join(map(str, where)) or None
            raise Refusal(400, f"{param or 'the body'}: a string holds a lone UTF-16 surrogate "
                               f"(\\u{ord(bad.group()):04x} at character {bad.start()}), which is not Unicode "
                               "text; send text as UTF-8, or escape a character outside the BMP as a "
                               "surrogate pair", "invalid_unicode", param=param)


def _strings(node: Any, where: tuple) -> Iterator[tuple[tuple, str]]:
    """Every string of a parsed JSON document (object keys too), with its path."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _strings(item, (*where, i))
    elif isinstance(node, dict):
        for key, value in node.items():
            yield (*where, key), key
            yield from _strings(value, (*where, key))
