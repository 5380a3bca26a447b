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
- `CapturedPrefill`: prompts are prefilled in rows of a prefill pool, in pieces whose lengths are
  buckets (256, 128, ..., 1 by default); the pieces of one length of many prompts are one batched
  prefill, each a graph replay per (length, batch bucket).

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


def binary_pieces(n: int) -> tuple[int, ...]:
    """n as a sum of distinct powers of two, largest first: 44 -> (32, 8, 4)."""
    return tuple(1 << b for b in reversed(range(n.bit_length())) if n >> b & 1)


class CapturedPrefill:
    """Batched prefill of many prompts, each in its own row of a prefill pool, in pieces of bucket
    lengths, from graphs.

    `feed(rows, ids)` advances the pool rows `rows` by one piece each, the same length n for all, in
    one backbone prefill: the rows are gathered, prefilled as one [B, n] batch and scattered back, so a
    call that fails leaves the pool as it was. A caller with prompts of different lengths cuts each into
    pieces (`pieces`) and feeds the pieces of one length together, longest first.

    On CUDA a call replays the graph of (n, the smallest batch bucket >= B); buckets go up to
    `budget // n` rows, the most a budget of `budget` tokens per iteration gives one length. The
    bucket's spare row indices point at a junk row past the pool's rows, which nothing reads."""

    def __init__(self, model: MambaLM, rows: int, budget: int, warmup_steps: int = 2):
        if rows < 1 or budget < 1:
            raise ValueError(f"rows and budget must be >= 1, got {rows} and {budget}")
        self.model = model
        self.rows, self.budget = rows, budget
        self.lengths = default_piece_lengths(1 << (budget.bit_length() - 1))
        self.pool = model.allocate_state(rows + 1)   # row `rows`: the junk row of padded buckets
        self.graphed = model.device.type == "cuda"
        self.buckets = {n: default_buckets(min(rows, budget // n)) for n in self.lengths}
        self._ids: dict[tuple[int, int], torch.Tensor] = {}    # (n, bucket) -> [bucket, n]
        self._index: dict[tuple[int, int], torch.Tensor] = {}  # (n, bucket) -> [bucket] pool rows
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, int], torch.Tensor] = {}
        if self.graphed:
            with torch.inference_mode():
                self._capture(warmup_steps)

    def max_batch(self, n: int) -> int:
        """The most rows one call with pieces of length n takes."""
        return self.buckets[n][-1] if self.graphed else self.rows

    def pieces(self, counts: list[int]) -> list[tuple[int, ...]]:
        """How prompts that get these numbers of tokens now are fed: each one's piece lengths, largest
        first. The pieces of one length of all the prompts are one call, so of the two ways the one of
        fewer calls: powers of two (at most len(lengths) calls, whatever the mix of counts), or, off
        CUDA, where any length runs eagerly, the counts themselves (one call per distinct count: a prompt
        alone is one call, not one per bit of its length, each costing about a whole eager prefill)."""
        binary = [binary_pieces(n) for n in counts]
        if self.graphed or len({p for ps in binary for p in ps}) < len(set(counts)):
            return binary
        return [(n,) for n in counts]

    def _piece(self, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """ids: [B, n]; index: [B] pool rows -> logits [B, V]; those rows advanced by n."""
        state = self.pool.gather(index)
        logits = self.model.prefill(ids, state)
        self.pool.scatter_(index, state)
        return logits

    def _capture(self, warmup_steps: int) -> None:
        mempool = torch.cuda.graph_pool_handle()
        device = self.model.device
        for n in self.lengths:   # largest first, as in CapturedDecoder
            for bucket in reversed(self.buckets[n]):
                ids = torch.zeros(bucket, n, dtype=torch.long, device=device)
                index = torch.full((bucket,), self.rows, dtype=torch.long, device=device)
                _warm_up(lambda: self._piece(ids, index), warmup_steps)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    # a copy of the last position's logits: the [bucket, n, V] logits die within the capture
                    self._logits[n, bucket] = self._piece(ids, index).clone()
                self._graphs[n, bucket] = graph
                self._ids[n, bucket], self._index[n, bucket] = ids, index
        self.pool.zero_()
        torch.cuda.synchronize()
        log.info("captured %d prefill graphs: pieces of %s tokens, up to %s rows", len(self._graphs),
                 self.lengths, [self.max_batch(n) for n in self.lengths])

    def begin(self, row: int) -> None:
        """A new prompt in pool row `row`: the state of no tokens."""
        self.pool.rows(slice(row, row + 1)).zero_()

    def state(self, row: int) -> RecurrentState:
        """A view of pool row `row`."""
        return self.pool.rows(slice(row, row + 1))

    @torch.inference_mode()
    def feed(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        """rows: B distinct pool rows; ids: [B, n] long (on CUDA n one of `lengths`, elsewhere 1 to
        `budget`) -> logits [B, V] after them (on CUDA a view of a static buffer, valid until the next
        feed); the rows advance by n."""
        batch, n = ids.shape
        length_ok = n in self.buckets if self.graphed else 1 <= n <= self.budget
        if not length_ok or len(rows) != batch or not 1 <= batch <= self.max_batch(n):
            raise ValueError(f"a prefill feed takes 1 to {self.rows} rows of pieces of "
                             f"{self.lengths if self.graphed else f'1 to {self.budget}'} tokens, got {len(rows)} "
                             f"rows of ids {tuple(ids.shape)}")
        if not self.graphed:
            return self._piece(ids.to(self.model.device), torch.tensor(rows, dtype=torch.long))
        bucket = next(b for b in self.buckets[n] if b >= batch)
        key = (n, bucket)
        self._ids[key][:batch].copy_(ids, non_blocking=True)
        self._index[key].fill_(self.rows)
        self._index[key][:batch].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        if batch < bucket:   # the spare rows prefill the junk row: from zeros, so that it stays finite
            self.state(self.rows).zero_()
        self._graphs[key].replay()
        return self._logits[key][:batch]
