"""The `crsm bench` sections that need the server: "http" (crsm_core/bench/http_bench.py measures, this
starts the servers it measures).

Each server is `crsm serve` in a process of its own, as users run it, on the workload's model saved to a
temporary directory (same weights as every other section), so that the benchmark's clients never share
the server's interpreter.
"""
from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from crsm_core.bench.http_bench import ENDLESS, http_section
from crsm_core.bench.results import HttpResult
from crsm_core.bench.workload import Workload
from server.settings import ServerSettings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0      # model load + graph capture on the server's side
STOP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`crsm serve` on 127.0.0.1 serving `model_dir`, with the engine in its process or in its own (design)."""

    def __init__(self, workload: Workload, design: str, model_dir: Path):
        s = workload.settings
        self.server_settings = ServerSettings(
            model_dir=model_dir, model_name="bench", device=s.device, host="127.0.0.1", port=_free_port(),
            max_sessions=s.max_sessions, max_prompt_tokens=max(4096, s.long_prompt_tokens), max_new_tokens=ENDLESS,
            queue_size=256, shutdown_drain_s=1.0, backbone=workload.impl, engine_process=design == "engine-process",
            ui=False)
        self.design = design
        self.log_path = s.out / f"server-{design}.log"
        self.url = f"http://127.0.0.1:{self.server_settings.port}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The flags of every setting that is not its default."""
        args = [sys.executable, "-m", "crsm", "--log-level", "WARNING", "serve"]
        defaults = ServerSettings().flat(mode="json")
        for name, value in self.server_settings.flat(mode="json").items():
            if value == defaults[name]:
                continue
            flag = "--" + name.replace("_", "-")
            args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
        return args

    def settings(self) -> dict[str, Any]:
        flat = self.server_settings.flat(mode="json")
        del flat["model_dir"]  # a temporary directory
        return flat

    def start(self) -> "ServerProcess":
        log.info("http: starting the server (%s): %s", self.design, " ".join(self.command()[2:]))
        with self.log_path.open("w") as out:   # the child keeps its own handle
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server ({self.design}) exited with status {self.process.returncode} "
                                   f"before it was ready; its log: {self.log_path}")
            try:
                ready = httpx.get(self.url + "/ready", timeout=10)
                if ready.status_code == 200:
                    return self
                if "model_load_failed" in ready.text:
                    raise RuntimeError(f"the server ({self.design}) did not load the model: {ready.text}")
            except httpx.TransportError:   # not listening yet
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server ({self.design}) was not ready after {START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the benchmark server (%s) did not stop within %.0f s; killing it", self.design, STOP_TIMEOUT_S)
            self.process.kill()
            self.process.wait()


def http(workload: Workload) -> HttpResult:
    with tempfile.TemporaryDirectory(prefix="crsm-bench-model-") as directory:
        model = workload.crsm_model()
        try:
            model.save_pretrained(directory)
        finally:
            model.close()
        return http_section(workload, lambda w, design: ServerProcess(w, design, Path(directory)))


SECTIONS = {"http": http}
