"""What the routes share: settings, metrics, and (once loaded in a thread) the model, its tokenizer, the
engine and the defaults of the fields a request leaves out."""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
import tomllib
from pathlib import Path
from typing import Callable

import torch
from fastapi import Request

from crsm_core.checkpoint import CheckpointError, load_config
from crsm_core.deliberation import load_deliberation_config
from crsm_core.engine import (Engine, EngineClosed, GenerationRequest, PlannerLimits, QueueFull, RequestError,
                              ServingEngine, SessionStream)
from crsm_core.engine_core import CoreSpec, EngineCoreClient
from crsm_core.model import CRSMModel
from crsm_core.tokenizer import Tokenizer, TokenizerError, load_tokenizer

from .errors import APIError, from_engine, not_ready
from .metrics import ServerMetrics, StatusHistory
from .settings import MAX_SIMULATIONS, RequestDefaults, ServerSettings

log = logging.getLogger(__name__)

Loader = Callable[[ServerSettings], CRSMModel]


def _server_version() -> str:
    """The installed package's version; a checkout run without installing it (PYTHONPATH) reads its
    pyproject.toml instead, so the server starts either way."""
    try:
        return importlib.metadata.version("crsm-server")
    except importlib.metadata.PackageNotFoundError:
        with (Path(__file__).resolve().parents[1] / "pyproject.toml").open("rb") as f:
            return tomllib.load(f)["project"]["version"]


SERVER_VERSION = _server_version()

# Encoding this many characters takes about a millisecond with the byte tokenizer (more with BPE): longer
# texts are encoded off the event loop.
LONG_TEXT_CHARS = 16_384
# Of a client's string (a model name), error messages quote at most this many characters.
ECHO_CHARS = 64
# Failures of a model directory that name their file: logged without a traceback.
LOAD_ERRORS = (CheckpointError, TokenizerError, ValueError, OSError)
# An engine core that dies is started again, unless it died this many times in the last RESTART_WINDOW_S:
# then the server exits (non-zero), for its process manager to see.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 300.0


def resolved_device(settings: ServerSettings) -> str:
    """device "auto": cuda when available, else cpu."""
    if settings.device != "auto":
        return settings.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(settings: ServerSettings) -> CRSMModel:
    return CRSMModel.from_pretrained(settings.model_dir, device=torch.device(resolved_device(settings)),
                                     impl=settings.backbone)


