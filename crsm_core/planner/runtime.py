"""The planner runtime: one worker that plans for every deliberating session of a model.

A session hands it plain data (`PlanRequest`: its settings, a snapshot S_t of its state with the
logits that came with it, its token log, how it samples, a cancel flag). The worker takes every queued
request that can share a search and runs, for all of them at once (R roots, mctx-style trees of
tensors):

1. speculate: advance each snapshot through `lead` tokens drawn exactly as its generator will draw
   them (the same counter-based sampler, seed and draw count: at any temperature the speculated
   tokens are the generator's own, until something changes its state), to the root position r;
2. search from S_r, whose priors are the exact logits there;
3. read out, per root: a*, the child state T of a* (a state of position r + 1), the values, the gates
   of its session's settings, the veto against the model's calibrated spread threshold;
4. deliver: an entry that reaches its session after its state position is caught up (injection.catch_up,
   batched over the late entries) through the tokens the generator emitted meanwhile, until it
   stands at most a token or two behind the generator, which does the rest with the same function.
   An entry whose assumed tokens were not emitted, or whose action turned out to be the emitted token
   (nothing to change), is resolved here.

How far ahead a plan speculates (`lead`) follows the measured latency (`LeadEstimator`): a plan is on
time when it is done before the generator reaches its root, and speculating further costs the
planner one step per token too, so the lead that lands on time exists only where the planner steps
faster than the generator.

Where the steps run (`PlannerMode`, chosen once per runtime):
- "stream": the worker's own thread and, on a GPU, a low-priority CUDA stream; steps and searches are
  replayed from CUDA graphs (planner/captured.py, backbone/graphs.py).
- "ride": every state step is handed to the generator, whose batched decode step carries the rows
  after its own (`Engine.ride`); the worker keeps the tree work and the value heads.
Off the GPU both are eager computation on the CPU, in the same order. The worker runs under
`torch.inference_mode()`, like the generator: captured graphs write inference tensors, which may only
be updated in place in that mode.

Memory: a search's buffers hold `CapturedSearch.rows_per_root(config)` states per root (planner/
captured.py), so a plan's cost is known from its settings and the state size. A request whose single
root would exceed `memory_budget_bytes` is refused (`check`), and a search takes at most as many roots
as fit; at most two searches' buffers are kept.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .. import host_memory
from ..backbone import MambaLM
from ..backbone.graphs import CapturedStepper
from ..engine_config import PLANNER_MODES, PlannerMode
from ..injection import Effect, InjectionOutcome, TargetEntry, catch_up, gates, verdict
from ..sampling import SamplingParams, SamplingTable
from ..state import RecurrentState, StepFn
from ..streams import Lane, hand_over, record_current, wait
from ..value import ValueHeads, spread
from .captured import CapturedSearch
from .search import PlannerConfig, SearchResult, ValueFn, search

if TYPE_CHECKING:
    from ..deliberation import DeliberationConfig

log = logging.getLogger(__name__)


def resolve_planner_mode(mode: str, device: torch.device) -> PlannerMode:
    """"auto": "ride" on a GPU, where it cost the generator least (docs/benchmarks.md), "stream"
    elsewhere (on the CPU a planner thread uses a second core, while riding rows would lengthen every
    decode step)."""
    if mode == "auto":
        return "ride" if device.type == "cuda" else "stream"
    if mode not in PLANNER_MODES:
        raise ValueError(f"planner mode must be 'auto' or one of {PLANNER_MODES}, got {mode!r}")
    return mode


# Rows a captured planner stepper steps per replay (more are done in several replays).
CAPTURED_ROWS = 64
# Searches whose buffers are kept (each holds its node pools: CapturedSearch.rows_per_root).
CAPTURED_SEARCHES = 2
# The worker catches a late entry up until it stands at most this many tokens behind the generator
# (which steps it through the rest), or gives up after CATCH_UP_ROUNDS passes.
GENERATOR_CATCH_UP = 1
CATCH_UP_ROUNDS = 4


class PlanCancelled(Exception):
    """Every session of the batch in hand has closed, or the engine that steps its rows stopped."""


class TokenLog:
    """A session's tokens by position (prompt first), appended by its generator, read by the planner."""

    def __init__(self, tokens: Sequence[int] = ()):
        self._tokens = list(tokens)
        self._lock = threading.Lock()

    def append(self, token: int) -> None:
        with self._lock:
            self._tokens.append(token)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)

    def __getitem__(self, index):
        with self._lock:
            return self._tokens[index]

    def snapshot(self) -> list[int]:
        with self._lock:
            return list(self._tokens)


@dataclass
class PlanRequest:
    """What a session hands the planner: plain data, nothing that calls back into the session."""
    generation_id: int
    config: "DeliberationConfig"
    snapshot: RecurrentState                # 1 row: S_t (consumed by the plan)
    logits: torch.Tensor                    # [1, V]: the distribution of token t
    position: int                           # t
    tokens: TokenLog                        # the session's tokens (the generator appends)
    sampling: SamplingParams                # how the generator draws (to speculate its tokens)
    seed: int
    drawn: int                              # tokens the generator has drawn before position t
    lead: int                               # tokens to speculate before the root (0: plan for t itself)
    veto_threshold: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    captured_at: float = field(default_factory=time.monotonic)
    ready: torch.cuda.Event | None = None   # after the snapshot copies, on the generator's stream
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def search_key(self) -> tuple:
        """Requests with equal keys can share one batched search."""
        c = self.config
        return self.lead, c.steps, c.planner, c.verifier


@dataclass
class PlanResult:
    """What a plan produced for its session: an entry to resolve at the generator, or one the worker
    resolved already (`outcome` set)."""
    entry: TargetEntry
    outcome: InjectionOutcome | None = None
    effect: Effect | None = None
    reason: str = ""
    position: int = 0        # the generator's position when the worker resolved it


