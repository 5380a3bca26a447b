"""The projection tiles of the fused decode step (step_kernels.py), kept apart from the kernels so that
they are read (and tested) without Triton.

Tiles are chosen per (device, projection shape, batch bucket): measured ones from `step_tiles.json`,
which scripts/sweep_step_tiles.py writes on a GPU (the way vLLM ships tuned kernel configs per device
name), else a heuristic. A captured graph replays one choice per bucket.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


@dataclass(frozen=True)
class Tiles:
    """A projection's tile sizes for M rows (fixed per bucket: captured graphs replay one choice)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


def proj_tiles(m: int, n: int, k: int, device_name: str | None = None) -> Tiles:
    """Tiles of an [m, k] x [k, n] projection: measured ones where `step_tiles.json` has this device
    and shape (scripts/sweep_step_tiles.py writes it, as vLLM ships tuned kernel configs per device),
    else the heuristic below.

    M = 1, a GEMV: memory latency, not bandwidth, bounds a 2-5 MB projection, so every program loads
    its whole [BLOCK_N, K] slice of the weight at once (one K block), and the slices are narrow enough
    for 100-200 programs. M > 1: tl.dot tiles of 16 to 64 rows over K blocks of 64, which Triton
    pipelines; narrow column tiles again where N is small (out_proj: 768)."""
    tuned = _tuned_tiles().get(device_name or "", {}).get(f"{n}x{k}")
    if tuned and m > 1:
        # the smallest measured bucket that holds m rows (tiles of a bucket only mask fewer rows)
        buckets = sorted(int(b) for b in tuned)
        bucket = next((b for b in buckets if b >= m), buckets[-1])
        return Tiles(**tuned[str(bucket)])
    wide = n >= 2048
    if m == 1:
        return Tiles(1, 16 if wide else 8, min(2048, next_power_of_2(k)), 8)
    return Tiles(min(64, max(16, next_power_of_2(m))), 32 if wide else 16, 64, 4)


TUNED_TILES = Path(__file__).with_name("step_tiles.json")


@functools.cache
def _tuned_tiles() -> dict[str, dict[str, dict[str, dict[str, int]]]]:
    """{device name: {"NxK": {bucket: Tiles fields}}} from TUNED_TILES, {} without it."""
    return json.loads(TUNED_TILES.read_text()) if TUNED_TILES.exists() else {}


