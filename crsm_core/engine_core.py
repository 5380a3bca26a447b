"""The engine in a process of its own (the engine core), and the front end's client of it.

Why a process: the front end's Python (HTTP parsing, validation, JSON, SSE framing, one coroutine per
stream) and the generator thread shared one interpreter, and so one GIL. On an H200, 16 streams over
HTTP got twice the engine's inter-token latency and 15x its time to first token (docs/benchmarks.md,
issue 15). In a process of its own the generator never waits for the front end's bytecode; vLLM moved
its engine core out of the API server for the same reason.

    front end (the server's event loop)                    engine core (a spawned process)
    EngineCoreClient.open  --- ("open", [(ticket, ids, requests)]) -->  main thread: Engine.queue
                           <-- ("opened", [(ticket, refusal)], load) --
    RemoteSession.cancel   --- ("cancel", ids) ------------------->  Session.cancel: the session leaves
                                                                    before the generator's next step
    reader thread          <-- ("batch", metrics, events, load) --  the generator: one message per
                                                                    iteration (`Engine._flush`)
    shutdown               --- ("shutdown", drain_s) ------------->  drain, close the engine
                           <-- ("stopped",) ---------------------

One duplex pipe (a socket pair) carries pickled messages: at most one per generator iteration from the
core, whatever the number of streams, and from the front end one per cancellation and one per pass of its
event loop for the requests opened in it. Opening them one message each was a round trip per request, in
series through the core's main thread, which takes the GIL back from the generator after each read and
each write (milliseconds when the generator is busy): 16 clients arriving together waited for each
other's round trips. Messages cross between two processes of this package only, so pickle is safe; the
requests and events are frozen dataclasses of plain values.

The core validates what it is sent (`Engine.validate` needs the planner's memory budget, which only the
core knows), so opening sessions is a round trip: the front end awaits the "opened" reply and raises the
same RequestError / QueueFull / EngineClosed as the engine would in its own process.

If the core dies (a crash, the OOM killer), the front end's reader sees the pipe close: every open stream
ends with an ErrorEvent and the client's `on_lost` is called (the server answers /ready 503 and starts a
new core, server/runtime.py). The core ignores SIGINT and SIGTERM, which a terminal or a process
manager may send to the whole process group: it stops when the front end tells it to or when the pipe
closes (the front end is gone), never half-way through the front end's own drain.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .backbone import Impl
from .engine import (DoneEvent, Engine, EngineClosed, EngineListener, ErrorEvent, GenerationRequest, PlannerLimits,
                     Session, SessionRecord, SessionStream)
from .engine_config import EngineConfig
from .planner.search import PlannerConfig
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0     # model load and (on CUDA) graph capture in the core
STOP_GRACE_S = 30.0         # past the drain: the core's close (planner threads) before it is killed
LOST = ErrorEvent("the engine stopped unexpectedly; the server is restarting it", "internal_error")

Load = tuple[int, int, int]   # (sessions active, waiting, planners open): the front end's gauges


@dataclass(frozen=True)
class CoreSpec:
    """What the core process needs to build its engine (picklable: it is the process's argument)."""
    model_dir: Path
    device: str                        # "cpu", "cuda", "cuda:N"
    config: EngineConfig
    torch_threads: int | None = None
    backbone: Impl = "auto"            # the backbone's kernels (crsm_core.backbone.resolve_impl)
    planner_base: PlannerConfig | None = None   # the planner limits are reported for plans like this one
    max_simulations: int = 0
    log_level: int = logging.INFO


@dataclass(frozen=True)
class CoreInfo:
    """What the core reports once its engine has started."""
    pid: int
    vocab_size: int
    planner_mode: str
    planner_limits: PlannerLimits | None


# ---- the core process ---------------------------------------------------------------------------------

class _Outlet:
    """The core's end of the pipe: the engine's event sink and its listener. The generator's batch and
    the metrics observed since the last one leave as one message."""

    def __init__(self, conn: multiprocessing.connection.Connection):
        self._conn = conn
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._metrics: list[tuple[str, Any]] = []
        self._broken = False
        self.engine: Engine | None = None

    # EngineListener
    def injection(self, event: object) -> None:
        with self._lock:
            self._metrics.append(("injection", event))

    def planner_error(self) -> None:
        with self._lock:
            self._metrics.append(("planner_error", None))

    def session_ended(self, record: SessionRecord) -> None:
        with self._lock:
            self._metrics.append(("ended", record))

    # EventSink
    def deliver(self, batch: list[tuple[Session, object]]) -> None:
        with self._lock:
            metrics, self._metrics = self._metrics, []
        self.send(("batch", metrics, [(s.id, e) for s, e in batch], self.load()))

    def load(self) -> Load:
        e = self.engine
        return (0, 0, 0) if e is None else (e.num_active, e.num_waiting, e.num_planners)

    def send(self, message: tuple) -> None:
        """From any thread of the core. A front end that is gone drops the rest (the core is stopping)."""
        with self._send_lock:
            if self._broken:
                return
            try:
                self._conn.send(message)
            except OSError as e:   # BrokenPipeError, ConnectionResetError: the reader will see EOF too
                self._broken = True
                log.warning("engine core: the front end is gone (%s); dropping its events", e)


def run_core(conn: multiprocessing.connection.Connection, spec: CoreSpec) -> None:
    """The core process's main: build the engine, then serve the front end's messages until it says stop
    or goes away."""
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s engine-core %(name)s: %(message)s")
    for sig in (signal.SIGINT, signal.SIGTERM):   # the front end decides when the core stops (module doc)
        signal.signal(sig, signal.SIG_IGN)
    from .model import CRSMModel   # here, not at the top: the front end imports this module without the model

    outlet = _Outlet(conn)
    try:
        if spec.torch_threads is not None:
            torch.set_num_threads(spec.torch_threads)
        model = CRSMModel.from_pretrained(spec.model_dir, device=torch.device(spec.device), impl=spec.backbone)
        engine = Engine.for_model(model, spec.config, listener=outlet, sink=outlet)
        limits = None if spec.planner_base is None else engine.planner_limits(spec.planner_base, spec.max_simulations)
    except Exception as e:
        log.exception("engine core: building the engine failed")
        outlet.send(("failed", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from e
    outlet.engine = engine
    engine.start()
    outlet.send(("ready", CoreInfo(multiprocessing.current_process().pid, engine.vocab_size, engine.planner_mode,
                                   limits)))
    log.info("engine core ready (pid %d)", multiprocessing.current_process().pid)
    sessions: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()   # open ones, for cancels
    stopper: threading.Thread | None = None
    # until told to stop and stopped, or until the front end is gone (the timeout only re-checks the first)
    while stopper is None or stopper.is_alive():
        try:
            if not conn.poll(0.1):
                continue
            message = conn.recv()
        except (EOFError, OSError):
            break   # the front end died
        kind = message[0]
        if kind == "open":
            outlet.send(("opened", _open(engine, message[1], sessions), outlet.load()))
        elif kind == "cancel":
            for session_id in message[1]:
                session = sessions.get(session_id)
                if session is not None:
                    session.cancel()
        elif kind == "shutdown" and stopper is None:
            # drained in a thread: cancellations keep arriving (clients leave during the drain)
            def stop(drain_s: float = message[1]) -> None:
                engine.stop(drain_s)
                model.close()
                outlet.send(("stopped",))
            stopper = threading.Thread(target=stop, name="crsm-core-stop")
            stopper.start()
    if stopper is None:   # the front end is gone without a word: stop now
        engine.close()
        model.close()
    else:
        stopper.join()
    log.info("engine core stopped")


def _open(engine: Engine, batch: list[tuple[int, list[str], list[GenerationRequest]]],
          sessions: weakref.WeakValueDictionary[str, Session]) -> list[tuple[int, Exception | None]]:
    """The requests of one "open" message, queued together (one wake-up of the generator, so that they
    are admitted in one iteration); each ticket's refusal, or None."""
    tickets, groups, refusals = [], [], {}
    for ticket, ids, requests in batch:
        try:
            groups.append(engine.sessions_of(requests, None, ids))
            tickets.append(ticket)
        except Exception as e:   # RequestError (the planner's checks too): the front end raises it
            refusals[ticket] = e
    for ticket, group, refusal in zip(tickets, groups, engine.queue(groups)):
        refusals[ticket] = refusal
        if refusal is None:
            sessions.update((session.id, session) for session in group)
    return [(ticket, refusals[ticket]) for ticket, _, _ in batch]


# ---- the front end's side -------------------------------------------------------------------------------

class RemoteSession(SessionStream):
    """A session of the engine core, as the front end's clients read it."""

    def __init__(self, session_id: str, client: "EngineCoreClient"):
        super().__init__(session_id)
        self._client = client
        self.finished = False

    def cancel(self) -> None:
        """Leave the batch before the core's next step (no effect once finished)."""
        if not self.finished:
            self._client._send(("cancel", [self.id]))


class EngineCoreClient:
    """The front end's handle on an engine core process (crsm_core.engine.ServingEngine). Use on one
    event loop: `start` it there, then `open` sessions and `shutdown`."""

    def __init__(self, spec: CoreSpec, tokenizer: Tokenizer, listener: EngineListener | None = None,
                 on_lost: Callable[[], None] | None = None):
        self.spec = spec
        self.tokenizer = tokenizer
        self.config = spec.config
        self.vocab_size = 0
        self.planner_mode = ""
        self.pid: int | None = None
        self._listener = listener
        self._on_lost = on_lost          # called on the event loop when the core died
        self._limits: PlannerLimits | None = None
        self._load: Load = (0, 0, 0)
        self._sessions: dict[str, RemoteSession] = {}
        self._tickets = itertools.count()
        self._opening: dict[int, asyncio.Future] = {}
        self._outgoing: list[tuple[int, list[str], list[GenerationRequest]]] = []   # opens not yet sent
        self._stopped: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self.lost = False
        self._closing = False

    # ---- ServingEngine -----------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return self._load[0]

    @property
    def num_waiting(self) -> int:
        return self._load[1]

    @property
    def num_planners(self) -> int:
        return self._load[2]

    def planner_limits(self, base: PlannerConfig, max_simulations: int) -> PlannerLimits | None:
        """The core measured them at start for `spec.planner_base`, the only plans it is asked about."""
        if (base, max_simulations) != (self.spec.planner_base, self.spec.max_simulations):
            raise ValueError("the engine core reports planner limits for its spec's planner_base only")
        return self._limits

    async def start(self) -> "EngineCoreClient":
        """Spawn the core and wait until its engine runs. Raises RuntimeError if it fails or dies first."""
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        # spawn, not fork: the parent has threads (the event loop's executor) and maybe CUDA
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(target=run_core, args=(child, self.spec), name="crsm-engine-core",
                                        daemon=True)
        self._process.start()
        child.close()
        info = await asyncio.to_thread(self._await_ready)
        self.pid, self.vocab_size, self.planner_mode = info.pid, info.vocab_size, info.planner_mode
        self._limits = info.planner_limits
        self._reader = threading.Thread(target=self._read, name="crsm-core-reader", daemon=True)
        self._reader.start()
        log.info("engine core started (pid %d, planner mode %s)", info.pid, info.planner_mode)
        return self

    def _await_ready(self) -> CoreInfo:
        assert self._conn is not None and self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._conn.poll(0.1):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine core exited with status {self._process.exitcode} before it was ready")
            if time.monotonic() > deadline:
                self._process.kill()
                raise RuntimeError(f"the engine core was not ready after {START_TIMEOUT_S:.0f} s")
        try:
            message = self._conn.recv()
        except EOFError as e:
            raise RuntimeError("the engine core exited before it was ready") from e
        if message[0] == "failed":
            self._process.join(timeout=STOP_GRACE_S)
            raise RuntimeError(f"the engine core failed to start: {message[1]}")
        return message[1]

    async def open(self, requests: list[GenerationRequest]) -> list[RemoteSession]:
        """Queue the sessions of one request in the core, all or none (Engine.submit_all's refusals)."""
        if self.lost or self._closing:
            raise EngineClosed("the engine is not running")
        assert self._loop is not None
        ticket = next(self._tickets)
        sessions = [RemoteSession(uuid.uuid4().hex, self) for _ in requests]
        # registered before the core sees them: their first events may come before the reply
        self._sessions.update((s.id, s) for s in sessions)
        reply = self._opening[ticket] = self._loop.create_future()
        if not self._outgoing:   # one message for the requests opened in this pass of the loop (module doc)
            self._loop.call_soon(self._send_opens)
        self._outgoing.append((ticket, [s.id for s in sessions], requests))
        try:
            refusal = await reply
        finally:
            self._opening.pop(ticket, None)
        if refusal is not None:
            for s in sessions:
                self._sessions.pop(s.id, None)
            raise refusal
        return sessions

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Let the core drain (up to drain_timeout_s) and stop; every open stream gets its final event."""
        self._closing = True
        assert self._stopped is not None
        if not self.lost:
            self._send(("shutdown", drain_timeout_s))
            try:
                await asyncio.wait_for(asyncio.shield(self._stopped), drain_timeout_s + STOP_GRACE_S)
            except asyncio.TimeoutError:
                log.warning("the engine core did not stop within %.0f s", drain_timeout_s + STOP_GRACE_S)
        await asyncio.to_thread(self._reap)

    def _reap(self) -> None:
        """Wait for the process (a stopped core exits by itself), then for the reader, which sees the pipe
        close with it."""
        assert self._conn is not None and self._process is not None
        self._process.join(timeout=STOP_GRACE_S)
        if self._process.is_alive():
            log.warning("the engine core (pid %s) did not exit; killing it", self._process.pid)
            self._process.kill()
            self._process.join()
        if self._reader is not None:
            self._reader.join(timeout=STOP_GRACE_S)
        self._conn.close()

    # ---- the channel ---------------------------------------------------------------------------------

    def _send_opens(self) -> None:
        batch, self._outgoing = self._outgoing, []
        self._send(("open", batch))

    def _send(self, message: tuple) -> None:
        """On the event loop (the only sender of the front end)."""
        if self.lost:
            return
        assert self._conn is not None
        try:
            self._conn.send(message)
        except OSError:   # the core died; the reader reports it
            pass

    def _read(self) -> None:
        """The reader thread: metrics observed here, events handed to the loop, one call per message."""
        assert self._conn is not None and self._loop is not None
        loop = self._loop
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "batch":
                _, metrics, events, load = message
                self._load = load
                if self._listener is not None:   # before the events: a client with its final event sees them
                    for what, payload in metrics:
                        if what == "injection":
                            self._listener.injection(payload)
                        elif what == "planner_error":
                            self._listener.planner_error()
                        else:
                            self._listener.session_ended(payload)
                loop.call_soon_threadsafe(self._dispatch, events)
            elif kind == "opened":
                _, replies, load = message
                self._load = load
                loop.call_soon_threadsafe(self._opened, replies)
            elif kind == "stopped":
                loop.call_soon_threadsafe(self._set_stopped)
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._pipe_closed)

    def _dispatch(self, events: list[tuple[str, object]]) -> None:
        for session_id, event in events:
            session = self._sessions.get(session_id)
            if session is None:
                continue
            if isinstance(event, (DoneEvent, ErrorEvent)):
                session.finished = True
                del self._sessions[session_id]
            session.events.put_nowait(event)

    def _opened(self, replies: list[tuple[int, Exception | None]]) -> None:
        for ticket, refusal in replies:
            future = self._opening.get(ticket)
            if future is not None and not future.done():
                future.set_result(refusal)

    def _set_stopped(self) -> None:
        assert self._stopped is not None
        if not self._stopped.done():
            self._stopped.set_result(None)

    def _pipe_closed(self) -> None:
        """On the loop, once the reader saw the pipe close: after our own shutdown, the end; otherwise the
        core died, and every open stream ends with an error."""
        self._set_stopped()
        if self._closing and not self._sessions:
            return
        self.lost = True
        self._load = (0, 0, 0)
        if self._process is not None:   # reap it (no zombie), off the loop: it has exited or is exiting
            asyncio.get_running_loop().run_in_executor(None, self._process.join, STOP_GRACE_S)
        if self._sessions:
            log.error("the engine core (pid %s) stopped; ending %d open streams", self.pid, len(self._sessions))
        final = ErrorEvent("the server is shutting down", "shutdown") if self._closing else LOST
        for session in self._sessions.values():
            session.finished = True
            session.events.put_nowait(final)
        self._sessions.clear()
        for future in self._opening.values():
            if not future.done():
                future.set_result(EngineClosed("the engine stopped"))
        if not self._closing and self._on_lost is not None:
            self._on_lost()
