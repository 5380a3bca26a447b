"""A lean HTTP/1.1 client for streaming SSE `/v1/generate`, as load generators are: its connections
are opened (and warmed by a request) before the clock starts, each request is bytes built beforehand and
written in one call, and a response is read chunk by chunk with no more parsing than counting the `token`
events in each chunk.

Why not httpx: with 16 or 64 streams on one event loop, httpx's per-request and per-line Python (its
pool's bookkeeping, h11, line decoding) made the client the bottleneck. On 2 CPU cores the last of 16
requests sent together left the benchmark's process ~300 ms after the first, and the first token of a
stream waited for the client to read it behind the other streams' events; the "time to first token"
measured the client.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


class StreamError(RuntimeError):
    """The server refused a request or ended a stream with an error."""


@dataclass
class StreamRecord:
    """What one client saw: token timestamps (client clock) and the final event."""
    sent_at: float = 0.0
    token_times: list[float] = field(default_factory=list)
    done: dict | None = None


def body(prompt: tuple[int, ...], max_tokens: int) -> dict:
    return {"token_ids": list(prompt), "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0}


class SseConnection:
    """One keep-alive connection to the server; one stream at a time."""

    def __init__(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.host, self.port = host, port
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "SseConnection":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(host, port, reader, writer)

    @property
    def closed(self) -> bool:
        """The server closed it (an idle keep-alive timing out) or we did."""
        return self._writer.is_closing() or self._reader.at_eof()

    def close(self) -> None:
        self._writer.close()

    def request_bytes(self, request: dict) -> bytes:
        payload = json.dumps(request, separators=(",", ":")).encode()
        head = (f"POST /v1/generate HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n")
        return head.encode() + payload

    async def stream(self, request: bytes, record: StreamRecord, stop: asyncio.Event | None = None) -> StreamRecord:
        """Send one request (`request_bytes`) and read its SSE events until `done`, or until a token comes
        while `stop` is set: then the connection is closed, which cancels the session on the server."""
        record.sent_at = time.perf_counter()
        self._writer.write(request)
        try:
            return await self._read(record, stop)
        except BaseException:   # the connection is mid-response: it cannot carry another request
            self.close()
            raise

    async def _read(self, record: StreamRecord, stop: asyncio.Event | None) -> StreamRecord:
        status, headers = await self._head()
        if status != 200:
            length = int(headers.get("content-length", "0"))
            text = await self._reader.readexactly(length) if length else b""
            raise StreamError(f"/v1/generate answered {status}: {text[:500]!r}")
        if headers.get("transfer-encoding") != "chunked":
            raise StreamError(f"expected a chunked event stream, got the headers {headers}")
        pending = b""
        while True:
            size = int((await self._reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self._reader.readline()   # the empty trailer
                break
            chunk = await self._reader.readexactly(size + 2)
            now = time.perf_counter()
            messages = (pending + chunk[:-2]).split(b"\n\n")
            pending = messages.pop()            # an incomplete message, completed by the next chunk
            for message in messages:
                if message.startswith(b"event: token\n"):
                    record.token_times.append(now)
                    if stop is not None and stop.is_set():
                        self.close()
                        return record
                elif message.startswith(b"event: done\n"):
                    record.done = json.loads(message.split(b"data: ", 1)[1])
                elif message.startswith(b"event: error\n"):
                    raise StreamError(f"the server ended a stream with an error: {message[:500]!r}")
        if record.done is None:
            raise StreamError("a stream ended without its done event")
        if headers.get("connection") == "close":
            self.close()
        return record

    async def _head(self) -> tuple[int, dict[str, str]]:
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if line)
        return status, {k.strip().lower(): v.strip() for k, v in headers.items()}


class ConnectionPool:
    """Connections opened before the clock starts; `take(n)` hands out n open ones, reopening any the server
    closed meanwhile."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._idle: list[SseConnection] = []

    async def take(self, n: int) -> list[SseConnection]:
        self._idle = [c for c in self._idle if not c.closed]
        missing = n - len(self._idle)
        if missing > 0:
            self._idle += await asyncio.gather(*(SseConnection.open(self.host, self.port) for _ in range(missing)))
        taken, self._idle = self._idle[:n], self._idle[n:]
        return taken

    def give_back(self, connections: list[SseConnection]) -> None:
        self._idle += [c for c in connections if not c.closed]

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle = []
