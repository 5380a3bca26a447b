"""Continuous-batching generation engine.

One generator thread owns the model. Every iteration it
  1. drops cancelled sessions and admits waiting ones while slots are free,
  2. prefills up to `prefill_chunk` prompt tokens, shared among every prompt being prefilled (fewest
     remaining first) and batched: the pieces of one length of all the prompts are one backbone call
     (a long prompt takes several iterations, so the sessions already streaming keep getting a token
     every iteration; on CUDA each call is a graph replay),
  3. runs one decode round for all running sessions, queued on the GPU without waiting for it:
     sample token q of every row from the last logits (on the device), apply due injections and take
     planner snapshots, then one batched decode step `_decode` over pool rows [0, n) (plus, in "ride"
     mode, the planners' rows after them) that consumes those tokens;
  4. waits only for the sampled tokens (not for the step just launched) and streams them, so the
     host's work for one token overlaps the GPU's step for the next. That is the one host
     synchronisation per token.

Running sessions always occupy the rows [0, n) of the slot pool: a session that leaves has the last row
moved into its hole. That is the contract of `CapturedDecoder`, whose graphs (on CUDA) step rows
[0:bucket] of the pool in place; prompts are prefilled in a pool of their own (a row per prefilling
session) and copied into row n when they start running, so no live state ever sits beyond the running
rows.

Whatever fails for one session (its prefill, taking its row, making its planner, taking a token) ends
that session alone with an ErrorEvent; a batched prefill that raises is retried session by session.

Positions follow the project convention: position t = tokens consumed so far. The token chosen at
position t is sampled from the logits produced by the step that consumed token t-1 (or by the
prefill); the decode step then consumes it.

Events leave the generator once per iteration, all of them in one batch, through the engine's
`EventSink`: in one process (`LoopSink`) one `loop.call_soon_threadsafe` per iteration puts them on
the sessions' asyncio queues (not one per token per session: each wakes the event loop and takes the
GIL); in the engine core process (engine_core.py) one message per iteration crosses to the front end.
The event loop never runs model code.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Protocol

import torch

from .backbone import MambaLM
from .backbone.graphs import CapturedDecoder, CapturedPrefill
from .deliberation import DeliberationConfig, SessionDeliberator
from .engine_config import EngineConfig
from .injection import catch_up
from .planner.runtime import PlanCancelled, PlannerRuntime, TokenLog, resolve_planner_mode
from .planner.search import PlannerConfig
from .sampling import SamplingParams, SamplingTable
from .state import RecurrentState
from .stopping import StopMatcher
from .streams import Lane, hand_over, record_current, wait
from .tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    from .model import CRSMModel

log = logging.getLogger(__name__)

PARKED_POLL_S = 0.05   # how often a generator with only parked sessions checks their time-outs
INT64_MAX = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # alternatives a token's logprobs may list (OpenAI's and vLLM's limit)


class QueueFull(RuntimeError):
    """The waiting queue is full; try again after `retry_after_s`."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"the server is busy: {waiting} requests are already waiting")
        self.waiting, self.retry_after_s = waiting, retry_after_s

    def __reduce__(self):   # the engine core sends its refusals to the front end pickled
        return type(self), (self.waiting, self.retry_after_s)


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new sessions."""


class RequestError(ValueError):
    """A request the engine cannot run; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):
        return type(self), (str(self), self.param)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    deliberation: DeliberationConfig | None = None  # None: no planner for this session
    stop_token_ids: tuple[int, ...] = ()   # tokens that end the session as eos does (and add no text)
    include_stop_str_in_output: bool = False   # the matched stop string ends the text instead of being cut
    logprobs: int | None = None   # each token's log-probability and this many top alternatives; None: none


@dataclass(frozen=True)
class PlannerLimits:
    """What deliberating requests may ask of an engine's planner (the server's schema states them)."""
    max_simulations: int           # the most simulations per plan whose node pool fits (0: none)
    verifiers: tuple[str, ...]     # the checkers a request may name


# ---- events handed to the session's queue -------------------------------------------------------------

@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str       # text released with this token ("" while a UTF-8 character or a stop string is pending)
    position: int   # index of this token in the whole sequence (prompt tokens first)
    # with request.logprobs: log p(token) under the model's raw distribution at this position (before the
    # temperature and the sampler's adjustments), and the most likely tokens' (id, logprob), best first
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queue_s: float                # submitted -> slot taken
    ttft_s: float | None          # submitted -> first token
    mean_itl_s: float | None      # mean gap between consecutive tokens
    tokens_per_s: float | None    # decode rate after the first token
    total_s: float                # submitted -> finished


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str            # "stop" (eos or stop string), "length", "cancelled"
    usage: Usage
    timings: Timings
    deliberation: dict | None     # the deliberator's counters, when deliberation ran
    # a cancelled session: decode steps the engine ran between the cancellation and the slot's release
    # (at most 1: the step in flight when it came)
    steps_after_cancel: int | None = None


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    code: str                     # "shutdown" | "queue_timeout" | "internal_error"
    retry_after_s: int | None = None   # when trying again later may succeed ("queue_timeout")


# Makes a deliberating session's planner (crsm_core.deliberation.SessionDeliberator), when it is admitted.
DeliberatorFactory = Callable[["Session"], SessionDeliberator]


@dataclass(frozen=True)
class SessionRecord:
    """What metrics keep of a finished session (plain data: it crosses to the front end's process)."""
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    inter_token_s: tuple[float, ...]     # the gaps between consecutive tokens
    simulations: int = 0                 # of its planner, when it deliberated
    planner_failures: int = 0


