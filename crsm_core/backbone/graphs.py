"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

An eager decode step of a 24-layer Mamba-2 launches a few hundred small kernels, and at batch 1 the
launch gaps, not the memory traffic, set its time. Capturing `model.step` once per bucket and
replaying it removes them. A graph reads and writes fixed addresses, so every graph works on the
same state pool: the graph of bucket b steps pool rows [0:b] in place, reads its tokens from a
static buffer and leaves its logits in a static output.

Contract for callers: the live rows of a step are rows [0:B] of `pool`; a step with B rows runs the
graph of the smallest bucket >= B, so rows [B:bucket] are stepped too (with stale tokens) and must
not hold live state. Keep live rows compacted at the front of the pool.
"""
from __future__ import annotations

import logging

import torch

from ..state import RecurrentState
from .model import MambaLM

log = logging.getLogger(__name__)


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to and including max_batch (which need not be a power of two)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch)
    return tuple(buckets)


class CapturedDecoder:
    """`step(tokens[B]) -> logits[B, V]` over rows [0:B] of a fixed state pool.

    On CUDA the step is replayed from the graph of its bucket; elsewhere it is the eager
    `model.step` on the same rows (there is nothing to capture), so callers need no second path.
    The returned logits are a view of a static buffer, valid until the next `step`.
    """

    def __init__(self, model: MambaLM, max_batch: int = 64, pool: RecurrentState | None = None,
                 warmup_steps: int = 3):
        self.model = model
        self.buckets = default_buckets(max_batch)
        self.pool = pool if pool is not None else model.allocate_state(max_batch)
        if self.pool.batch < max_batch:
            raise ValueError(f"pool has {self.pool.batch} rows, fewer than max_batch={max_batch}")
        self.graphed = model.device.type == "cuda"
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            self._tokens = torch.zeros(max_batch, dtype=torch.long, device=model.device)
            if self.graphed:
                self._capture(warmup_steps)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, batch: int) -> int:
        """The smallest bucket that holds `batch` rows."""
        for bucket in self.buckets:
            if bucket >= batch:
                return bucket
        raise ValueError(f"batch {batch} exceeds max_batch={self.max_batch}")

    def _capture(self, warmup_steps: int) -> None:
        # Warm-up runs Triton's autotuning and compilation (which must not happen inside a capture)
        # and really steps the pool, so the pool is saved first and restored afterwards.
        saved = self.pool.clone()
        mempool = torch.cuda.graph_pool_handle()
        # Largest bucket first: the shared memory pool is sized once by it, smaller graphs reuse it.
        for bucket in reversed(self.buckets):
            tokens, rows = self._tokens[:bucket], self.pool.rows(slice(0, bucket))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    self.model.step(tokens, rows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self._logits[bucket] = self.model.step(tokens, rows)
            self._graphs[bucket] = graph
        self.pool.copy_(saved)
        torch.cuda.synchronize()
        log.info("captured decode graphs for buckets %s", self.buckets)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] (B <= max_batch) -> logits [B, V]; pool rows [0:B] advanced by one token."""
        batch = tokens.shape[0]
        if not self.graphed:
            if batch > self.max_batch:
                raise ValueError(f"batch {batch} exceeds max_batch={self.max_batch}")
            return self.model.step(tokens.to(self.model.device), self.pool.rows(slice(0, batch)))
        bucket = self.bucket_for(batch)
        self._tokens[:batch].copy_(tokens, non_blocking=True)
        self._graphs[bucket].replay()
        return self._logits[bucket][:batch]