class Runtime:
    """What the routes share: settings, metrics, and (once loaded) the tokenizer and the engine: an
    `Engine` in this process, or with `engine_process` the client of one in a process of its own
    (crsm_core/engine_core.py; the model is then loaded there, from `model_dir`, not by `loader`)."""

    def __init__(self, settings: ServerSettings, loader: Loader):
        if settings.engine_process and loader is not load_model:
            raise ValueError("with engine_process the engine core loads the model from model_dir: a custom "
                             "loader cannot run there")
        self.settings = settings
        self.metrics = ServerMetrics()
        self.status = StatusHistory()
        self.created = int(time.time())
        self.engine: ServingEngine | None = None
        self.model: CRSMModel | None = None          # in this process only
        self.tokenizer: Tokenizer | None = None
        self.planner_limits: PlannerLimits | None = None
        self._defaults: RequestDefaults | None = None
        self.load_error: str | None = None
        self.restarting = False                      # the engine core died; a new one is starting
        self._restarts: list[float] = []
        self.on_load_failure: Callable[[], None] | None = None  # called on the event loop
        self._loader = loader
        self._load_task: asyncio.Task | None = None
        self._status_task: asyncio.Task | None = None
        self._shutdown: asyncio.Task | None = None

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    @property
    def max_model_len(self) -> int:
        """The most tokens one session holds: the longest prompt and the most new tokens (as vLLM's
        max_model_len: the recurrent model itself has no context limit)."""
        return self.settings.engine.max_prompt_tokens + self.settings.engine.max_new_tokens

    async def load(self) -> None:
        try:
            engine = await (self._start_core() if self.settings.engine_process else self._start_in_process())
        except Exception as e:
            # the log says what and where (paths, the exception); /ready only that it failed. A server
            # that cannot serve exits (`on_load_failure`), so that probes and process managers see it.
            log.error("cannot serve: loading the model from %s failed: %s", self.settings.model_dir, e,
                      exc_info=not isinstance(e, LOAD_ERRORS))
            self.load_error = "the model failed to load (the server's log says why)"
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        self.metrics.bind(engine)
        assert self._defaults is not None
        self.planner_limits = engine.planner_limits(self._defaults.deliberation.planner, MAX_SIMULATIONS)
        self.tokenizer, self.engine, self.restarting = engine.tokenizer, engine, False
        log.info("ready: serving %s as %r", self.settings.model_dir, self.model_name)

    async def _start_in_process(self) -> Engine:
        engine = await asyncio.to_thread(self._build)
        engine.start()
        return engine

    async def _start_core(self) -> EngineCoreClient:
        """The engine core process, started from the model directory; this process reads only the
        tokenizer and the deliberation defaults from it."""
        s = self.settings
        config = await asyncio.to_thread(load_config, s.model_dir)
        tokenizer = await asyncio.to_thread(load_tokenizer, s.model_dir, config.vocab_size)
        self._defaults = RequestDefaults.of(s, load_deliberation_config(s.model_dir))
        spec = CoreSpec(s.model_dir, resolved_device(s), s.engine, s.torch_threads, backbone=s.backbone,
                        planner_base=self._defaults.deliberation.planner, max_simulations=MAX_SIMULATIONS,
                        log_level=logging.getLogger().getEffectiveLevel())
        return await EngineCoreClient(spec, tokenizer, listener=self.metrics, on_lost=self._core_lost).start()

    def _core_lost(self) -> None:
        """On the event loop: the engine core died. /ready answers 503 until a new one runs; too many deaths
        in a row and the server exits instead."""
        self.engine = None
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
        if self._shutdown is not None:
            return
        if len(self._restarts) > MAX_RESTARTS:
            log.error("the engine core died %d times in %.0f s; stopping the server", len(self._restarts),
                      RESTART_WINDOW_S)
            self.load_error = "the engine failed repeatedly (the server's log says why)"
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        log.error("the engine core died; starting a new one (%d of %d restarts)", len(self._restarts), MAX_RESTARTS)
        self.restarting = True
        self._load_task = asyncio.create_task(self.load())

    def _build(self) -> Engine:
        """In a worker thread: load the model and build the engine (on CUDA this captures its graphs)."""
        s = self.settings
        if s.torch_threads is not None:
            torch.set_num_threads(s.torch_threads)
        self.model = self._loader(s)
        if self.model.tokenizer is None:
            raise ValueError(f"{s.model_dir} has no tokenizer")
        self._defaults = RequestDefaults.of(s, self.model.config)
        return Engine.for_model(self.model, s.engine, listener=self.metrics)

    def start(self) -> None:
        """On the event loop, at startup: load the model (in a thread) and sample the status every second."""
        self._load_task = asyncio.create_task(self.load())
        self._status_task = asyncio.create_task(self.status.sample_forever(self.metrics))

    def begin_shutdown(self) -> asyncio.Task:
        """Drain (up to shutdown_drain_s) and stop the engine; every open stream gets its final event.
        Idempotent; safe to call from a signal handler scheduled on the loop."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._stop())
        return self._shutdown

    async def _stop(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
        if self._load_task is not None:
            await self._load_task
        if self.engine is not None:
            await self.engine.shutdown(self.settings.shutdown_drain_s)
        if self.model is not None:
            await asyncio.to_thread(self.model.close)

    def require_engine(self) -> tuple[ServingEngine, Tokenizer]:
        if self.engine is None or self.tokenizer is None:
            retry_after_s = self.settings.engine.retry_after_s
            if self.load_error is not None:
                raise not_ready(self.load_error, "model_load_failed", retry_after_s)
            if self.restarting:
                raise not_ready("the engine stopped and is restarting", "engine_restarting", retry_after_s)
            raise not_ready("the model is loading", "model_loading", retry_after_s)
        return self.engine, self.tokenizer

    @property
    def defaults(self) -> RequestDefaults:
        """What the fields a request leaves out take (503 until the model is loaded)."""
        self.require_engine()
        assert self._defaults is not None  # set with the engine
        return self._defaults

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            # OpenAI's answer to an unknown model: 404, code model_not_found
            raise APIError(404, f"the model {shortened(name)} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def encode(self, texts: list[str]) -> list[list[int]]:
        """The texts' token ids; long texts are encoded in a worker thread, so that the event loop (every
        other stream) does not wait for them."""
        _, tokenizer = self.require_engine()
        if sum(len(t) for t in texts) <= LONG_TEXT_CHARS:
            return [tokenizer.encode(t) for t in texts]
        return await asyncio.to_thread(lambda: [tokenizer.encode(t) for t in texts])

    async def submit(self, requests: list[GenerationRequest],
                     param_names: dict[str, str] | None = None) -> list[SessionStream]:
        engine, _ = self.require_engine()
        try:
            return await engine.open(requests)
        except (RequestError, QueueFull, EngineClosed) as e:
            raise from_engine(e, param_names) from e


def shortened(text: str, keep: int = ECHO_CHARS) -> str:
    """A client's string as error messages quote it: repr'd, and cut to `keep` characters."""
    if len(text) <= keep:
        return repr(text)
    return f"{text[:keep]!r}... ({len(text)} characters)"


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


