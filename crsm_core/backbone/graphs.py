"""Decode steps and prefill pieces replayed from CUDA graphs, one graph per size bucket.

An eager decode step of a 24-layer Mamba-2 launches a few hundred small kernels, and at batch 1 the
launch gaps, not the memory traffic, set its time (NOTES: 31 ms eager against 2.6 ms captured); an
eager prefill chunk is launch-bound the same way. Capturing once per bucket and replaying removes
the gaps. A graph reads and writes fixed addresses, so:

- `CapturedDecoder`: every graph steps rows [0:bucket] of one state pool in place, reads its tokens
  from a static buffer and leaves its logits in a static output. A step of B rows runs the graph of
  the smallest bucket >= B, so rows [B:bucket] are stepped too (with stale tokens) and must not hold
  live state: callers keep live rows compacted at the front of the pool.
- `CapturedStepper`: any stepper (the latent dynamics model, the backbone) over states that live
  anywhere: the rows are copied into a private pool, stepped by the decoder, and copied back.
- `CapturedPrefill`: a prompt is prefilled into one static scratch row in pieces whose lengths are
  buckets (256, 128, ..., 1 by default), each piece a graph replay.

Off CUDA nothing is captured and every call is the eager computation on the same buffers, so callers
have one code path.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..state import RecurrentState, StepFn
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


def _warm_up(run: Callable[[], object], steps: int) -> None:
    """Run on a side stream before capture: Triton autotunes and compiles on first calls, which must
    not happen inside a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(steps):
            run()
    torch.cuda.current_stream().wait_stream(side)


class CapturedDecoder:
    """`step(tokens[B]) -> logits[B, V]` over rows [0:B] of a fixed state pool.

    `step_fn` is `model.step` (or any function of that shape); `pool` must have at least max_batch
    rows. The returned logits are a view of a static buffer, valid until the next `step`.
    """

    def __init__(self, model: MambaLM, max_batch: int = 64, pool: RecurrentState | None = None,
                 warmup_steps: int = 3, step_fn: StepFn | None = None):
        self.step_fn = step_fn or model.step
        self.device = model.device
        self.buckets = default_buckets(max_batch)
        self.pool = pool if pool is not None else model.allocate_state(max_batch)
        if self.pool.batch < max_batch:
            raise ValueError(f"pool has {self.pool.batch} rows, fewer than max_batch={max_batch}")
        self.graphed = self.device.type == "cuda"
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        # A normal tensor (not an inference tensor): callers write into it outside inference mode.
        self._tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        if self.graphed:
            with torch.inference_mode():
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
        # Warm-up really steps the pool, so it is saved first and restored afterwards.
        saved = self.pool.clone()
        mempool = torch.cuda.graph_pool_handle()
        # Largest bucket first: the shared memory pool is sized once by it, smaller graphs reuse it.
        for bucket in reversed(self.buckets):
            tokens, rows = self._tokens[:bucket], self.pool.rows(slice(0, bucket))
            _warm_up(lambda: self.step_fn(tokens, rows), warmup_steps)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self._logits[bucket] = self.step_fn(tokens, rows)
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
            return self.step_fn(tokens.to(self.device), self.pool.rows(slice(0, batch)))
        bucket = self.bucket_for(batch)
        if tokens.data_ptr() != self._tokens.data_ptr():   # callers may fill the static buffer themselves
            self._tokens[:batch].copy_(tokens, non_blocking=True)
        self._graphs[bucket].replay()
        return self._logits[bucket][:batch]

    @property
    def tokens(self) -> torch.Tensor:
        """The static token buffer [max_batch]: fill [0:B] and pass `tokens[:B]` to `step` to skip a copy."""
        return self._tokens


class CapturedStepper:
    """A stepper (`step(tokens [K], state K rows) -> logits [K, V]`, state advanced in place) replayed
    from graphs: the K rows are copied into a private pool, stepped, and copied back. K above the
    largest bucket is done in several replays."""

    def __init__(self, model: MambaLM, step_fn: StepFn, max_rows: int = 64, warmup_steps: int = 2):
        self.decoder = CapturedDecoder(model, max_batch=max_rows, warmup_steps=warmup_steps, step_fn=step_fn)

    @property
    def graphed(self) -> bool:
        return self.decoder.graphed

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        if not self.graphed:
            return self.decoder.step_fn(tokens, state)
        out, limit, pool = [], self.decoder.max_batch, self.decoder.pool
        for start in range(0, tokens.shape[0], limit):
            stop = min(start + limit, tokens.shape[0])
            rows, mine = slice(start, stop), pool.rows(slice(0, stop - start))
            mine.copy_(state.rows(rows))
            self.decoder.tokens[:stop - start].copy_(tokens[rows])
            out.append(self.decoder.step(self.decoder.tokens[:stop - start]).clone())
            state.rows(rows).copy_(mine)
        return out[0] if len(out) == 1 else torch.cat(out)


def default_piece_lengths(max_piece: int) -> tuple[int, ...]:
    """max_piece, max_piece / 2, ..., 1 (max_piece a power of two)."""
    if max_piece < 1 or max_piece & (max_piece - 1):
        raise ValueError(f"the largest prefill piece must be a power of two, got {max_piece}")
    lengths, n = [], max_piece
    while n >= 1:
        lengths.append(n)
        n //= 2
    return tuple(lengths)


class CapturedPrefill:
    """Prefill of one sequence into a static scratch row, in pieces of bucket lengths, from graphs.

    `begin()` zeroes the scratch; `feed(ids)` consumes up to `max_piece` tokens (one replay per piece
    of the binary decomposition of its length) and returns the logits [1, V] at its last position;
    `scratch` holds the state. One sequence at a time (the engine prefills sessions in turn)."""

    def __init__(self, model: MambaLM, max_piece: int = 256, warmup_steps: int = 2):
        self.model = model
        self.lengths = default_piece_lengths(max_piece)
        self.scratch = model.allocate_state(1)
        self.graphed = model.device.type == "cuda"
        self._ids = {n: torch.zeros(1, n, dtype=torch.long, device=model.device) for n in self.lengths}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        if self.graphed:
            with torch.inference_mode():
                self._capture(warmup_steps)

    @property
    def max_piece(self) -> int:
        return self.lengths[0]

    def _capture(self, warmup_steps: int) -> None:
        mempool = torch.cuda.graph_pool_handle()
        for n in self.lengths:   # largest first, as in CapturedDecoder
            ids = self._ids[n]
            _warm_up(lambda: self.model.prefill(ids, self.scratch), warmup_steps)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self._logits[n] = self.model.prefill(ids, self.scratch)
            self._graphs[n] = graph
        self.scratch.zero_()
        torch.cuda.synchronize()
        log.info("captured prefill graphs for pieces of %s tokens", self.lengths)

    def begin(self) -> None:
        self.scratch.zero_()

    @torch.inference_mode()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] long (1 <= T <= max_piece) -> logits [1, V] after them; the scratch advances by T."""
        total = ids.shape[0]
        if not 1 <= total <= self.max_piece:
            raise ValueError(f"a prefill feed takes 1 to {self.max_piece} tokens, got {total}")
        if not self.graphed:
            return self.model.prefill(ids.to(self.model.device)[None], self.scratch)
        done, logits = 0, None
        for n in self.lengths:
            if total - done >= n:
                self._ids[n][0].copy_(ids[done:done + n], non_blocking=True)
                self._graphs[n].replay()
                logits = self._logits[n]
                done += n
        return logits