class LeadEstimator:
    """How many tokens to speculate so that a plan is done before the generator reaches its root.

    From finished plans (moving averages): rate, the generator's positions per second while the plan
    ran; per_token, the planner's seconds per speculated token; search, the seconds of everything else.
    A plan of lead L is on time when L * per_token + search <= L / rate, i.e. when
    L >= rate * search / (1 - rate * per_token), which exists only while the planner steps faster than
    the generator (rate * per_token < 1). Otherwise the lead is 0: plans are for the position they
    start at, arrive after it, and are caught up."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.rate: float | None = None
        self.per_token: float | None = None
        self.search: float | None = None
        self._lock = threading.Lock()

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe(self, positions: int, elapsed_s: float, lead: int, speculate_s: float, rest_s: float) -> None:
        with self._lock:
            if elapsed_s > 0 and positions > 0:
                self.rate = self._mix(self.rate, positions / elapsed_s)
            if lead > 0:
                self.per_token = self._mix(self.per_token, speculate_s / lead)
            self.search = self._mix(self.search, rest_s)

    def lead(self, max_lead: int) -> int:
        with self._lock:
            if self.rate is None or self.search is None:
                return 0
            per_token = self.per_token if self.per_token is not None else 0.0
            speed = self.rate * per_token
            if speed >= 0.9:      # the planner cannot outrun the generator: plan for now, catch up
                return 0
            return min(max_lead, math.ceil(self.rate * self.search / (1 - speed)) + 1)

    def as_dict(self) -> dict[str, float | None]:
        with self._lock:
            return {"generator_positions_per_s": self.rate, "speculate_s_per_token": self.per_token,
                    "search_s": self.search}


def head_values(value_heads: ValueHeads) -> ValueFn:
    """The learned heads as the search's value function: per-layer probabilities; they read states only
    (and so can be captured in a CUDA graph). Heads not shown to rank candidates better than the model's
    own prior (ValueHeadsConfig.beats_prior, stage 3) would only mislead the search: then every node gets
    the same value, and the search keeps the model's choice (policy.final_slot)."""
    if not value_heads.config.beats_prior:
        def uninformative(states: RecurrentState, roots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return states.ssm.new_full((states.batch, value_heads.config.n_layer), 0.5, dtype=torch.float32)
        return uninformative

    def value(states: RecurrentState, roots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(value_heads(states))
    return value


# A verifier: given the tokens before each root (contexts[r]: prompt, generated and speculated tokens),
# the search's value function for that batch; it reads the tokens, not the states.
Verifier = Callable[[list[list[int]]], ValueFn]


class PlannerRuntime:
    """Plans for many sessions from one worker thread (started on the first request)."""

    def __init__(self, backbone: MambaLM, dynamics: StepFn, value_heads: ValueHeads, *,
                 mode: PlannerMode = "stream", ride: StepFn | None = None, max_roots: int = 16,
                 memory_budget_bytes: int | None = None, eos_id: int | None = None,
                 dynamics_top1: float | None = None, verifiers: dict[str, Verifier] | None = None):
        if mode not in PLANNER_MODES:
            raise ValueError(f"planner mode must be one of {PLANNER_MODES}, got {mode!r}")
        if (mode == "ride") != (ride is not None):
            raise ValueError("ride mode needs the generator's ride step, and only ride mode takes one")
        self.backbone, self.value_heads, self.mode, self.max_roots = backbone, value_heads, mode, max_roots
        self.device = backbone.device
        self.eos_id = eos_id
        self.dynamics_top1 = dynamics_top1
        self.verifiers = dict(verifiers or {})
        self.lane = Lane(self.device, "low")
        on_gpu = self.device.type == "cuda"
        self.row_bytes = RecurrentState.bytes_per_row(backbone.config, backbone.dtype)
        if memory_budget_bytes is None:
            memory_budget_bytes = (16 if on_gpu else 2) * 2 ** 30
        self.memory_budget_bytes = memory_budget_bytes
        # The one choice of where steps run: every step of this runtime (speculation, search, catch-up)
        # goes through these.
        if ride is not None:
            self._steps: dict[str, StepFn] = {"exact": ride, "dynamics": ride}
            self._round_steps: dict[str, StepFn | None] = {"exact": None, "dynamics": None}
        else:
            exact = CapturedStepper(backbone, backbone.step, CAPTURED_ROWS).step if on_gpu else backbone.step
            latent = CapturedStepper(backbone, dynamics, CAPTURED_ROWS).step if on_gpu else dynamics
            self._steps = {"exact": exact, "dynamics": latent}
            self._round_steps = {"exact": backbone.step, "dynamics": dynamics}
        self._ride = ride
        self._prefill = backbone.prefill   # a long catch-up: one chunked scan, on this runtime's stream
        # The generator's part of a catch-up (the last token or two), on its own stream: graphs of a few rows.
        self.generator_step: StepFn = CapturedStepper(backbone, backbone.step, 16).step if on_gpu else backbone.step
        self.lead_estimator = LeadEstimator()
        self._searches: dict[tuple, CapturedSearch] = {}
        self._cond = threading.Condition()
        self._queue: deque[PlanRequest] = deque()
        self._batch: list[PlanRequest] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0        # searches run (each over one or more sessions' roots)
        # Rows advanced by one token by this runtime's plans, finished or not: what the planners computed.
        self.rows_stepped = 0

    # ---- limits -------------------------------------------------------------------------------

    def plan_bytes(self, planner: PlannerConfig) -> int:
        """Bytes of state one root of a search with these settings holds."""
        return CapturedSearch.rows_per_root(planner) * self.row_bytes

    def roots_that_fit(self, planner: PlannerConfig) -> int:
        """The most roots a search of these settings may take. On a GPU every bucket of roots up to it
        (1, 2, 4, ...) is captured with buffers of its own, about twice the largest in all."""
        per_root = self.plan_bytes(planner)
        if self.device.type == "cuda":
            return max(0, min(self.max_roots, (self.memory_budget_bytes // per_root + 1) // 2))
        return max(0, min(self.max_roots, self.memory_budget_bytes // per_root))

    def check(self, config: "DeliberationConfig") -> None:
        """Raise ValueError (naming the setting) for a config this runtime cannot plan for."""
        if self.roots_that_fit(config.planner) < 1:
            raise ValueError(
                f"deliberation with {config.planner.n_simulations} simulations needs "
                f"{self.plan_bytes(config.planner) / 2 ** 20:.0f} MiB of planner memory per plan; this server's "
                f"planner budget is {self.memory_budget_bytes / 2 ** 20:.0f} MiB")
        if config.verifier is not None and config.verifier not in self.verifiers:
            known = ", ".join(sorted(self.verifiers)) or "none"
            raise ValueError(f"unknown verifier {config.verifier!r}; this server knows: {known}")
        if config.steps == "dynamics":
            from ..deliberation import DYNAMICS_MIN_TOP1
            if self.dynamics_top1 is None or self.dynamics_top1 < DYNAMICS_MIN_TOP1:
                measured = "not measured" if self.dynamics_top1 is None else f"{self.dynamics_top1:.3f}"
                raise ValueError(f"steps 'dynamics' needs a latent dynamics model whose top-1 agreement with "
                                 f"exact steps is at least {DYNAMICS_MIN_TOP1} (this model's: {measured})")

    # ---- callers ------------------------------------------------------------------------------

    def submit(self, requests: list[PlanRequest]) -> list[concurrent.futures.Future]:
        """Queue requests (together: the worker sees all of them at once); each one's future gets its
        PlanResult (or PlanCancelled, or the planner's error)."""
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
            with torch.inference_mode(), self.lane.active():
                self._captured_search(config)

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
            limit = max(1, self.roots_that_fit(self._queue[0].config.planner))
            while self._queue:
                request = self._queue.popleft()
                (batch if request.search_key == key and len(batch) < limit else rest).append(request)
            self._queue = rest
            self._batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            return self._batch

    def _run(self) -> None:
        with torch.inference_mode(), self.lane.active():
            while (batch := self._take()) is not None:
                if batch:
                    self._run_batch(batch)
                batch = None
                with self._cond:
                    idle = not self._queue
                if idle and self._searches and self.device.type != "cuda":
                    # Off the GPU nothing is captured, and buffers cost only their allocation: an idle
                    # planner holds none (a search of 256 simulations holds ~0.6 GB a root on the default
                    # model). On a GPU the captured graphs own theirs and stay.
                    self._searches.clear()
                    host_memory.release()

    def _run_batch(self, batch: list[PlanRequest]) -> None:
        results: list[PlanResult] | None = None
        failure: BaseException | None = None
        try:
            results = self._plan(batch)
        except PlanCancelled:
            failure = PlanCancelled()
        except Exception as e:  # a planner bug fails these plans, not the worker or the sessions
            log.exception("planning failed for %d session(s)", len(batch))
            # without its traceback: a failed plan must not keep its frames (and their tensors) alive
            failure = RuntimeError(f"{type(e).__name__}: {e}")
        for request in batch:   # the plan owned the snapshot; free it now, not with the future
            request.snapshot = request.logits = None
        with self._cond:
            self._batch = []
        for i, request in enumerate(batch):
            if failure is None:
                request.future.set_result(results[i])
            else:
                request.future.set_exception(failure)

    # ---- one batched plan ---------------------------------------------------------------------

    def _guard(self, requests: list[PlanRequest]) -> Callable[[int], None]:
        """Called before every batched step: stops the plan once every session it plans for has closed,
        and counts the rows."""
        def before(rows: int) -> None:
            if all(r.cancelled.is_set() for r in requests):
                raise PlanCancelled()
            self.rows_stepped += rows
        return before

    def _plan(self, requests: list[PlanRequest]) -> list[PlanResult]:
        started = time.monotonic()
        for request in requests:
            wait(request.ready)
            hand_over(request.snapshot, request.logits)
        cfg, lead = requests[0].config, requests[0].lead
        step, guard = self._steps[cfg.steps], self._guard(requests)
        states = RecurrentState.cat([r.snapshot for r in requests])           # R rows: S_t
        logits = torch.cat([r.logits for r in requests]).float()              # [R, V]
        # the live states' norms, for TargetBuffer's bound on a target's norm: taken before the plan moves
        # the snapshots, read on the CPU once the search has synchronised anyway
        live_norms = states.layer_norms()                                     # [L, R]
        speculated, logits = self._speculate(requests, states, logits, lead, step, guard)
        speculate_s = time.monotonic() - started
        result = self._search(requests, speculated, states, logits, guard)
        entries = self._entries(requests, result, speculated, live_norms.cpu())
        for request, entry in zip(requests, entries):
            self.lead_estimator.observe(len(request.tokens) - request.position, time.monotonic() - request.captured_at,
                                        lead, speculate_s, time.monotonic() - started - speculate_s)
        results = self._deliver(requests, entries, step, guard)
        ready = self.lane.record()
        for result_ in results:
            result_.entry.ready = ready
        self.batches += 1
        return results

    def _speculate(self, requests: list[PlanRequest], states: RecurrentState, logits: torch.Tensor, lead: int,
                   step: StepFn, guard: Callable[[int], None]) -> tuple[list[tuple[int, ...]], torch.Tensor]:
        """Advance `states` (R rows, in place) through `lead` tokens drawn as each session's generator
        draws them. Returns the tokens per root and the logits at the roots [R, V]."""
        if lead == 0:
            return [() for _ in requests], logits
        table = SamplingTable(len(requests), self.device)
        for i, request in enumerate(requests):
            start = request.position - request.drawn   # where the generated tokens begin
            table.set_row(i, request.sampling, request.seed, request.drawn, vocab=logits.shape[-1],
                          prompt=request.tokens[:start], output=request.tokens[start:request.position])
        drawn = []
        for _ in range(lead):
            tokens = table.sample(logits)
            table.record(tokens)
            drawn.append(tokens)
            guard(len(requests))
            logits = step(tokens, states).float()
        per_root = torch.stack(drawn, dim=1).tolist()                         # one sync
        return [tuple(t) for t in per_root], logits

    def _search(self, requests: list[PlanRequest], speculated: list[tuple[int, ...]], states: RecurrentState,
                logits: torch.Tensor, guard: Callable[[int], None]) -> SearchResult:
        """With the learned heads: the captured search. With a verifier (Python code reading tokens, which no
        graph can hold): the eager search, its steps through this runtime's step function."""
        cfg = requests[0].config
        if cfg.verifier is None:
            return self._captured_search(cfg).run(states, logits, guard)
        contexts = [r.tokens[:r.position] + list(s) for r, s in zip(requests, speculated)]
        step = self._steps[cfg.steps]

        def guarded(tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
            guard(tokens.shape[0])
            return step(tokens, state)

        return search(states, logits, guarded, self.verifiers[cfg.verifier](contexts), cfg.planner,
                      terminal_token=self.eos_id)

    def _captured_search(self, cfg: "DeliberationConfig") -> CapturedSearch:
        """The search for this planner config and step mode (made, and on a GPU captured, on first use).
        Within the memory budget: the least recently used search goes to make room."""
        key = (cfg.planner, cfg.steps)
        found = self._searches.pop(key, None)
        if found is None:
            while len(self._searches) >= CAPTURED_SEARCHES:
                self._searches.pop(next(iter(self._searches)))
            roots = max(1, self.roots_that_fit(cfg.planner))
            found = CapturedSearch(cfg.planner, self.backbone.allocate_state(1), self.backbone.config.vocab_size,
                                   self.value_heads.config.n_layer, head_values(self.value_heads),
                                   step_fn=self._round_steps[cfg.steps], ride=self._ride, max_roots=roots,
                                   terminal_token=self.eos_id)
        self._searches[key] = found   # most recently used last
        return found

    def _entries(self, requests: list[PlanRequest], result: SearchResult, speculated: list[tuple[int, ...]],
                 live_norms: torch.Tensor) -> list[TargetEntry]:
        # [R, ...] on the CPU: gates made from them must be there (RecurrentState.blend_ reads them on the
        # host, which for a GPU tensor would stall the generator)
        layer_values = result.layer_values.float().cpu()
        actions = result.action.tolist()
        root_q, visits = result.root_q.float().cpu(), result.root_visits.cpu()
        candidates = result.root_actions.cpu()
        stats = {k: float(v) for k, v in asdict(result.stats).items()}
        roots = len(requests)
        entries = []
        n_layer = self.backbone.config.n_layer
        for i, request in enumerate(requests):
            c = request.config
            values = layer_values[i].expand(n_layer) if layer_values.shape[1] == 1 else layer_values[i]  # a verifier: one
            chosen = int((candidates[i] == actions[i]).nonzero()[0, 0])
            q_best = float(root_q[i, chosen])
            valued = [k for k in range(candidates.shape[1]) if k != chosen and int(visits[i, k]) > 0]
            beats = frozenset(int(candidates[i, k]) for k in valued if q_best - float(root_q[i, k]) >= c.adoption_margin)
            disagreement = float(spread(values))
            vetoed = disagreement > request.veto_threshold
            alpha = torch.zeros_like(values) if vetoed else \
                gates(values.contiguous(), c.injection_rate, c.weights(n_layer))
            entries.append(TargetEntry(
                generation_id=request.generation_id, captured_position=request.position,
                assumed_tokens=speculated[i], action=actions[i], candidates=tuple(candidates[i].tolist()), beats=beats,
                confident=bool(valued) and len(beats) == len(valued), value=q_best,
                target_state=result.target_state.rows(slice(i, i + 1)).clone(), alpha=alpha, vetoed=vetoed,
                spread=disagreement, veto_threshold=request.veto_threshold,
                planner_stats={**stats, "simulations_per_root": result.stats.simulations / roots,
                               "state_steps": result.stats.rows_stepped / roots + len(speculated[i])},
                captured_at=request.captured_at, reference_norms=live_norms[:, i]))
        return entries

    def _deliver(self, requests: list[PlanRequest], entries: list[TargetEntry], step: StepFn,
                 guard: Callable[[int], None]) -> list[PlanResult]:
        """Resolve or catch up the entries their sessions have passed (see the module docstring)."""
        results = [PlanResult(entry) for entry in entries]

        def counted(tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
            guard(tokens.shape[0])
            return step(tokens, state)

        for _ in range(CATCH_UP_ROUNDS):
            late = []
            for request, result in zip(requests, results):
                if result.outcome is not None or request.cancelled.is_set():
                    continue
                emitted = request.tokens.snapshot()
                found = verdict(result.entry, emitted, len(emitted), request.config.max_lag)
                if found is not None:
                    result.outcome, result.effect, result.reason = found.outcome, found.effect, found.reason
                    result.position = len(emitted)
                elif len(emitted) > result.entry.state_position + GENERATOR_CATCH_UP:
                    late.append((result.entry, emitted))
            if not late:
                break
            catch_up([e for e, _ in late], [t for _, t in late], [len(t) for _, t in late], counted,
                     prefill=self._prefill)
        return results