class EngineListener(Protocol):
    """Observes sessions for metrics. Called from the generator thread (or, with the engine in its own
    process, from the front end's channel reader)."""

    def injection(self, event: object) -> None: ...

    def planner_error(self) -> None: ...

    def session_ended(self, record: SessionRecord) -> None:
        """Before the session's final event is sent."""


class EventSink(Protocol):
    """Where the generator hands its events: one call per iteration, in order."""

    def deliver(self, batch: list[tuple["Session", object]]) -> None: ...


class LoopSink:
    """Events to each session's asyncio queue: one `call_soon_threadsafe` per event loop per batch."""

    def deliver(self, batch: list[tuple["Session", object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Session, object]]] = {}
        for session, event in batch:
            by_loop.setdefault(session.loop, []).append((session, event))
        for loop, items in by_loop.items():
            if loop.is_closed():
                log.warning("event loop closed; dropping %d events", len(items))
                continue
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple["SessionStream", object]]) -> None:
    for session, event in items:
        session.events.put_nowait(event)


class SessionStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    PARKED = "parked"          # synchronous deliberation: waits, out of the batch, for its plan
    FINISHED = "finished"


@dataclass
class Completion:
    """Everything a finished session produced (for answers that are not streamed)."""
    text: str
    token_ids: list[int]
    injections: list
    done: DoneEvent
    token_events: list[TokenEvent] = field(default_factory=list)   # in order (their text and logprobs)


class GenerationFailed(RuntimeError):
    def __init__(self, event: ErrorEvent):
        super().__init__(event.message)
        self.event = event


class SessionStream:
    """A session as its client reads it, on the event loop: its events in order (`stream`, `collect`),
    and `cancel`. `Session` is the engine's own; engine_core.RemoteSession the front end's, in another
    process than the engine."""

    def __init__(self, session_id: str):
        self.id = session_id
        self.events: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        raise NotImplementedError

    async def stream(self) -> AsyncIterator[TokenEvent | DoneEvent | ErrorEvent | object]:
        """Every event, ending with exactly one DoneEvent or ErrorEvent."""
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, (DoneEvent, ErrorEvent)):
                return

    async def batches(self) -> AsyncIterator[list[TokenEvent | DoneEvent | ErrorEvent | object]]:
        """The same events as `stream`, each time as many as have arrived (at least one). A front end that
        falls behind the generator then writes a backlog in one send instead of one per event, so that its
        cost per event falls as the load rises."""
        while True:
            batch = [await self.events.get()]
            while not isinstance(batch[-1], (DoneEvent, ErrorEvent)) and not self.events.empty():
                batch.append(self.events.get_nowait())
            yield batch
            if isinstance(batch[-1], (DoneEvent, ErrorEvent)):
                return

    async def collect(self) -> Completion:
        tokens: list[TokenEvent] = []
        injections: list = []
        async for event in self.stream():
            if isinstance(event, TokenEvent):
                tokens.append(event)
            elif isinstance(event, DoneEvent):
                return Completion("".join(t.text for t in tokens), [t.token_id for t in tokens], injections, event,
                                  tokens)
            elif isinstance(event, ErrorEvent):
                raise GenerationFailed(event)
            else:
                injections.append(event)
        raise AssertionError("unreachable: stream() ends with a final event")


class Session(SessionStream):
    """One generation, as the engine runs it. Created by `Engine.submit` (its events go to `loop`) or by
    the engine core (`loop` None: its events go to the front end's process)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None, engine: "Engine",
                 tokenizer: Tokenizer, session_id: str | None = None):
        super().__init__(session_id or uuid.uuid4().hex)
        self.request = request
        self.loop = loop
        self.status = SessionStatus.WAITING
        self.row: int | None = None
        self.tokens: list[int] = []                       # generated
        self.sequence = TokenLog(request.prompt_ids)      # by position: prompt, then generated
        self.injections: list = []
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.token_times: list[float] = []
        self.finished_at: float | None = None
        self.deliberator: SessionDeliberator | None = None
        self.planner_failed = False  # its deliberator raised; the session continues without it
        self.parked: tuple[RecurrentState, torch.Tensor, float] | None = None   # (state, logits [V], since)
        self.seed = request.sampling.resolved_seed()
        self._cancel_requested = False
        self._cancelled_at_step: int | None = None   # the engine's decode_steps when cancel() came
        self._engine = engine
        # generator-thread state
        self._prefilled = 0
        self._prefill_row: int | None = None   # its row of the prefill pool while it is prefilled
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = StopMatcher(request.stop, include=request.include_stop_str_in_output)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self._cancel_requested

    def cancel(self) -> None:
        """Leave the batch before the next step (thread-safe; no effect once finished)."""
        if self.status is not SessionStatus.FINISHED and not self._cancel_requested:
            self._cancelled_at_step = self._engine.decode_steps
            self._cancel_requested = True
            self._engine._wake()

    def timings(self) -> Timings:
        end = self.finished_at or time.perf_counter()
        first = self.token_times[0] if self.token_times else None
        n = len(self.token_times)
        span = self.token_times[-1] - first if n > 1 else None
        return Timings(
            queue_s=(self.admitted_at or end) - self.submitted_at,
            ttft_s=None if first is None else first - self.submitted_at,
            mean_itl_s=None if span is None else span / (n - 1),
            tokens_per_s=None if not span else (n - 1) / span,
            total_s=end - self.submitted_at,
        )

    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    def record(self) -> SessionRecord:
        counters = self.deliberator.counters() if self.deliberator is not None else {}
        return SessionRecord(self.prompt_tokens, len(self.tokens), self.timings().ttft_s,
                             tuple(self.inter_token_latencies()), counters.get("simulations", 0),
                             counters.get("failed", 0))

    def _emit(self, event: object) -> None:
        """From the generator thread: the event leaves with this iteration's batch (`Engine._flush`)."""
        self._engine._outbox.append((self, event))


