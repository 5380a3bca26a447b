"""`crsm serve`: the server under uvicorn.

On SIGTERM or SIGINT the engine drains (up to `shutdown_drain_s`) and ends every still-open stream
with a final event before uvicorn waits for the connections to close, so no client is left hanging.
After SIGTERM the process exits 0; after SIGINT uvicorn re-raises it (KeyboardInterrupt), as it does.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from crsm_core.checkpoint import CheckpointError, load_config

from .app import create_app
from .runtime import Loader, Runtime, load_model
from .settings import ServerSettings, SettingsError

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that first asks the runtime to end the open streams when told to exit."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None

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


# How long an idle keep-alive connection stays open. It must outlast the idle expiry of clients' pools
# (httpx, and so the openai client and ours: 5 s; uvicorn's own default is also 5 s): when both are equal,
# a client sometimes sends a request on a connection the server is closing at that moment and gets a
# read error it cannot safely retry (seen in the load test of tests/reliability: 1 to 4 read errors in
# about 1000 requests).
# 65 s also outlasts the usual load balancers' 60 s idle timeout, for the same reason.
KEEP_ALIVE_S = 65


def build_server(settings: ServerSettings, log_level: str = "info", loader: Loader = load_model) -> GracefulServer:
    app = create_app(settings, loader)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=int(settings.shutdown_drain_s) + 5,
                            timeout_keep_alive=KEEP_ALIVE_S, lifespan="on")
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
    build_server(settings, args.log_level).run()
    return 0
