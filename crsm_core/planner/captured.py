"""Searches replayed from CUDA graphs, one set of graphs per root bucket.

A search of search.py is a fixed sequence of kernels over `SearchBuffers` (set-up, rounds, read-out),
so it is captured once and replayed: a round of R roots costs a few graph launches from Python, not
the ~1,000 small kernels and the host round trips of an eager round. That matters twice on a GPU: the
planner's kernels are small and launch-bound, and the planner thread otherwise holds the GIL for
long stretches of tensor bookkeeping that the generator thread has to wait out.

Graphs per bucket of roots (1, 2, 4, ... up to `max_roots`; a search of R roots runs the smallest
bucket >= R, the extra roots copies of the first, their results ignored):
- `begin`: fresh trees, roots stored and evaluated.
- a round: with `step_fn` given, ONE graph (select, step, finish); in ride mode (`ride` given) two
  graphs, select and finish, and the `ride` step function steps the rows between them (their step
  happens inside the generator's own captured decode step).
- `read_out`: the chosen actions, their target states and the statistics.
The host synchronises once after the base rounds (to see whether collisions left a root short) and
once to read the statistics.

Memory: per bucket of B roots, B * (1 + n_simulations + 2 * leaf_batch + 1) state rows (node pool,
scratch, step rows, the roots); for the 768 x 24 backbone in bf16 (9.8 MB a row) and the default
planner, about 0.4 GB per root, 12.6 GB for all buckets up to 16.

Off CUDA nothing is captured: `run` is the eager search on the same buffers, which are allocated for
a bucket the first time a search of that many roots runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..backbone.graphs import _warm_up, default_buckets
from ..state import RecurrentState, StepFn
from .search import (PlannerConfig, SearchBuffers, SearchOutputs, SearchResult, StepFn, ValueFn, begin,
                     eager_round, finish_round, read_out, result_of, run_rounds, select_round)

log = logging.getLogger(__name__)


@dataclass
class _Program:
    buffers: SearchBuffers
    begin: torch.cuda.CUDAGraph | None = None
    round: torch.cuda.CUDAGraph | None = None     # select + step + finish (step_fn given)
    select: torch.cuda.CUDAGraph | None = None    # ride mode
    finish: torch.cuda.CUDAGraph | None = None    # ride mode
    read: torch.cuda.CUDAGraph | None = None
    outputs: SearchOutputs | None = None          # read_out's static outputs


class CapturedSearch:
    """`run(states, logits, on_round) -> SearchResult` for searches of one PlannerConfig.

    like: a state of the node states' shape, dtype and device (1 row is enough); step_fn: the
    children's step (captured into the round graph), or ride: the step that carries them between the
    graphs (ride mode); terminal_token: the end-of-text token."""

    def __init__(self, config: PlannerConfig, like: RecurrentState, vocab: int, heads: int, value_fn: ValueFn,
                 step_fn: StepFn | None = None, ride: StepFn | None = None, max_roots: int = 16,
                 terminal_token: int | None = None):
        if (step_fn is None) == (ride is None):
            raise ValueError("give exactly one of step_fn (steps inside the graphs) or ride (steps between them)")
        self.config, self.value_fn, self.step_fn, self.ride = config, value_fn, step_fn, ride
        self.vocab, self.heads, self.terminal_token = vocab, heads, terminal_token
        self._like = like.rows(slice(0, 1))
        self.buckets = default_buckets(max_roots)
        self.graphed = like.ssm.is_cuda
        self._programs: dict[int, _Program] = {}
        if self.graphed:
            mempool = torch.cuda.graph_pool_handle()
            with torch.inference_mode():
                for bucket in reversed(self.buckets):   # largest first: the shared pool is sized once
                    self._capture(self._program(bucket), mempool)
            log.info("captured searches (%s) for %s roots", config, self.buckets)

    def _program(self, bucket: int) -> _Program:
        if bucket not in self._programs:
            self._programs[bucket] = _Program(SearchBuffers(self.config, bucket, self._like, self.vocab, self.heads,
                                                            terminal_token=self.terminal_token))
        return self._programs[bucket]

    @staticmethod
    def rows_per_root(config: PlannerConfig) -> int:
        """State rows one root's buffers hold: its node pool, the round's scratch and step rows, the root."""
        return config.capacity + 2 * config.leaf_batch + 1

    @property
    def max_roots(self) -> int:
        return self.buckets[-1]

    def _capture(self, program: _Program, mempool) -> None:
        b = program.buffers

        def whole() -> None:
            begin(b, self.value_fn)
            if self.step_fn is not None:
                eager_round(b, self.step_fn, self.value_fn)
            else:   # ride mode: the step is not in any graph, so warming up needs none
                select_round(b)
                finish_round(b, b.step_logits, self.value_fn)
            read_out(b)

        _warm_up(whole, steps=1)   # Triton kernels compile and autotune outside the capture

        def capture(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the generator keeps running its own CUDA work on another thread meanwhile
            with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
                out = fn()
            return graph, out

        program.begin, _ = capture(lambda: begin(b, self.value_fn))
        if self.step_fn is not None:
            program.round, _ = capture(lambda: eager_round(b, self.step_fn, self.value_fn))
        else:
            program.select, _ = capture(lambda: select_round(b))
            program.finish, _ = capture(lambda: finish_round(b, b.step_logits, self.value_fn))
        program.read, program.outputs = capture(lambda: read_out(b))

    def bucket_for(self, roots: int) -> int:
        for bucket in self.buckets:
            if bucket >= roots:
                return bucket
        raise ValueError(f"{roots} roots exceed max_roots={self.max_roots}")

    @torch.inference_mode()
    def run(self, states: RecurrentState, logits: torch.Tensor,
            on_round: Callable[[int], None] | None = None) -> SearchResult:
        """states: R rows (R <= max_roots, not modified); logits: [R, V]. `on_round(rows)` is called
        before each round with the rows it will step (it may raise to stop the search). The result's
        tensors are the caller's; its `tree` is this bucket's, valid until the next search."""
        started = time.perf_counter()
        n_roots = states.batch
        if logits.shape != (n_roots, self.vocab):
            raise ValueError(f"root logits must be [R={n_roots}, V={self.vocab}], got {tuple(logits.shape)}")
        program = self._program(self.bucket_for(n_roots))
        b = program.buffers
        b.root_states.rows(slice(0, n_roots)).copy_(states)
        b.root_logits[:n_roots].copy_(logits)
        if n_roots < b.roots:   # padding roots repeat the first: valid states, results ignored
            b.root_states.rows(slice(n_roots, b.roots)).copy_(states.rows(slice(0, 1)))
            b.root_logits[n_roots:].copy_(logits[:1])

        def one_round() -> None:
            if on_round is not None:
                on_round(b.step_rows)
            if not self.graphed:   # the eager search, stepping through whichever stepper
                eager_round(b, self.step_fn or self.ride, self.value_fn)
                return
            if program.round is not None:
                program.round.replay()
            else:
                program.select.replay()
                b.step_logits.copy_(self.ride(b.step_tokens, b.step_states))
                program.finish.replay()
            b.rows_stepped += b.step_rows

        if self.graphed:
            program.begin.replay()
            b.rows_stepped = 0
        else:
            begin(b, self.value_fn)
        run_rounds(b, one_round)
        if self.graphed:
            program.read.replay()
            outputs = program.outputs
        else:
            outputs = read_out(b)
        return result_of(outputs.first(n_roots), b, started)
