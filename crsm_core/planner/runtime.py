"""The planner runtime: one worker that plans for every deliberating session of a model.

Sessions hand it snapshots (`PlanRequest`); the worker takes every request queued and runs them as
ONE batched fast-forward and ONE batched search over R roots (mctx-style: the tree is R trees of
tensors), then gates each root's result with its own session's settings. Batching matters twice:
a round of the search costs about the same for 1 or 16 roots (small kernels, a fixed number of
tree ops), and one Python thread, not one per session, competes with the generator for the GIL.

Where the steps run (`PlannerMode`):
- "stream": the worker's kernels run on a low-priority CUDA stream; a search is replayed from CUDA
  graphs (planner/captured.py: set-up, then one graph per round holding the selections, the state
  step of every selected leaf and the backups), the fast-forward from a captured stepper.
- "ride": state steps are handed to the generator, whose batched decode step carries them as extra
  rows (`RideStep`); the worker keeps the tree work and the value heads (captured as the graphs
  before and after each round's step). Every step is then an exact backbone step, whatever the
  session's fast_forward / children setting.

Off the GPU both modes are plain eager computation on the CPU, in the same order. Synchronous plans
(`plan_now`) run the eager search on the caller's thread.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ..backbone import MambaLM
from ..backbone.graphs import CapturedStepper
from ..dynamics import Stepper, fast_forward
from ..engine_config import PLANNER_MODES, PlannerMode
from ..injection import TargetEntry, gates
from ..state import RecurrentState
from ..streams import Lane, hand_over, record_current, wait
from ..value import ValueHeads, spread
from .captured import CapturedSearch
from .search import SearchResult, search

if TYPE_CHECKING:
    from ..deliberation import DeliberationConfig, SessionDeliberator

log = logging.getLogger(__name__)



def resolve_planner_mode(mode: str, device: torch.device) -> PlannerMode:
    """"auto": "ride" on a GPU, where it cost the generator least (docs/benchmarks.md: ITL p99 3.01x
    against 4.72x at 16 sessions on an H200), "stream" elsewhere (on the CPU a planner thread uses a
    second core, while riding rows would lengthen every decode step)."""
    if mode == "auto":
        return "ride" if device.type == "cuda" else "stream"
    if mode not in PLANNER_MODES:
        raise ValueError(f"planner mode must be 'auto' or one of {PLANNER_MODES}, got {mode!r}")
    return mode
# Rows a captured planner stepper steps per replay (more are done in several replays).
CAPTURED_ROWS = 64
# Captured searches kept (each holds its node pools: see planner/captured.py for their size).
CAPTURED_SEARCHES = 2


class PlanCancelled(Exception):
    """Raised inside the worker when every session of the batch in hand has closed."""


class RideStep(Protocol):
    """The generator's side of "ride" mode: step `state` (K rows, on the caller's stream) by `tokens`
    [K] inside its next batched decode step; returns (logits [K, V], an event after the rows are back)."""

    def __call__(self, tokens: torch.Tensor, state: RecurrentState) -> concurrent.futures.Future: ...


@dataclass
class PlanRequest:
    """One session's snapshot S_t, taken by the generator, to plan from."""
    deliberator: "SessionDeliberator"
    snapshot: RecurrentState                # 1 row, S_t (consumed by the plan)
    logits: torch.Tensor                    # [1, V]: the distribution of token t
    position: int                           # t
    captured_at: float = field(default_factory=time.monotonic)
    ready: torch.cuda.Event | None = None   # after the snapshot copies, on the generator's stream
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def config(self) -> "DeliberationConfig":
        return self.deliberator.config

    @property
    def search_key(self) -> tuple:
        """Requests with equal keys can share one batched search."""
        c = self.config
        return c.lag, c.fast_forward, c.children, c.planner


class _RideStepper:
    """A stepper whose steps ride in the generator's batch (blocking the worker until they are done).
    K rows go as pieces of at most `rows` rows, all handed over at once (the generator takes as many
    as fit into each of its steps)."""

    def __init__(self, ride: RideStep, rows: int):
        self.ride, self.rows = ride, rows

    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        if tokens.is_cuda:
            # Finish this (low-priority) stream's work on the rows here, in the worker, which waits for
            # the ride anyway: the generator's stream must never wait on the GPU for planner kernels.
            torch.cuda.current_stream().synchronize()
        pieces = [slice(i, min(i + self.rows, tokens.shape[0])) for i in range(0, tokens.shape[0], self.rows)]
        futures = [self.ride(tokens[p], state.rows(p)) for p in pieces]
        out = []
        for future in futures:
            logits, done = future.result()
            wait(done)
            hand_over(logits)
            out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)