@dataclass
class _Ride:
    """Planner rows to be stepped inside the next decode step ("ride" mode)."""
    tokens: torch.Tensor                   # [K] long, on the planner's stream
    state: RecurrentState                  # K rows, advanced in place
    ready: torch.cuda.Event | None         # the planner's stream has written tokens and state
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


class ServingEngine(Protocol):
    """What the server drives: an `Engine` in its own process, or the client of one in a process of its
    own (engine_core.EngineCoreClient)."""
    tokenizer: Tokenizer
    vocab_size: int

    @property
    def num_active(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_planners(self) -> int: ...

    async def open(self, requests: list[GenerationRequest]) -> list[SessionStream]: ...

    def planner_limits(self, base: PlannerConfig, max_simulations: int) -> PlannerLimits | None: ...

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None: ...


class Engine:
    def __init__(self, model: MambaLM, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 deliberator_factory: DeliberatorFactory | None = None,
                 listener: EngineListener | None = None, sink: EventSink | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self._deliberator_factory = deliberator_factory
        self._listener = listener
        self._sink = sink or LoopSink()
        self._outbox: list[tuple[Session, object]] = []   # generator thread only: this iteration's events
        # event loop side: sessions opened in this pass of each loop, queued at its end (`open`)
        self._opening: dict[asyncio.AbstractEventLoop, list[tuple[list[Session], asyncio.Future]]] = {}
        self._planner_runtime: PlannerRuntime | None = None   # owned (closed at shutdown) when set
        self.planner_mode = resolve_planner_mode(config.planner_mode, self.device)
        n = config.max_sessions
        rows = n + (config.ride_rows if self.planner_mode == "ride" else 0)
        with torch.no_grad():
            self.pool = model.allocate_state(rows)
            self._logits = torch.zeros(n, self.vocab_size, dtype=torch.float32, device=self.device)  # [n, V]
            self._host_tokens = torch.zeros(n, dtype=torch.long, pin_memory=self.device.type == "cuda")
            # logprobs of rows [0, n): (chosen, top k) values and top k ids, flat so that any [n, k] is dense
            self._host_logprobs = torch.zeros(n * (1 + MAX_TOP_LOGPROBS), pin_memory=self.device.type == "cuda")
            self._host_top_ids = torch.zeros(n * MAX_TOP_LOGPROBS, dtype=torch.long,
                                             pin_memory=self.device.type == "cuda")
        self._sampler = SamplingTable(n, self.device)
        # On CUDA the decode step replays a graph captured per batch-size bucket over pool rows [0:bucket],
        # and each batched prefill piece a graph per (length, batch bucket), captured here; elsewhere they
        # run eagerly. Prompts are prefilled in a pool of their own: the decode graphs step rows past the
        # running ones too.
        self._stepper = CapturedDecoder(model, max_batch=rows, pool=self.pool)
        self._prefill = CapturedPrefill(model, rows=n, budget=config.prefill_chunk)
        self._free_prefill_rows = list(range(n))     # generator thread only
        self._lane = Lane(self.device, "high")
        self._cond = threading.Condition()
        self._waiting: deque[Session] = deque()     # guarded by _cond
        self._rides: deque[_Ride] = deque()         # guarded by _cond
        self._prefilling: list[Session] = []        # generator thread only, in admission order
        self._running: list[Session] = []           # generator thread only; _running[i].row == i
        self._parked: list[Session] = []            # generator thread only (synchronous deliberation)
        self._accepting = True
        self._stopping = False
        self._open_planners = 0
        self._planner_lock = threading.Lock()
        self.decode_steps = 0
        self._thread = threading.Thread(target=self._run, name="crsm-generator", daemon=True)

    @classmethod
    def for_model(cls, model: "CRSMModel", config: EngineConfig = EngineConfig(),
                  listener: EngineListener | None = None, sink: EventSink | None = None) -> "Engine":
        """The engine of a loaded model: its backbone and tokenizer, and a planner per deliberating
        session on a planner runtime of the engine's own (`planner_mode`)."""
        if model.tokenizer is None:
            raise ValueError("the engine needs a model with a tokenizer")
        engine = cls(model.backbone, model.tokenizer, config, listener=listener, sink=sink)
        ride = engine.ride_step if engine.planner_mode == "ride" else None
        runtime = model.planner_runtime(engine.planner_mode, ride=ride)
        engine._planner_runtime = runtime
        engine._deliberator_factory = lambda session: model.new_deliberator(
            session.request.deliberation, runtime, tokens=session.sequence, sampling=session.request.sampling,
            seed=session.seed, notify=engine._wake)
        return engine

    # ---- event-loop side ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        """Sessions holding a slot (prefilling, decoding, or parked for their plan)."""
        return len(self._prefilling) + len(self._running) + len(self._parked)

    @property
    def planner_runtime(self) -> PlannerRuntime | None:
        """The planner runtime the engine owns (made by `for_model`), if any."""
        return self._planner_runtime

    @property
    def num_planners(self) -> int:
        """Deliberators created and not yet closed."""
        return self._open_planners

    def planner_limits(self, base: PlannerConfig, max_simulations: int) -> PlannerLimits | None:
        """What deliberating requests may ask of this engine's planner (None: it has none), for plans
        like `base`: the most simulations up to `max_simulations` whose node pool fits."""
        runtime = self._planner_runtime
        if runtime is None:
            return None
        fits = [n for n in range(1, max_simulations + 1)
                if runtime.roots_that_fit(dataclasses.replace(base, n_simulations=n)) >= 1]
        return PlannerLimits(max(fits, default=0), tuple(sorted(runtime.verifiers)))

    def validate(self, request: GenerationRequest) -> None:
        c = self.config
        if not request.prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        if len(request.prompt_ids) > c.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(request.prompt_ids)} tokens; the limit is "
                               f"{c.max_prompt_tokens}", "prompt")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}", "token_ids")
        if not 1 <= request.max_tokens <= c.max_new_tokens:
            raise RequestError(f"max_tokens must be in [1, {c.max_new_tokens}], got {request.max_tokens}",
                               "max_tokens")
        # Every integer that reaches a tensor is bounded here: past int64 it would fail on the generator
        # thread, in the middle of an admission (the seed is kept to its 64 bits by SamplingParams).
        if not 0 <= request.sampling.top_k <= INT64_MAX:
            raise RequestError(f"top_k must be in [0, {INT64_MAX}] (0: off; above the vocabulary size: every "
                               f"token), got {request.sampling.top_k}", "top_k")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.logprobs}", "logprobs")
        for param, ids in (("stop_token_ids", request.stop_token_ids),
                           ("logit_bias", [t for t, _ in request.sampling.logit_bias])):
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise RequestError(f"{param}: token ids outside the vocabulary [0, {self.vocab_size})", param)
        if request.deliberation is not None:
            if self._deliberator_factory is None:
                raise RequestError("deliberation is not available on this server", "deliberation")
            if self._planner_runtime is not None:
                try:
                    self._planner_runtime.check(request.deliberation)
                except ValueError as e:
                    raise RequestError(str(e), "deliberation") from e

    def submit(self, request: GenerationRequest) -> Session:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[Session]:
        """Queue the sessions of one request, all or none. Call from the event loop: the sessions' events
        come to it. Raises RequestError (a request that could never be queued whole too: it is not worth
        retrying), QueueFull, EngineClosed."""
        return self.enqueue(requests, asyncio.get_running_loop())

    async def open(self, requests: list[GenerationRequest]) -> list[Session]:
        """`submit_all`, as the server opens sessions of either engine: this one, or the one in a process
        of its own (engine_core.EngineCoreClient.open, a round trip). The requests opened in one pass of
        the event loop are queued together at its end, with one wake-up of the generator: clients arriving
        together are admitted in one iteration, not the first alone while the others wait for its prefill."""
        loop = asyncio.get_running_loop()
        sessions = self.sessions_of(requests, loop)     # RequestError to this caller, now
        pending = self._opening.setdefault(loop, [])
        if not pending:
            loop.call_soon(self._open_pending, loop)
        queued = loop.create_future()
        pending.append((sessions, queued))
        try:
            await queued
        except asyncio.CancelledError:   # queued or not, sessions nobody reads leave
            for session in sessions:
                session.cancel()
            raise
        return sessions

    def _open_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        pending = self._opening.pop(loop)
        for (_, queued), refusal in zip(pending, self.queue([sessions for sessions, _ in pending])):
            if queued.done():   # its caller was cancelled
                continue
            if refusal is None:
                queued.set_result(None)
            else:
                queued.set_exception(refusal)

    def enqueue(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop | None,
                session_ids: list[str] | None = None) -> list[Session]:
        """`submit_all` from any thread; the events go to `loop`, or with None to the engine's sink alone
        (the engine core process), under the given ids."""
        sessions = self.sessions_of(requests, loop, session_ids)
        [refusal] = self.queue([sessions])
        if refusal is not None:
            raise refusal
        return sessions

    def sessions_of(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop | None,
                    session_ids: list[str] | None = None) -> list[Session]:
        """The validated sessions of one request, not yet queued (`queue`). Raises RequestError (a request
        that could never be queued whole too: it is not worth retrying)."""
        c = self.config
        if len(requests) > min(c.max_request_sessions, c.queue_size):
            limit = (f"a request may start at most {c.max_request_sessions} sessions (n x prompts)"
                     if len(requests) > c.max_request_sessions else f"the queue holds {c.queue_size} sessions")
            raise RequestError(f"{limit}; this one asks for {len(requests)}", "n")
        for request in requests:
            self.validate(request)
        ids = session_ids or [None] * len(requests)
        return [Session(r, loop, self, self.tokenizer, i) for r, i in zip(requests, ids)]

    def queue(self, groups: list[list[Session]]) -> list[EngineClosed | QueueFull | None]:
        """Queue each group of sessions whole or not at all, in order, under one lock and with one wake-up
        of the generator (any thread). Returns each group's refusal, or None where it was queued."""
        refusals: list[EngineClosed | QueueFull | None] = []
        with self._cond:
            for sessions in groups:
                if not self._accepting:
                    refusals.append(EngineClosed("the server is shutting down"))
                elif len(self._waiting) + len(sessions) > self.config.queue_size:
                    refusals.append(QueueFull(len(self._waiting), self.config.retry_after_s))
                else:
                    self._waiting.extend(sessions)
                    refusals.append(None)
            self._cond.notify()
        return refusals

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """`stop`, off the event loop."""
        await asyncio.to_thread(self.stop, drain_timeout_s)

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Take no new sessions; let the queued and running ones finish for up to drain_timeout_s; then
        `close` (any thread but the generator's)."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while (self.num_waiting or self.num_active) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.close()

    def close(self) -> None:
        """Stop now (any thread but the generator's): every session still open ends with an ErrorEvent (its
        planner closed first), then the generator thread and the planner runtime stop."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        if self._planner_runtime is not None:
            self._planner_runtime.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the planner's side ("ride" mode; any thread) ----------------------------------------------------

    def ride(self, tokens: torch.Tensor, state: RecurrentState) -> concurrent.futures.Future:
        """Step planner rows inside the generator's next decode steps. tokens: [K] (K <= ride_rows);
        state: K rows, on the caller's stream, advanced in place. The future gets (logits [K, V], an
        event after which the rows and logits may be read on the caller's stream), or PlanCancelled
        once the engine has stopped."""
        if tokens.shape[0] > self.config.ride_rows:
            raise ValueError(f"a ride takes at most {self.config.ride_rows} rows, got {tokens.shape[0]}")
        request = _Ride(tokens, state, record_current(self.device))
        with self._cond:
            if self._stopping:
                # the planner's own cancellation: a plan whose rows can no longer ride is cancelled, not failed
                request.future.set_exception(PlanCancelled("the engine has stopped"))
            else:
                self._rides.append(request)
                self._cond.notify()
        return request.future

    def ride_step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """A step function (state.StepFn) whose steps ride in the generator's next decode steps: the
        planner's steps in ride mode. Blocks the calling thread until its rows are back. K rows go as
        pieces of at most `ride_rows`, all handed over at once (each decode step takes what fits)."""
        if tokens.is_cuda:
            # Finish this (low-priority) stream's work on the rows here, in the caller, which waits for
            # the ride anyway: the generator's stream must never wait on the GPU for planner kernels.
            torch.cuda.current_stream().synchronize()
        rows = self.config.ride_rows
        pieces = [slice(i, min(i + rows, tokens.shape[0])) for i in range(0, tokens.shape[0], rows)]
        futures = [self.ride(tokens[p], state.rows(p)) for p in pieces]
        out = []
        for future in futures:
            logits, done = future.result()
            wait(done)
            hand_over(logits)
            out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)

    def _take_rides(self) -> list[_Ride]:
        """Ride requests that fit beside the running rows, in order."""
        room, taken = self.config.ride_rows, []
        with self._cond:
            while self._rides and self._rides[0].rows <= room:
                ride = self._rides.popleft()
                if ride.future.set_running_or_notify_cancel():
                    room -= ride.rows
                    taken.append(ride)
        return taken

    # ---- generator thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        log.info("generator started: %d slots, prefill chunk %d, planner mode %s", self.config.max_sessions,
                 self.config.prefill_chunk, self.planner_mode)
        # inference mode, like the planner's worker: captured graphs write inference tensors, which may be
        # updated in place only in that mode (the GPU failure of the late catch-up at 135faea)
        with torch.inference_mode(), self._lane.active():
            while True:
                with self._cond:
                    while not self._stopping and not (self._running or self._prefilling or self._admittable()
                                                      or self._rides or self._parked_ready()):
                        # parked sessions are woken by their plan's result; the timeout bounds their wait,
                        # and the queue deadlines of sessions waiting for the slots they hold
                        self._cond.wait(timeout=PARKED_POLL_S if self._parked else None)
                    if self._stopping:
                        break
                    self._admit_locked()
                try:
                    self._drop_cancelled()
                    self._prefill_some()
                    self._decode_round()
                except Exception:  # a failed batched step must not take the server down: end that batch
                    log.exception("decode step failed; ending the %d sessions of the batch", len(self._running))
                    for session in list(self._running):
                        self._end(session, error=ErrorEvent("internal error during generation", "internal_error"))
                self._flush()
            with self._cond:
                leftovers = list(self._waiting)
                self._waiting.clear()
                rides = list(self._rides)
                self._rides.clear()
            for ride in rides:
                ride.future.set_exception(PlanCancelled("the engine has stopped"))
            for session in leftovers + list(self._prefilling) + list(self._running) + list(self._parked):
                self._end(session, error=ErrorEvent("the server is shutting down", "shutdown"))
            self._flush()
        log.info("generator stopped")

    def _flush(self) -> None:
        """This iteration's events, in one batch (the module docstring says why)."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._sink.deliver(batch)

    def _admittable(self) -> bool:
        """Waiting sessions that admission would act on: a free slot, or a cancellation to end."""
        return bool(self._waiting) and (self.num_active < self.config.max_sessions
                                        or any(s.cancelled for s in self._waiting))

    def _admit_locked(self) -> None:
        """Waiting sessions take the free slots, in order; those past their queue deadline end."""
        kept: deque[Session] = deque()
        now = time.perf_counter()
        while self._waiting:
            session = self._waiting.popleft()
            if session.cancelled:
                self._end(session, reason="cancelled")
            elif self.num_active < self.config.max_sessions:
                session.status = SessionStatus.PREFILLING
                session.admitted_at = time.perf_counter()
                session._prefill_row = self._free_prefill_rows.pop()
                self._prefill.begin(session._prefill_row)
                self._prefilling.append(session)
            elif now - session.submitted_at >= self.config.queue_timeout_s:
                self._end(session, error=ErrorEvent(
                    f"the server is busy: no slot came free within {self.config.queue_timeout_s:g} s",
                    "queue_timeout", self.config.retry_after_s))
            else:
                kept.append(session)
        self._waiting.extend(kept)

    def _drop_cancelled(self) -> None:
        for session in [s for s in self._prefilling if s.cancelled]:
            self._end(session, reason="cancelled")
        for session in sorted((s for s in self._running if s.cancelled), key=lambda s: -s.row):
            self._end(session, reason="cancelled")
        for session in [s for s in self._parked if s.cancelled]:
            self._end(session, reason="cancelled")

    def _prefill_some(self) -> None:
        """This iteration's prompt tokens (`_share_budget`), cut into pieces (`CapturedPrefill.pieces`:
        powers of two, largest first, or off CUDA the shares themselves when that makes fewer calls); the
        pieces of one length of every prompt are one batched prefill, so an iteration makes at most one
        backbone call per piece length (log2(prefill_chunk) + 1), however many prompts it serves."""
        grants = self._share_budget()
        sessions = list(grants)                                   # admission order
        pieces = dict(zip(sessions, self._prefill.pieces([grants[s] for s in sessions])))
        for n in sorted({p for ps in pieces.values() for p in ps}, reverse=True):
            group = [s for s in sessions if n in pieces[s] and s.status is SessionStatus.PREFILLING]
            limit = self._prefill.max_batch(n)
            for start in range(0, len(group), limit):
                self._feed(group[start:start + limit], n)

    def _share_budget(self) -> dict[Session, int]:
        """Prompt tokens each prefilling session gets this iteration, `prefill_chunk` in all: the fewest
        remaining first, so a short prompt is never queued behind long ones, except that the session
        admitted first gets at least a quarter of the budget, so short prompts cannot starve a long one."""
        budget = self.config.prefill_chunk
        left = {s: len(s.request.prompt_ids) - s._prefilled for s in self._prefilling}
        grants = dict.fromkeys(self._prefilling, 0)
        if not grants:
            return grants
        oldest = self._prefilling[0]
        grants[oldest] = min(left[oldest], budget // 4)
        budget -= grants[oldest]
        for session in sorted(self._prefilling, key=left.__getitem__):   # stable: admission order among equals
            if budget == 0:
                break
            take = min(left[session] - grants[session], budget)
            grants[session] += take
            budget -= take
        return {s: n for s, n in grants.items() if n}

    def _feed(self, group: list[Session], n: int) -> None:
        """The next n prompt tokens of each session of the group, in one batched prefill. If it raises,
        the sessions are prefilled one by one, so that a failure ends only the session it belongs to."""
        ids = torch.tensor([s.request.prompt_ids[s._prefilled:s._prefilled + n] for s in group], dtype=torch.long,
                           device=self.device)                                             # [B, n]
        try:
            logits = self._prefill.feed([s._prefill_row for s in group], ids)             # [B, V]
        except Exception:
            if len(group) > 1:
                log.exception("a batched prefill of %d sessions failed; prefilling them one by one", len(group))
                for session in group:
                    self._feed([session], n)
                return
            log.exception("session %s: prefill failed; ending it", group[0].id)
            self._end(group[0], error=ErrorEvent("internal error during prefill", "internal_error"))
            return
        for i, session in enumerate(group):
            session._prefilled += n
            if session._prefilled == len(session.request.prompt_ids):
                self._start_running(session, logits[i])

    def _start_running(self, session: Session, logits: torch.Tensor) -> None:
        """logits: [V] at the last prompt position. Takes the next row of the contiguous pool and, for
        a deliberating session, makes its planner. Whatever fails here ends this session alone: it is
        still in `_prefilling` until it runs, so `_end` finds it (and closes a planner already made)."""
        row = len(self._running)
        try:
            if session.request.deliberation is not None:
                session.deliberator = self._deliberator_factory(session)
                with self._planner_lock:
                    self._open_planners += 1
            self._row_state(row).copy_(self._prefill.state(session._prefill_row))
            self._logits[row].copy_(logits)
            self._set_sampler_row(row, session)
        except Exception:
            log.exception("session %s: starting it failed; ending it", session.id)
            self._end(session, error=ErrorEvent("internal error while starting the generation", "internal_error"))
            return
        self._leave_prefill(session)
        session.row = row
        session.status = SessionStatus.RUNNING
        self._running.append(session)

    def _leave_prefill(self, session: Session) -> None:
        self._prefilling.remove(session)
        self._free_prefill_rows.append(session._prefill_row)
        session._prefill_row = None
    def _set_sampler_row(self, row: int, session: Session) -> None:
        request = session.request
        self._sampler.set_row(row, request.sampling, session.seed, drawn=len(session.tokens), vocab=self.vocab_size,
                              prompt=request.prompt_ids, output=session.tokens, ending=self._ending_ids(request))

    def _ending_ids(self, request: GenerationRequest) -> tuple[int, ...]:
        """The tokens that end a session when drawn (min_tokens keeps them from being drawn early)."""
        eos = () if request.ignore_eos else (self.tokenizer.eos_id,)
        return (*eos, *request.stop_token_ids)

    def _row_state(self, row: int) -> RecurrentState:
        return self.pool.rows(slice(row, row + 1))

    def _decode_round(self) -> None:
        """Token q of every running session, then the step that consumes it (see the module docstring)."""
        rides = self._take_rides() if self.planner_mode == "ride" else []
        try:
            self._decode_round_with(rides)
        except BaseException as e:   # the planner waiting for these rows must not wait forever
            for ride in rides:
                if not ride.future.done():
                    ride.future.set_exception(e)
            raise

    def _decode_round_with(self, rides: list[_Ride]) -> None:
        self._unpark_ready()
        suggestions = self._deliberate([s for s in self._running if s.deliberator is not None and not s.planner_failed])
        n = len(self._running)
        if n == 0 and not rides:
            return
        tokens = self._stepper.tokens                   # [rows] the decode step's static input
        host = self._host_tokens[:n]
        if n:
            tokens[:n].copy_(self._sampler.sample(self._logits[:n]))
            for session, suggestion in suggestions.items():
                tokens[session.row] = suggestion
            self._sampler.record(tokens[:n])        # the penalties count the tokens taken
            host.copy_(tokens[:n], non_blocking=True)
        logprobs = self._queue_logprobs(tokens[:n]) if n else None
        sampled = record_current(self.device)
        rows = n + self._place_rides(rides, n)
        logits = self._decode(rows)
        if n:
            self._logits[:n].copy_(logits[:n])
        self._finish_rides(rides, n, logits)
        if n == 0:
            return
        if sampled is not None:
            sampled.synchronize()                       # the tokens, not the step just queued
        now = time.perf_counter()
        finished: list[tuple[Session, str | None]] = []   # (session, finish reason; None: it failed)
        values, ids = (logprobs[0].tolist(), logprobs[1].tolist()) if logprobs is not None else (None, None)
        for i, (session, token) in enumerate(zip(self._running, host.tolist())):
            k = session.request.logprobs
            scored = None if k is None else (values[i][0], tuple(zip(ids[i][:k], values[i][1:k + 1])))
            try:
                reason = self._take_token(session, suggestions.get(session, token), now, scored)
            except Exception:  # one session's detokenising or stop matching must not end the batch
                log.exception("session %s: taking its token failed; ending it", session.id)
                finished.append((session, None))
                continue
            if reason is not None:
                finished.append((session, reason))
        for session, reason in sorted(finished, key=lambda f: -f[0].row):
            if reason is None:
                self._end(session, error=ErrorEvent("internal error during generation", "internal_error"))
            else:
                self._end(session, reason=reason)

    def _queue_logprobs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """tokens: [n] the tokens rows [0, n) take. When a running session asks for logprobs: the
        log-softmax of the rows' raw logits (the model's distribution, before the temperature and the
        sampler's adjustments, as vLLM returns by default), copied to the host without waiting:
        values [n, 1 + k] (the token's, then the top k, best first) and ids [n, k], k the most any
        row asks for. None when no session asks."""
        asked = [s.request.logprobs for s in self._running if s.request.logprobs is not None]
        if not asked:
            return None
        n, k = tokens.shape[0], max(asked)
        logprobs = torch.log_softmax(self._logits[:n], dim=-1)                    # [n, V]
        top = logprobs.topk(k, dim=-1)
        values = self._host_logprobs[:n * (1 + k)].view(n, 1 + k)
        ids = self._host_top_ids[:n * k].view(n, k)
        values.copy_(torch.cat([logprobs.gather(1, tokens[:, None]), top.values], dim=1), non_blocking=True)
        ids.copy_(top.indices, non_blocking=True)
        return values, ids

    def _place_rides(self, rides: list[_Ride], n: int) -> int:
        """Copy the rides' rows into pool rows [n, n + K) and their tokens after the running rows' ones."""
        row = n
        for ride in rides:
            wait(ride.ready)
            hand_over(ride.tokens, ride.state)
            k = ride.rows
            self.pool.rows(slice(row, row + k)).copy_(ride.state)
            self._stepper.tokens[row:row + k].copy_(ride.tokens)
            row += k
        return row - n

    def _finish_rides(self, rides: list[_Ride], n: int, logits: torch.Tensor) -> None:
        row = n
        for ride in rides:
            k = ride.rows
            ride.state.copy_(self.pool.rows(slice(row, row + k)))
            out = logits[row:row + k].clone()
            ride.future.set_result((out, record_current(self.device)))
            row += k

    def _deliberate(self, sessions: list[Session]) -> dict[Session, int]:
        """Before token q of each deliberating session is chosen (its row holds S_q): resolve what its plans
        ask of q (catching late entries up, all sessions batched, and blending them in), start a plan
        from S_q when its planner is idle, and park the sessions that must wait for theirs. Returns the
        suggested tokens. A session whose planner raises goes on without it."""
        dues, suggestions = [], {}
        for session in sessions:
            try:
                dues.append((session, session.deliberator.due(len(session.sequence))))
            except Exception:
                self._planner_failed(session)
        behind = [(session, entry) for session, due in dues for entry in due.behind]
        if behind:
            try:
                catch_up([e for _, e in behind], [s.sequence for s, _ in behind], [len(s.sequence) for s, _ in behind],
                         self._planner_runtime.generator_step, refresh=False)
            except Exception:
                log.exception("catching up %d late entries failed; they are dropped", len(behind))
                dues = [(s, dataclasses.replace(d, behind=[])) for s, d in dues]
        for session, due in dues:
            position, state = len(session.sequence), self._row_state(session.row)
            for event in due.events:
                self._injection(session, event)
            try:
                for entry in due.blends + due.behind:
                    self._injection(session, session.deliberator.blend(entry, position, state))
                session.deliberator.observe(position, state, self._logits[session.row:session.row + 1],
                                            drawn=len(session.tokens))
            except Exception:
                self._planner_failed(session)
                continue
            if due.suggestion is not None:
                suggestions[session] = due.suggestion
        for session in [s for s, _ in dues if s.deliberator.waits_at(len(s.sequence)) and not s.planner_failed]:
            suggestions.pop(session, None)
            self._park(session)
        return suggestions

    def _planner_failed(self, session: Session) -> None:
        log.exception("session %s: the planner failed at position %d; continuing without it", session.id,
                      len(session.sequence))
        session.planner_failed = True
        if self._listener is not None:
            self._listener.planner_error()

    # ---- synchronous deliberation: sessions parked out of the batch until their plan is in ----------------

    def _park(self, session: Session) -> None:
        row = session.row
        session.parked = (self._row_state(row).clone(), self._logits[row].clone(), time.monotonic())
        self._leave_row(session)
        session.status = SessionStatus.PARKED
        session.deliberator.planner_counters.waited += 1
        self._parked.append(session)

    def _parked_ready(self) -> bool:
        return any(self._may_unpark(s) for s in self._parked)

    def _may_unpark(self, session: Session) -> bool:
        deliberator, (_, _, since) = session.deliberator, session.parked
        return (session.cancelled or not deliberator.waits_at(len(session.sequence))
                or time.monotonic() - since >= deliberator.config.synchronous_timeout_s)

    def _unpark_ready(self) -> None:
        for session in [s for s in self._parked if self._may_unpark(s)]:
            if session.deliberator.waits_at(len(session.sequence)):
                session.deliberator.give_up_waiting(len(session.sequence))
            state, logits, _ = session.parked
            self._parked.remove(session)
            session.parked = None
            row = len(self._running)
            self._row_state(row).copy_(state)
            self._logits[row].copy_(logits)
            self._set_sampler_row(row, session)
            session.row = row
            session.status = SessionStatus.RUNNING
            self._running.append(session)

    def _decode(self, rows: int) -> torch.Tensor:
        """One batched step over pool rows [0, rows): consumes the decoder's static tokens[:rows], advances
        those rows in place. Returns logits [rows, V]."""
        self.decode_steps += 1
        return self._stepper.step(self._stepper.tokens[:rows])

    def _take_token(self, session: Session, token: int, now: float,
                    scored: tuple[float, tuple[tuple[int, float], ...]] | None = None) -> str | None:
        """Record the token chosen for a session and stream it (scored: its logprob and the top ones).
        Returns a finish reason or None."""
        request = session.request
        position = len(session.sequence)
        session.tokens.append(token)
        session.sequence.append(token)
        session.token_times.append(now)
        # before min_tokens nothing ends the session (the sampler does not draw the ending tokens then;
        # a plan's suggestion might)
        is_eos = len(session.tokens) > request.sampling.min_tokens and token in self._ending_ids(request)
        armed = len(session.tokens) >= request.sampling.min_tokens
        text, matched = session._stops.push("" if is_eos else session._decoder.push(token), armed=armed)
        reason = "stop" if (matched or is_eos) else (
            "length" if len(session.tokens) >= session.request.max_tokens else None)
        if reason is not None and not matched:
            tail, matched = session._stops.push(session._decoder.flush(), armed=armed)
            text += tail if matched else tail + session._stops.flush()
            reason = "stop" if matched else reason
        logprob, top = scored if scored is not None else (None, None)
        session._emit(TokenEvent(token, text, position, logprob, top))
        return reason

    def _leave_row(self, session: Session) -> None:
        """Free a running session's row, moving the last running row into it."""
        row, last = session.row, len(self._running) - 1
        if row != last:
            moved = self._running[last]
            self._row_state(row).copy_(self._row_state(last))
            self._logits[row].copy_(self._logits[last])
            self._sampler.move_row(last, row)
            self._running[row] = moved
            moved.row = row
        self._running.pop()
        session.row = None

    def _end(self, session: Session, reason: str | None = None, error: ErrorEvent | None = None) -> None:
        """Finish a session in any state: free its row, close its planner, send the final event."""
        if session.status is SessionStatus.RUNNING:
            self._leave_row(session)
        elif session.status is SessionStatus.PREFILLING:
            self._leave_prefill(session)
        elif session.status is SessionStatus.PARKED:
            self._parked.remove(session)
            session.parked = None
        session.row = None
        session.status = SessionStatus.FINISHED
        session.finished_at = time.perf_counter()
        session.finish_reason = reason if error is None else "error"
        after_cancel = None if reason != "cancelled" or session._cancelled_at_step is None else \
            self.decode_steps - session._cancelled_at_step
        final = error or DoneEvent(reason, Usage(session.prompt_tokens, len(session.tokens)), session.timings(), None,
                                   after_cancel)
        if session.deliberator is not None:
            try:
                for event in session.deliberator.close(len(session.sequence)):
                    self._injection(session, event)
                if isinstance(final, DoneEvent):
                    final = dataclasses.replace(final, deliberation=session.deliberator.counters())
            except Exception:  # the session still gets its final event; the planner's failure is logged
                log.exception("closing the planner of session %s failed", session.id)
            finally:
                self._planner_closed()
        self._finish(session, final)

    def _finish(self, session: Session, final: DoneEvent | ErrorEvent) -> None:
        if self._listener is not None:  # before the final event: a client that has it sees the metrics
            self._listener.session_ended(session.record())
        session._emit(final)

    def _injection(self, session: Session, event: object) -> None:
        session.injections.append(event)
        if self._listener is not None:
            self._listener.injection(event)
        session._emit(event)

    def _planner_closed(self) -> None:
        with self._planner_lock:
            self._open_planners -= 1
