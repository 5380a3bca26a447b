"""The `crsm bench` sections that need the server: "http" (crsm_core/bench/http_bench.py measures, this
starts the server it measures)."""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import httpx

from crsm_core.bench.http_bench import ENDLESS, http_section
from crsm_core.bench.workload import Workload
from server.cli import build_server
from server.settings import ServerSettings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0      # model load + graph capture on the server's side


class LiveServer:
    """uvicorn on 127.0.0.1, a free port, in a daemon thread, serving the workload's model."""

    def __init__(self, workload: Workload):
        s = workload.settings
        self._settings = ServerSettings(
            model_name="bench", device=s.device, host="127.0.0.1", port=0, max_sessions=s.max_sessions,
            max_prompt_tokens=max(4096, s.long_prompt_tokens), max_new_tokens=ENDLESS, queue_size=256,
            shutdown_drain_s=1.0)
        self.server = build_server(self._settings, "warning", loader=lambda _settings: workload.crsm_model())
        self.thread = threading.Thread(target=self.server.run, name="crsm-bench-server", daemon=True)
        self.url = ""

    def settings(self) -> dict[str, Any]:
        flat = self._settings.flat(mode="json")
        del flat["model_dir"]  # the workload's model, not a directory
        return flat

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while True:
            if not self.thread.is_alive():  # a model that fails to load stops the server (its log says why)
                raise RuntimeError("the server stopped before it was ready: the model did not load")
            try:
                ready = httpx.get(self.url + "/ready", timeout=10)
            except httpx.ConnectError:  # stopping: the check above says so next time round
                time.sleep(0.05)
                continue
            if ready.status_code == 200:
                return self
            if "model_load_failed" in ready.text or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready: {ready.status_code} {ready.text}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.request_exit()
        self.thread.join(timeout=60)
        if self.thread.is_alive():
            log.warning("the benchmark server did not stop within 60 s")


SECTIONS = {"http": functools.partial(http_section, serve=LiveServer)}
