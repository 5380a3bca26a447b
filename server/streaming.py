"""Moving session events to HTTP clients: SSE framing, merging several sessions into one stream, and
cancelling sessions when the client goes away (streaming or not)."""
from __future__ import annotations

import asyncio
import contextlib
import json
from json.encoder import encode_basestring_ascii
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from crsm_core.engine import DoneEvent, ErrorEvent, SessionStream

T = TypeVar("T")
# as Starlette's StreamingResponse wrote them (media type text/event-stream, these headers)
SSE_RAW_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                   (b"content-type", b"text/event-stream; charset=utf-8")]


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def sse(data: Any, event: str | None = None) -> str:
    """One SSE message; data is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


# A str as json.dumps writes it (ensure_ascii), without its dispatch: the C escaper alone.
json_string: Callable[[str], str] = encode_basestring_ascii


class MessageTemplate:
    """An SSE message with two holes, an int and then a str, cut from one rendering by the slow path
    (`render(number, text)`): filling it costs a JSON string escape instead of a pydantic model and
    json.dumps. For the per-token chunks of a stream, which differ only in a choice's index and text."""

    NUMBER, TEXT = 7_390_481_265, "\x00\x01\x02"   # stand-ins no rendering holds otherwise

    def __init__(self, render: Callable[[int, str], str]):
        whole = render(self.NUMBER, self.TEXT)
        number, text = str(self.NUMBER), json_string(self.TEXT)
        if whole.count(number) != 1 or whole.count(text) != 1 or whole.index(number) > whole.index(text):
            raise ValueError(f"not a message with one number and then one text: {whole!r}")
        self.head, rest = whole.split(number)
        self.middle, self.tail = rest.split(text)

    def __call__(self, number: int, text: str) -> str:
        return f"{self.head}{number}{self.middle}{json_string(text)}{self.tail}"


class SSEResponse(Response):
    """An SSE stream as a plain ASGI response: each message string of `messages` (what arrived together)
    in one send. Starlette's StreamingResponse does the same through an anyio task group and more work per
    chunk; this is on the path of every streamed token. When the client disconnects the stream is
    cancelled, and its `finally` (which cancels its sessions) has run before the response returns.
    A Response (FastAPI passes those through), of which it uses only the status, headers and background."""

    def __init__(self, messages: AsyncGenerator[str, None]):
        self.messages = messages
        self.status_code = 200
        self.raw_headers = list(SSE_RAW_HEADERS)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        listening = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((streaming, listening), return_when=asyncio.FIRST_COMPLETED)
        finally:
            streaming.cancel()
            listening.cancel()
            await asyncio.wait((streaming, listening))
        if streaming.cancelled():
            return
        streaming.result()   # its error, for the error middleware
        if self.background is not None:
            await self.background()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async with contextlib.aclosing(self.messages) as messages:   # closed now, even if a send fails
            async for message in messages:
                await send({"type": "http.response.body", "body": message.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def merge(sessions: list[SessionStream]) -> AsyncIterator[list[tuple[int, object]]]:
    """Events of several sessions as batches of (session index, event), each session's in order, until
    every session has sent its final event. A batch holds what had arrived (SessionStream.batches)."""
    if len(sessions) == 1:
        async for batch in sessions[0].batches():
            yield [(0, event) for event in batch]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, session: SessionStream) -> None:
        async for batch in session.batches():
            queue.put_nowait([(index, event) for event in batch])

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sessions)]
    remaining = len(sessions)
    try:
        while remaining:
            batch = await queue.get()
            while not queue.empty():
                batch += queue.get_nowait()
            remaining -= sum(isinstance(event, (DoneEvent, ErrorEvent)) for _, event in batch)
            yield batch
    finally:
        for task in tasks:
            task.cancel()


async def unless_disconnected(request: Request, work: Awaitable[T], sessions: list[SessionStream]) -> T:
    """Await work; if the client disconnects first, raise ClientGone. The sessions are cancelled either
    way on exit (a no-op for finished ones), so a vanished client frees its slots at the next step."""
    work_task = asyncio.ensure_future(work)
    gone_task = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({work_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task in done:
            return work_task.result()
        raise ClientGone()
    finally:
        for task in (work_task, gone_task):
            task.cancel()
        for session in sessions:
            session.cancel()
