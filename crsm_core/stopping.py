"""Stop strings over streamed text.

Text is released as soon as it can no longer be the beginning of a stop string, so a stream never shows
part of a stop string and never waits longer than it must. A stop string may span several tokens.
"""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str], include: bool = False):
        """include: a matched stop string is released (it ends the text) instead of dropped."""
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self._held = ""  # text that could still be the start of a stop string

    def push(self, text: str, armed: bool = True) -> tuple[str, bool]:
        """Add newly decoded text. Returns (text safe to release now, whether a stop string matched).
        `armed=False` (before min_tokens): a stop string does not stop, and is released as text.

        On a match the released text ends just before the stop string (with `include`: just after it)
        and the rest is dropped."""
        buffer = self._held + text
        hits = [(i, len(s)) for i, s in ((buffer.find(s), s) for s in self.stops) if i >= 0] if armed else []
        if hits:
            self._held = ""
            at, length = min(hits)
            return buffer[: at + length if self.include else at], True
        keep = self._longest_partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held text, released when generation ends for another reason."""
        held, self._held = self._held, ""
        return held

    def _longest_partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
