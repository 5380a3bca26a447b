"""A small, strict Server-Sent Events decoder (the WHATWG "event stream" format).

Bytes go in as they arrive from the socket, in chunks of any size; whole messages come out.
It follows the standard's parsing rules exactly:
- lines end in CRLF, LF or CR (a CR at the end of one chunk and an LF at the start of the next are
  one line ending);
- a line starting with ":" is a comment; a line with no ":" is a field name with an empty value;
  one space after the ":" is dropped;
- fields `event`, `data`, `id`, `retry`; others are ignored; several `data` lines are joined by "\n";
- a blank line dispatches the message; a message with no `data` field is not dispatched;
- `id` persists across messages (an `id` containing NUL is ignored); `retry` (all digits, else
  ignored) sets the stream's reconnection time, kept on the decoder;
- a UTF-8 byte order mark at the very start is dropped; a message not ended by a blank line when
  the stream closes is discarded.
Strict where the standard is lenient: invalid UTF-8 raises `SSEError` instead of becoming U+FFFD
(the server sends JSON in UTF-8, so bad bytes mean a broken stream), and so does a line longer than
`max_line_chars` (a stream that never ends a line would otherwise grow the buffer without bound).
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass


class SSEError(ValueError):
    """The bytes are not a well-formed event stream."""


@dataclass(frozen=True)
class SSEMessage:
    event: str            # "message" when the stream named no type
    data: str
    id: str               # the last event id seen so far in the stream ("" when none)


class SSEDecoder:
    """Incremental decoder: `feed(bytes) -> [SSEMessage]`, then `close()` at end of stream."""

    def __init__(self, max_line_chars: int = 1 << 20) -> None:
        self.max_line_chars = max_line_chars
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._buffer = ""          # text of the line being read (no line ending yet)
        self._after_cr = False     # the previous chunk ended in CR: a leading LF is part of it
        self._at_start = True      # no character decoded yet (for the byte order mark)
        self._event = ""
        self._data: list[str] = []
        self._last_id = ""
        self.retry_ms: int | None = None   # the stream's reconnection time, once a `retry` set it

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        try:
            text = self._utf8.decode(chunk)
        except UnicodeDecodeError as err:
            raise SSEError(f"invalid UTF-8 in event stream: {err}") from err
        return self._feed_text(text)

    def close(self) -> list[SSEMessage]:
        """End of stream: checks that no UTF-8 sequence is cut; drops an unterminated message."""
        try:
            text = self._utf8.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise SSEError(f"event stream ends inside a UTF-8 sequence: {err}") from err
        messages = self._feed_text(text)
        self._buffer = ""
        self._reset_message()
        return messages

    def _feed_text(self, text: str) -> list[SSEMessage]:
        if self._at_start and text:
            self._at_start = False
            if text[0] == "\ufeff":
                text = text[1:]
        if self._after_cr and text:
            self._after_cr = False
            if text[0] == "\n":
                text = text[1:]
        messages: list[SSEMessage] = []
        start = 0
        n = len(text)
        while start < n:
            cr = text.find("\r", start)
            lf = text.find("\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 or (0 <= lf < cr) else cr
            line = self._buffer + text[start:end]
            self._buffer = ""
            start = end + 1
            if text[end] == "\r":
                if start < n and text[start] == "\n":
                    start += 1
                elif start == n:
                    self._after_cr = True
            message = self._process_line(line)
            if message is not None:
                messages.append(message)
        self._buffer += text[start:]
        if len(self._buffer) > self.max_line_chars:
            raise SSEError(f"event stream line longer than {self.max_line_chars} characters")
        return messages

    def _process_line(self, line: str) -> SSEMessage | None:
        if len(line) > self.max_line_chars:
            raise SSEError(f"event stream line longer than {self.max_line_chars} characters")
        if line == "":
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEMessage | None:
        if not self._data:
            self._reset_message()
            return None
        message = SSEMessage(event=self._event or "message", data="\n".join(self._data),
                             id=self._last_id)
        self._reset_message()
        return message

    def _reset_message(self) -> None:
        self._event = ""
        self._data = []
