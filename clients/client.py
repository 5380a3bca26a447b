"""Clients for the native API, sync (`CRSMClient`) and async (`AsyncCRSMClient`), on httpx.

    with CRSMClient("http://127.0.0.1:8000") as client:
        result = client.generate("Once upon a time", max_tokens=32, seed=0)
        with client.stream("Once upon a time", max_tokens=32) as events:
            for event in events:        # TokenEvent, InjectionEvent, then DoneEvent or ErrorEvent
                ...

    async with AsyncCRSMClient() as client:
        async with await client.stream("Hello", max_tokens=8) as events:
            async for event in events:
                ...

Request options are the fields of `GenerateRequest` (max_tokens, temperature, top_p, top_k, seed,
stop, token_ids, deliberation=DeliberationOptions(...)); an unknown name raises.

Retries: a 429 or 503 answer, or a connection that could not be opened (the request never reached
the server), is retried by the `RetryPolicy`. A request that reached the server and then failed
(read timeout, broken connection) is not: generation is not free, and the server has no resume. A
stream is retried only before its first byte; after that its errors reach the caller.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import httpx

from clients.errors import (APIConnectionError, APITimeoutError, ProtocolError, status_error)
from clients.retry import RetryPolicy, parse_retry_after
from clients.sse import SSEDecoder
from clients.types import (DoneEvent, ErrorEvent, GenerateRequest, GenerateResult, StreamEvent,
                           parse_event, parse_result)

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
GENERATE_PATH = "/v1/generate"


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    read_s: float = 120.0   # longest silence: before a non-streamed answer, or between stream chunks
    write_s: float = 30.0
    pool_s: float = 10.0    # waiting for a free connection of the client's pool

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_s, read=self.read_s, write=self.write_s,
                             pool=self.pool_s)


def _transport_error(err: httpx.TransportError) -> APIConnectionError:
    if isinstance(err, httpx.TimeoutException):
        return APITimeoutError(f"{type(err).__name__}: {err}")
    return APIConnectionError(f"{type(err).__name__}: {err}")


def _never_sent(err: httpx.TransportError) -> bool:
    """True when the request cannot have reached the server, so sending it again is safe."""
    return isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout))


def _check_event_stream(response: httpx.Response) -> None:
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise ProtocolError(f"expected an event stream, got content-type {content_type!r}")


class _Session:
    """What the sync and async clients share: settings, headers and the retry decisions."""

    def __init__(self, base_url: str, timeouts: Timeouts | None, retry: RetryPolicy | None,
                 api_key: str | None, seed: int | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.headers = {"Accept": "application/json, text/event-stream"}
        if api_key is not None:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._rng = random.Random(seed)   # jitter only

    def delay_after_status(self, retry: int, response: httpx.Response) -> float | None:
        if response.status_code not in self.retry.retry_statuses:
            return None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        delay = self.retry.delay(retry, retry_after, self._rng)
        if delay is not None:
            logger.info("HTTP %d (Retry-After %s); retry %d in %.2fs", response.status_code,
                        response.headers.get("retry-after"), retry + 1, delay)
        return delay

    def delay_after_transport(self, retry: int, err: httpx.TransportError) -> float | None:
        if not _never_sent(err):
            return None
        delay = self.retry.delay(retry, None, self._rng)
        if delay is not None:
            logger.info("%s; retry %d in %.2fs", type(err).__name__, retry + 1, delay)
        return delay

    @staticmethod
    def error_for(response: httpx.Response, body: bytes) -> Exception:
        return status_error(response.status_code, body,
                            parse_retry_after(response.headers.get("retry-after")))


class _EventReader:
    """Socket chunks -> typed events, up to and including the final `done` or `error`."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.finished = False
        self.last_event_id = ""

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for message in self._decoder.feed(chunk):
            event = parse_event(message)
            if event is None:
                logger.debug("ignoring event of unknown type %r", message.event)
                continue
            self.last_event_id = message.id
            events.append(event)
            if isinstance(event, (DoneEvent, ErrorEvent)):
                self.finished = True
                break
        return events

    def end(self) -> None:
        """The server closed the stream."""
        self._decoder.close()
        if not self.finished:
            raise ProtocolError("event stream ended without a 'done' or 'error' event")


class EventStream:
    """The typed events of one streamed generation. Iterate it; close it (or use `with`) to stop
    early, which closes the connection and so cancels the generation on the server."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._reader = _EventReader()
        self._events = self._iterate()

    @property
    def last_event_id(self) -> str:
        """The SSE `id` of the latest message, when the server sets one."""
        return self._reader.last_event_id

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._events

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._events.close()
        self._response.close()

    def _iterate(self) -> Iterator[StreamEvent]:
        try:
            for chunk in self._response.iter_bytes():
                yield from self._reader.feed(chunk)
                if self._reader.finished:
                    return
            self._reader.end()
        except httpx.TransportError as err:
            raise _transport_error(err) from err
        finally:
            self._response.close()


class AsyncEventStream:
    """Async twin of `EventStream`: `async for`, `aclose()`, `async with`."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._reader = _EventReader()
        self._events = self._iterate()

    @property
    def last_event_id(self) -> str:
        return self._reader.last_event_id

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._events.aclose()
        await self._response.aclose()

    async def _iterate(self) -> AsyncIterator[StreamEvent]:
        try:
            async for chunk in self._response.aiter_bytes():
                for event in self._reader.feed(chunk):
                    yield event
                if self._reader.finished:
                    return
            self._reader.end()
        except httpx.TransportError as err:
            raise _transport_error(err) from err
        finally:
            await self._response.aclose()


