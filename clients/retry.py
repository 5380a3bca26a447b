"""When to try a request again, and how long to wait first.

A full server answers 429 (queue full) or 503 (loading, draining) with Retry-After. The client waits
what the server asked (plus a little jitter, so clients told the same time do not come back in one
burst), or, with no Retry-After, an exponentially growing delay with jitter. Attempts are bounded, and
a Retry-After longer than the client is willing to wait ends the retries at once rather than waiting
less than the server asked.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3               # attempts after the first one
    backoff_base_s: float = 0.5        # first delay without Retry-After (then x2 each retry)
    backoff_max_s: float = 8.0         # cap on that delay
    max_retry_after_s: float = 60.0    # a longer Retry-After raises instead of waiting
    retry_statuses: frozenset[int] = frozenset({429, 503})

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not 0.0 <= self.backoff_base_s <= self.backoff_max_s:
            raise ValueError("need 0 <= backoff_base_s <= backoff_max_s")
        if self.max_retry_after_s < 0:
            raise ValueError(f"max_retry_after_s must be >= 0, got {self.max_retry_after_s}")

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float | None:
        """Seconds to wait before retry number `retry` (0 = the first retry); None = give up."""
        if retry >= self.max_retries:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after_s:
                return None
            return retry_after + rng.uniform(0.0, self.backoff_base_s)
        # "equal jitter": at least half the exponential step, so the backoff really grows
        step = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** retry)
        return step / 2 + rng.uniform(0.0, step / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After header -> seconds to wait (>= 0), or None when absent or malformed.
    RFC 9110: either a non-negative integer of seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:   # an HTTP date is always GMT; a zone-less one is malformed
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)