class PlannerRuntime:
    """Plans for many sessions from one worker thread (started on the first request)."""

    def __init__(self, backbone: MambaLM, dynamics: Stepper, value_heads: ValueHeads, *,
                 mode: PlannerMode = "stream", ride: RideStep | None = None, ride_rows: int = 16,
                 max_roots: int = 16):
        if mode not in PLANNER_MODES:
            raise ValueError(f"planner mode must be one of {PLANNER_MODES}, got {mode!r}")
        if (mode == "ride") != (ride is not None):
            raise ValueError("ride mode needs the generator's ride step, and only ride mode takes one")
        self.backbone, self.value_heads, self.mode, self.max_roots = backbone, value_heads, mode, max_roots
        self.device = backbone.device
        self.lane = Lane(self.device, "low")
        on_gpu = self.device.type == "cuda"
        # Synchronous plans (the deterministic test and evaluation mode) run on the caller's thread and
        # stream; in ride mode that is the generator, which cannot carry rows it waits for itself, so
        # they step eagerly there.
        self._inline: dict[str, Stepper] = {"dynamics": dynamics, "exact": backbone}
        if ride is not None:
            exact: Stepper = _RideStepper(ride, ride_rows)
            self._steppers: dict[str, Stepper] = {"dynamics": exact, "exact": exact}
        else:
            exact = CapturedStepper(backbone, backbone.step, CAPTURED_ROWS) if on_gpu else backbone
            latent = CapturedStepper(backbone, dynamics.step, CAPTURED_ROWS) if on_gpu else dynamics
            self._steppers = {"dynamics": latent, "exact": exact}
        if ride is None:
            self._inline = self._steppers
        # Children steps inside captured search rounds (stream mode), or between them (ride mode).
        self._round_steps = {"dynamics": dynamics.step, "exact": backbone.step}
        self._searches: dict[tuple, CapturedSearch] = {}
        # The generator catches late entries up through a token or two itself, on its own stream: a
        # graph of one row (eager, a step on the GPU is a few hundred kernel launches; and in ride mode
        # it must not wait for its own next step).
        self.generator_step: Stepper = CapturedStepper(backbone, backbone.step, 1) if on_gpu else backbone
        self._cond = threading.Condition()
        self._queue: deque[PlanRequest] = deque()
        self._batch: list[PlanRequest] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0        # searches run (each over one or more sessions' roots)
        # Rows advanced by one token by this runtime's plans, finished or not (a session's counters
        # report only the plans that finished): what the planners really computed.
        self.rows_stepped = 0

    # ---- callers ------------------------------------------------------------------------------

    def submit(self, requests: list[PlanRequest]) -> list[concurrent.futures.Future]:
        """Queue requests (together: the worker sees all of them at once); each one's future gets its
        TargetEntry (or PlanCancelled, or the planner's error)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the planner runtime is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="crsm-planner", daemon=True)
                self._thread.start()
            self._queue.extend(requests)
            self._cond.notify()
        return [request.future for request in requests]

    def prepare(self, config: "DeliberationConfig") -> None:
        """Capture the search graphs for this config now (on a GPU; a no-op elsewhere), so that the first
        plans of the sessions that use it do not wait for the capture."""
        if self.device.type == "cuda":
            with torch.no_grad(), self.lane.active():
                self._captured_search(config, self.backbone.allocate_state(1))

    def plan_now(self, requests: list[PlanRequest]) -> list[TargetEntry]:
        """Plan inline on the calling thread and stream (the synchronous, deterministic mode)."""
        return self._plan(requests, self._inline, captured=False)

    def close(self) -> None:
        """Stop the worker after the batch in hand; queued requests are cancelled."""
        with self._cond:
            self._closed = True
            for request in self._queue:
                request.future.cancel()
            self._queue.clear()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._batch

    # ---- the worker ---------------------------------------------------------------------------

    def _take(self) -> list[PlanRequest] | None:
        """Wait for requests; take the first and every queued one that can share its search."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key, batch, rest = self._queue[0].search_key, [], deque()
            while self._queue:
                request = self._queue.popleft()
                (batch if request.search_key == key and len(batch) < self.max_roots else rest).append(request)
            self._queue = rest
            self._batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            return self._batch

    def _run(self) -> None:
        with torch.no_grad(), self.lane.active():
            while (batch := self._take()) is not None:
                if not batch:
                    continue
                try:
                    entries = self._plan(batch, self._steppers, captured=self.device.type == "cuda")
                except PlanCancelled as e:
                    for request in batch:
                        request.future.set_exception(e)
                except Exception as e:  # a planner bug fails these plans, not the worker or the sessions
                    log.exception("planning failed for %d session(s)", len(batch))
                    for request in batch:
                        request.future.set_exception(e)
                else:
                    for request, entry in zip(batch, entries):
                        request.future.set_result(entry)
                finally:
                    with self._cond:
                        self._batch = []

    # ---- one batched plan ---------------------------------------------------------------------

    def _plan(self, requests: list[PlanRequest], steppers: dict[str, Stepper], captured: bool) -> list[TargetEntry]:
        """From R snapshots S_t: fast-forward each to p = t + lag (greedy), one search over the R roots,
        then per root: the best action, its target state T_p, gates from its session's settings."""
        for request in requests:
            wait(request.ready)
            hand_over(request.snapshot, request.logits)
        cfg = requests[0].config
        states = RecurrentState.cat([r.snapshot for r in requests])           # R rows
        logits = torch.cat([r.logits for r in requests])                      # [R, V]
        # the live states' norms, for TargetBuffer's bound on a target's norm: taken before the
        # fast-forward moves the snapshots, read on the CPU once the search has synchronised anyway
        live_norms = states.layer_norms()                                     # [L, R]
        ahead = fast_forward(_Guarded(steppers[cfg.fast_forward], requests, self), states, steps=cfg.lag,
                             logits=logits)
        result = self._search(requests, states, ahead.logits, steppers, captured)
        # [R, L] on the CPU: the gates made from them must be there (RecurrentState.blend_ reads them on
        # the host, which for a GPU tensor would stall the generator)
        layer_values = result.layer_values.float().cpu()
        actions = result.action.tolist()
        live_norms = live_norms.cpu()
        stats = {k: float(v) for k, v in asdict(result.stats).items()}
        steps_per_root = cfg.lag + result.stats.expansions / len(requests)
        entries = []
        for i, request in enumerate(requests):
            c = request.config
            values = layer_values[i]
            disagreement = float(spread(values))
            vetoed = disagreement > c.veto_threshold
            alpha = torch.zeros_like(values) if vetoed else \
                gates(values, c.injection_rate, c.weights(self.backbone.config.n_layer))
            entries.append(TargetEntry(
                generation_id=request.deliberator.generation_id, target_position=request.position + c.lag,
                captured_position=request.position, action=actions[i],
                target_state=result.target_state.rows(slice(i, i + 1)), alpha=alpha, vetoed=vetoed,
                spread=disagreement, planner_stats=stats, captured_at=request.captured_at,
                reference_norms=live_norms[:, i]))
            request.deliberator.record_plan(int(result.stats.simulations) // len(requests), steps_per_root)
        self._catch_up_late(requests, entries, steppers["exact"])
        ready = self.lane.record() if threading.current_thread() is self._thread else record_current(self.device)
        for entry in entries:
            entry.ready = ready
        self.batches += 1
        return entries

    def _search(self, requests: list[PlanRequest], states: RecurrentState, logits: torch.Tensor,
                steppers: dict[str, Stepper], captured: bool) -> SearchResult:
        cfg = requests[0].config
        guard = _Guarded(steppers[cfg.children], requests, self)
        if not captured:
            return search(states, logits, guard.step, self.value_heads, cfg.planner)
        return self._captured_search(cfg, states).run(states, logits, guard.before_round)

    def _captured_search(self, cfg: "DeliberationConfig", like: RecurrentState) -> CapturedSearch:
        """The captured search for this planner config and children mode (captured on first use)."""
        key = (cfg.planner, "ride" if self.mode == "ride" else cfg.children)
        found = self._searches.pop(key, None)
        if found is None:
            while len(self._searches) >= CAPTURED_SEARCHES:   # the least recently used goes
                self._searches.pop(next(iter(self._searches)))
            step = None if self.mode == "ride" else self._round_steps[cfg.children]
            found = CapturedSearch(cfg.planner, like.rows(slice(0, 1)), self.backbone.config.vocab_size,
                                   self.value_heads.config.n_layer, self.value_heads, step_fn=step,
                                   ride=self._steppers["exact"] if step is None else None,
                                   max_roots=self.max_roots)
        self._searches[key] = found   # most recently used last
        return found

    def _catch_up_late(self, requests: list[PlanRequest], entries: list[TargetEntry], exact: Stepper) -> None:
        """Advance (exact steps, batched over sessions) the targets whose position the generator has
        already passed, through the tokens it produced meanwhile, so it is left little to do itself.
        Hopeless entries (more than max_lag late) and vetoed ones are left as they are."""
        todo = []
        for request, entry in zip(requests, entries):
            tokens = request.deliberator.tokens_so_far()
            late = len(tokens) - entry.target_position
            if 0 < late <= request.config.max_lag and not entry.vetoed:
                todo.append((entry, tokens))
        if not todo:
            return
        step = _Guarded(exact, requests, self).step
        for _ in range(max(len(tokens) - entry.target_position for entry, tokens in todo)):
            active = [(e, t) for e, t in todo if len(t) > e.state_position]
            states = RecurrentState.cat([e.target_state for e, _ in active])
            ids = torch.tensor([t[e.state_position] for e, t in active], dtype=torch.long, device=self.device)
            step(ids, states)
            for k, (entry, _) in enumerate(active):
                entry.target_state.copy_(states.rows(slice(k, k + 1)))
                entry.state_position += 1
        for entry, _ in todo:
            entry.refresh_finite()


class _Guarded:
    """A stepper that stops a plan at its next step once every session it plans for has closed, and
    counts the rows it steps on its runtime."""

    def __init__(self, stepper: Stepper, requests: list[PlanRequest], runtime: PlannerRuntime):
        self.stepper, self.requests, self.runtime = stepper, requests, runtime

    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        self.before_round(tokens.shape[0])
        return self.stepper.step(tokens, state)

    def before_round(self, rows: int) -> None:
        """Before `rows` rows are stepped (here or inside a captured search round)."""
        if all(r.deliberator.closed for r in self.requests):
            raise PlanCancelled()
        self.runtime.rows_stepped += rows