class CRSMClient:
    """Synchronous client. Thread-safe as httpx.Client is; one connection pool per client."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeouts: Timeouts | None = None,
                 retry: RetryPolicy | None = None, api_key: str | None = None,
                 seed: int | None = None) -> None:
        self._session = _Session(base_url, timeouts, retry, api_key, seed)
        self._http = httpx.Client(base_url=self._session.base_url, headers=self._session.headers,
                                  timeout=self._session.timeouts.to_httpx())

    def __enter__(self) -> CRSMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def generate(self, prompt: str | None = None, *, stream: bool = False,
                 **options: Any) -> GenerateResult:
        """One generation, whole. With stream=True the answer travels as events (tokens arrive
        sooner to the server's metrics, same result) and is assembled here."""
        request = GenerateRequest(prompt=prompt, stream=stream, **options)
        if stream:
            with self._open_stream(request) as events:
                return GenerateResult.from_events(events)
        response = self._send(request.body(), stream=False)
        try:
            payload = response.json()
        except ValueError as err:
            raise ProtocolError(f"generate response is not JSON: {err}") from err
        return parse_result(payload)

    def stream(self, prompt: str | None = None, **options: Any) -> EventStream:
        """Starts a streamed generation (retrying 429/503 first) and returns its events."""
        return self._open_stream(GenerateRequest(prompt=prompt, stream=True, **options))

    def health(self) -> bool:
        """True when /health answers 2xx (the process is alive)."""
        return self._probe("/health")

    def ready(self) -> bool:
        """True when /ready answers 2xx (the model is loaded)."""
        return self._probe("/ready")

    def _probe(self, path: str) -> bool:
        try:
            return self._http.get(path).is_success
        except httpx.TransportError as err:
            raise _transport_error(err) from err

    def _open_stream(self, request: GenerateRequest) -> EventStream:
        response = self._send(request.body(), stream=True)
        try:
            _check_event_stream(response)
        except ProtocolError:
            response.close()
            raise
        return EventStream(response)

    def _send(self, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        retry = 0
        while True:
            request = self._http.build_request("POST", GENERATE_PATH, json=body)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as err:
                delay = self._session.delay_after_transport(retry, err)
                if delay is None:
                    raise _transport_error(err) from err
            else:
                if response.is_success:
                    return response
                try:
                    payload = response.read()
                except httpx.TransportError as err:
                    raise _transport_error(err) from err
                finally:
                    response.close()
                delay = self._session.delay_after_status(retry, response)
                if delay is None:
                    raise self._session.error_for(response, payload)
            time.sleep(delay)
            retry += 1


class AsyncCRSMClient:
    """Asynchronous client; same methods as `CRSMClient`, awaited."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeouts: Timeouts | None = None,
                 retry: RetryPolicy | None = None, api_key: str | None = None,
                 seed: int | None = None) -> None:
        self._session = _Session(base_url, timeouts, retry, api_key, seed)
        self._http = httpx.AsyncClient(base_url=self._session.base_url,
                                       headers=self._session.headers,
                                       timeout=self._session.timeouts.to_httpx())

    async def __aenter__(self) -> AsyncCRSMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(self, prompt: str | None = None, *, stream: bool = False,
                       **options: Any) -> GenerateResult:
        request = GenerateRequest(prompt=prompt, stream=stream, **options)
        if stream:
            async with await self._open_stream(request) as events:
                return GenerateResult.from_events([event async for event in events])
        response = await self._send(request.body(), stream=False)
        try:
            payload = response.json()
        except ValueError as err:
            raise ProtocolError(f"generate response is not JSON: {err}") from err
        return parse_result(payload)

    async def stream(self, prompt: str | None = None, **options: Any) -> AsyncEventStream:
        return await self._open_stream(GenerateRequest(prompt=prompt, stream=True, **options))

    async def health(self) -> bool:
        return await self._probe("/health")

    async def ready(self) -> bool:
        return await self._probe("/ready")

    async def _probe(self, path: str) -> bool:
        try:
            return (await self._http.get(path)).is_success
        except httpx.TransportError as err:
            raise _transport_error(err) from err

    async def _open_stream(self, request: GenerateRequest) -> AsyncEventStream:
        response = await self._send(request.body(), stream=True)
        try:
            _check_event_stream(response)
        except ProtocolError:
            await response.aclose()
            raise
        return AsyncEventStream(response)

    async def _send(self, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        retry = 0
        while True:
            request = self._http.build_request("POST", GENERATE_PATH, json=body)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as err:
                delay = self._session.delay_after_transport(retry, err)
                if delay is None:
                    raise _transport_error(err) from err
            else:
                if response.is_success:
                    return response
                try:
                    payload = await response.aread()
                except httpx.TransportError as err:
                    raise _transport_error(err) from err
                finally:
                    await response.aclose()
                delay = self._session.delay_after_status(retry, response)
                if delay is None:
                    raise self._session.error_for(response, payload)
            await asyncio.sleep(delay)
            retry += 1
