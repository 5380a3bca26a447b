"""What the reliability tests share: a tiny model directory made by `crsm init`, `crsm serve` as a
subprocess (the way users start it) or in-process with a custom model loader (to inject faults),
SSE reading, /metrics scraping, resident memory, and waiting for a condition."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.cli import build_server
from server.runtime import Loader, load_model
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
START_TIMEOUT_S = 60.0  # a cold start imports torch; on a busy 2-core machine that can take a while


def make_model_dir(directory: Path) -> Path:
    """`crsm init --out DIR`: a random tiny model (backbone and tokenizer; the server builds untrained
    dynamics and value heads for it, so deliberation runs)."""
    result = subprocess.run([sys.executable, "-m", "crsm", "--log-level", "WARNING", "init",
                             "--out", str(directory)], env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return directory


def _env(**extra: str) -> dict[str, str]:
    # one intra-op thread: the tiny model gains nothing from more, and the client needs the other core
    return {**os.environ, "PYTHONPATH": str(REPO), "CRSM_TORCH_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(interval)


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


class ServeProcess:
    """`python -m crsm_core.cli serve` on 127.0.0.1 and a free port; its output goes to a file (a pipe
    nobody reads would fill up and block the server)."""

    def __init__(self, model_dir: Path, log_path: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crsm", "--log-level", "WARNING", "serve", "--model", str(model_dir),
             "--model-name", MODEL, "--port", str(self.port), *flags],
            env=_env(), stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> "ServeProcess":
        def ready() -> bool:
            assert self.proc.poll() is None, f"crsm serve exited early:\n{self.output()}"
            return is_ready(self.url)

        wait_for(ready, START_TIMEOUT_S, 0.1, "crsm serve ready")
        return self

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        """Kill it if a test left it running (a test that checks shutdown sends its own signal)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


class InProcessServer:
    """uvicorn in a background thread, built by the app factory with a custom model loader."""

    def __init__(self, settings: ServerSettings, loader: Loader = load_model):
        self.server = build_server(settings.model_copy(update={"port": 0}), "warning", loader)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def start(self) -> "InProcessServer":
        self.thread.start()
        wait_for(lambda: self.server.started, START_TIMEOUT_S, what="uvicorn started")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        wait_for(lambda: is_ready(self.url), START_TIMEOUT_S, what="model loaded")
        return self

    def stop(self) -> None:
        self.server.request_exit()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the server thread did not stop"


def settings_for(model_dir: Path, **overrides) -> ServerSettings:
    base = dict(model_dir=model_dir, model_name=MODEL, device="cpu", max_sessions=16, queue_size=32,
                max_prompt_tokens=256, max_new_tokens=512, shutdown_drain_s=1.0, torch_threads=1)
    base.update(overrides)
    return ServerSettings(**base)


# ---- SSE -----------------------------------------------------------------------------------------------

class SSEParser:
    """Server-Sent Events, line by line: `feed(line)` returns (event name, data) when a blank line
    dispatches a message, else None."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        if line == "":
            message = (self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data = "message", []
            return message
        if not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                self.event = value
            elif name == "data":
                self.data.append(value)
        return None


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    parser = SSEParser()
    for line in lines:
        if (message := parser.feed(line)) is not None:
            yield message


async def aparse_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    parser = SSEParser()
    async for line in lines:
        if (message := parser.feed(line)) is not None:
            yield message


def stream_generate(url: str, body: dict, timeout: float = 60) -> list[tuple[str, dict]]:
    with httpx.stream("POST", url + "/v1/generate", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        return [(e, json.loads(d)) for e, d in parse_sse(r.iter_lines())]


# ---- /metrics and the process ------------------------------------------------------------------------

def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


GAUGES = ("crsm_running_sessions", "crsm_waiting_sessions", "crsm_planner_tasks")


def gauges(url: str) -> dict[str, float]:
    sample = metrics(url)
    return {name: sample[(name, ())] for name in GAUGES}


def resident_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass
class Figures:
    """Measured numbers the tests report (printed at the end of the run; docs/reliability.md quotes them)."""
    values: dict[str, dict[str, object]] = field(default_factory=dict)

    def record(self, test: str, **numbers: object) -> None:
        self.values.setdefault(test, {}).update(numbers)


FIGURES = Figures()
