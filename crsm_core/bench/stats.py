"""Latency and throughput from token timestamps.

Every measured stream is a list of token timestamps (seconds, `time.perf_counter`), one per token in
order. Inter-token latencies (ITL) are the gaps between consecutive tokens of one stream; each
stream's first `warmup` gaps are left out (graph replay, allocator and caches settling, and the
ragged start while the other sessions of the batch are still being prefilled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Summary of a set of latencies, in milliseconds."""
    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "LatencyStats":
        if len(seconds) == 0:
            raise ValueError("no latencies to summarise")
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(count=int(ms.size), p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
                   mean_ms=float(ms.mean()), max_ms=float(ms.max()))


def gaps(times: Sequence[float], warmup: int = 0) -> list[float]:
    """times: [T] token timestamps of one stream -> its gaps [T - 1 - warmup] (seconds)."""
    return [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]


def pooled_gaps(streams: Sequence[Sequence[float]], warmup: int) -> list[float]:
    """Every stream's gaps after its warm-up, pooled."""
    return [g for times in streams for g in gaps(times, warmup)]


def steady_tokens_per_s(streams: Sequence[Sequence[float]], warmup: int) -> float:
    """Total tokens per second over the steady window, where every stream is past its warm-up and none
    has finished: from the latest `times[warmup]` to the earliest last token. Tokens counted are those
    stamped inside (start, end]. When the window is empty (streams that barely overlap), the whole span
    from the first stream's warm-up token to the last token is used instead."""
    start = max(times[warmup] for times in streams)
    end = min(times[-1] for times in streams)
    if end <= start:
        start = min(times[warmup] for times in streams)
        end = max(times[-1] for times in streams)
    if end <= start:
        raise ValueError("the streams have no time span to measure a rate over")
    count = sum(1 for times in streams for t in times if start < t <= end)
    return count / (end - start)


def window_gaps(streams: Sequence[Sequence[float]], start: float, end: float) -> list[float]:
    """The gaps of every stream whose interval overlaps the window (start, end)."""
    return [b - a for times in streams for a, b in zip(times, times[1:]) if b > start and a < end]
