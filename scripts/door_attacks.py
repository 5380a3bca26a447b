"""Attacks on the server's door, against `crsm serve` of a checkout; prints the figures as JSON
(docs/reliability.md, "Attacks on the server's door").

    python -m scripts.door_attacks --model DIR [--checkout PATH] [ATTACK ...]

ATTACK: surrogate, big_body, limit_body, short_body, half_heads, bad_model (default: all). `crsm serve` runs as a
subprocess of the checkout (default: this one) on 127.0.0.1, with `--max-prompt-tokens 4096`. While an
attack runs, another connection asks `/health` every 20 ms: the longest wait is how long the event loop
was blocked. Memory: VmRSS and VmHWM (peak) from /proc.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ATTACKS = ("surrogate", "big_body", "limit_body", "short_body", "half_heads", "bad_model")
HALF_HEADS = 3000
START_TIMEOUT_S = 90.0


class Serve:
    """`crsm serve` of a checkout on a free port; its log in a file."""

    def __init__(self, checkout: Path, model: Path, log_dir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(checkout), "CRSM_TORCH_THREADS": "1"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "crsm", "--log-level", "WARNING", "serve", "--model", str(model),
                 "--model-name", "tiny", "--port", str(self.port), "--device", "cpu", "--max-prompt-tokens", "4096"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(checkout))

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"crsm serve did not get ready:\n{self.log_path.read_text()}")

    def memory_mib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
        raise RuntimeError(f"no {field}")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class HealthPinger(threading.Thread):
    """GET /health every 20 ms on one keep-alive connection; the longest wait and the failures."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stopped, self.worst_s, self.failures = url, threading.Event(), 0.0, 0

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stopped.is_set():
                start = time.monotonic()
                try:
                    client.get(self.url + "/health")
                except httpx.HTTPError:
                    self.failures += 1
                self.worst_s = max(self.worst_s, time.monotonic() - start)
                time.sleep(0.02)

    def finish(self) -> dict:
        self.stopped.set()
        self.join()
        return {"worst_health_wait_s": round(self.worst_s, 3), "health_failures": self.failures}


def surrogate(server: Serve) -> dict:
    statuses = {}
    for path, body in (("/v1/generate", '{"prompt": "abc\\ud800", "max_tokens": 2}'),
                       ("/v1/completions", '{"model": "tiny", "prompt": "abc\\ud800", "max_tokens": 2}'),
                       ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", '
                                                '"content": "abc\\ud800"}], "max_tokens": 2}')):
        statuses[path] = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"},
                                    timeout=60).status_code
    return statuses


def big_body(server: Serve, size: int = 100 * 2**20) -> dict:
    """A 100 MiB prompt."""
    body = b'{"prompt": "' + b"a" * size + b'", "max_tokens": 1}'
    pinger = HealthPinger(server.url)
    pinger.start()
    time.sleep(0.5)
    before = server.memory_mib()
    start = time.monotonic()
    r = httpx.post(server.url + "/v1/generate", content=body, headers={"content-type": "application/json"}, timeout=120)
    took = time.monotonic() - start
    time.sleep(0.5)
    return {"status": r.status_code, "code": r.json()["error"]["code"], "answer_s": round(took, 2),
            "rss_before_mib": before, "rss_peak_mib": server.memory_mib("VmHWM"),
            "rss_after_mib": server.memory_mib(), **pinger.finish()}


def limit_body(server: Serve) -> dict:
    """A prompt just under the default body limit (4 MiB): read, parsed and tokenized, then too long."""
    return big_body(server, 4 * 2**20 - 64)


def short_body(server: Serve, wait_s: float = 45.0) -> dict:
    """Content-Length 100, 15 bytes sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"prompt\": \"hi\"")
        start = time.monotonic()
        try:
            answer = sock.recv(4096).split(b"\r\n")[0].decode()
        except TimeoutError:
            return {"answer": None, "waited_s": wait_s}
        return {"answer": answer, "after_s": round(time.monotonic() - start, 1)}


def half_heads(server: Serve, wait_s: float = 20.0) -> dict:
    """HALF_HEADS sockets, each sending half a request head and then nothing."""
    pinger = HealthPinger(server.url)
    pinger.start()
    sockets = []
    for _ in range(HALF_HEADS):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: x\r\n")
        sock.setblocking(False)
        sockets.append(sock)
    open_while = server.open_files()
    time.sleep(wait_s)
    closed = refused = 0
    for sock in sockets:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            continue  # still open, nothing said
        except OSError:
            data = b""
        refused += data.startswith(b"HTTP/1.1 503")
        closed += not data.startswith(b"HTTP/1.1 503")
    figures = {"sockets": len(sockets), "server_open_files": open_while,
               f"after_{wait_s:g}_s": {"closed": closed, "refused_503": refused,
                                       "still_open": len(sockets) - closed - refused,
                                       "server_open_files": server.open_files()}}
    for sock in sockets:
        sock.close()
    figures["health_after"] = httpx.get(server.url + "/health", timeout=10).status_code
    return {**figures, **pinger.finish()}


def bad_model(checkout: Path, model: Path, work: Path, wait_s: float = 40.0) -> dict:
    """model.safetensors cut in half."""
    broken = work / "broken-model"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    start = time.monotonic()
    server = Serve(checkout, broken, work)
    try:
        server.proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        ready = httpx.get(server.url + "/ready")
        figures = {"exit": None, "up_after_s": wait_s, "health": httpx.get(server.url + "/health").status_code,
                   "ready": ready.status_code, "ready_body": ready.json()}
        server.stop()
        return figures
    said = [line.strip() for line in server.log_path.read_text().splitlines() if "model.safetensors" in line]
    return {"exit": server.proc.returncode, "after_s": round(time.monotonic() - start, 1), "log": said[:1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a tiny model directory")
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose crsm serve is attacked")
    parser.add_argument("attacks", nargs="*", choices=[*ATTACKS, []], default=list(ATTACKS))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * HALF_HEADS)), hard))
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="door-attacks-") as work:
        work_dir = Path(work)
        live = [a for a in args.attacks if a != "bad_model"]
        if live:
            server = Serve(args.checkout, args.model, work_dir)
            try:
                server.wait_ready()
                for name in live:
                    figures[name] = globals()[name](server)
            finally:
                server.stop()
        if "bad_model" in args.attacks:
            figures["bad_model"] = bad_model(args.checkout, args.model, work_dir)
    json.dump(figures, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
