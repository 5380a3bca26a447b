"""`crsm serve`: the server under uvicorn.

On SIGTERM or SIGINT the engine drains (up to `shutdown_drain_s`) and ends every still-open stream
with a final event before uvicorn waits for the connections to close, so no client is left hanging.
After SIGTERM the process exits 0; after SIGINT uvicorn re-raises it (KeyboardInterrupt), as it does.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
from types import FrameType

import uvicorn

from crsm_core.checkpoint import CheckpointError, load_config

from .app import create_app
from .edge import protocol_for
from .runtime import Loader, Runtime, load_model
from .settings import ServerSettings, SettingsError

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that first asks the runtime to end the open streams when told to exit."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self.load_failed = False
        runtime.on_load_failure = self._load_failed

    def _load_failed(self) -> None:
        """A server whose model cannot load exits (non-zero: `serve`), rather than answer /health forever."""
        self.load_failed = True
        self.should_exit = True

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def request_exit(self) -> None:
        """Thread-safe: drain, end open streams, then stop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.runtime.begin_shutdown)
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        log.info("signal %d: draining and closing open streams", sig)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.runtime.begin_shutdown)
        if sig == signal.SIGTERM:
            # uvicorn records the signals it handles and raises them again once its shutdown is done, so
            # the process would die of SIGTERM (status 143) after draining cleanly. SIGTERM is how process
            # managers ask for a stop; a stop that drained exits 0 (deploy/k8s/README.md). A second SIGTERM
            # does not force an exit in uvicorn either, so setting should_exit is all its handler does.
            self.should_exit = True
            return
        super().handle_exit(sig, frame)


def build_server(settings: ServerSettings, log_level: str = "info", loader: Loader = load_model) -> GracefulServer:
    app = create_app(settings, loader)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=int(settings.shutdown_drain_s) + 5,
                            timeout_keep_alive=settings.keep_alive_s, http=protocol_for(settings),
                            lifespan="on")
    return GracefulServer(config, app.state.runtime)


def serve(args: argparse.Namespace) -> int:
    """`crsm serve` (its flags: ServerSettings.add_cli_args): settings from the flags and the environment,
    validated before anything is loaded."""
    try:
        settings = ServerSettings.from_cli_args(args)
    except SettingsError as e:
        log.error("%s", e)
        return 2
    try:
        load_config(settings.model_dir)  # fail now, not after the server has started
    except CheckpointError as e:
        log.error("cannot serve: %s", e)
        return 2
    raise_open_files_limit(settings.max_connections)
    server = build_server(settings, args.log_level)
    server.run()
    return 1 if server.load_failed else 0


# File descriptors besides the connections': the model's files, the loop, logs, the planner's threads.
SPARE_FILES = 256


def raise_open_files_limit(max_connections: int) -> None:
    """Raise the soft limit on open files to what `max_connections` needs (within the hard limit), so that
    the connection cap, not the file descriptors, decides (a busy server used to fail every accept with
    "Too many open files")."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warning("open files are limited to %d: fewer than max_connections (%d) + %d", target,
                        max_connections, SPARE_FILES)
