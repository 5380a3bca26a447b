"""Moving session events to HTTP clients: SSE framing, merging several sessions into one stream, and
cancelling sessions when the client goes away (streaming or not)."""
from __future__ import annotations

import asyncio
import json
from json.encoder import encode_basestring_ascii
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from crsm_core.engine import DoneEvent, ErrorEvent, SessionStream

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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


def sse_response(messages: AsyncIterator[str]) -> StreamingResponse:
    # Starlette cancels the iterator when the client disconnects; its `finally` cancels the sessions.
    return StreamingResponse(messages, media_type="text/event-stream", headers=SSE_HEADERS)


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


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T], sessions: list[SessionStream]) -> T:
    """Await work; if the client disconnects first, raise ClientGone. The sessions are cancelled either
    way on exit (a no-op for finished ones), so a vanished client frees its slots at the next step."""
    work_task = asyncio.ensure_future(work)
    gone_task = asyncio.ensure_future(_disconnect(request))
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
