"""The front end's CPU cost per streamed SSE message: `crsm serve` with the engine in a process of its own
(so that the server's process does HTTP work only), a tiny model, and N clients streaming at once.

The clients are raw asyncio sockets in this process (cheap, so the server's process is what is measured);
each reads its stream to the end. The figure is the server process's CPU time (user + system, all its
threads; the engine core is a child process and not counted) over the SSE messages the clients received:
microseconds of front end per message. Also the messages per HTTP chunk (per send): a front end that falls
behind writes more messages per send, which makes each cheaper, so compare at similar values.

Several servers can be measured in one run (`--server LABEL=TREE[:FLAGS]`: a source tree, e.g. a checkout
of an earlier commit, and extra `crsm serve` flags), all on the same model, started together and measured
in turn, round after round (so that a drift of the machine's speed reaches all of them alike).

    python scripts/front_end_cost.py [--server LABEL=TREE[:FLAGS] ...] [--clients 64] [--tokens 512]
        [--endpoint generate|chat|completions] [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.model import CRSMModel
from crsm_core.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PATHS = {"generate": "/v1/generate", "chat": "/v1/chat/completions", "completions": "/v1/completions"}


def request_body(endpoint: str, index: int, tokens: int) -> dict:
    common = {"max_tokens": tokens, "stream": True, "ignore_eos": True, "temperature": 0.0}
    if endpoint == "generate":
        return {"token_ids": [65 + index % 26, 66, 67, 68], **common}
    if endpoint == "chat":
        return {"model": "tiny", "messages": [{"role": "user", "content": f"hello {index}"}], **common}
    return {"model": "tiny", "prompt": f"hello {index}", **common}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS   # utime, stime


async def one_stream(port: int, path: str, body: dict) -> bytes:
    """The whole response (the server closes the connection after it: `connection: close`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode() + payload)
    chunks = []
    while chunk := await reader.read(1 << 16):
        chunks.append(chunk)
    writer.close()
    response = b"".join(chunks)
    if not response.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{path} answered {response[:300]!r}")
    return response


def chunks(response: bytes) -> int:
    """HTTP chunks of a chunked response: the sends of its body."""
    body, count = response.partition(b"\r\n\r\n")[2], 0
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return count
        count, body = count + 1, rest[size + 2:]


async def streams(port: int, endpoint: str, clients: int, tokens: int) -> tuple[int, int, float]:
    """(SSE messages, HTTP chunks, seconds) of `clients` streams at once."""
    start = time.perf_counter()
    responses = await asyncio.gather(*(one_stream(port, PATHS[endpoint], request_body(endpoint, i, tokens))
                                       for i in range(clients)))
    wall = time.perf_counter() - start
    # every SSE message (the byte tokenizer's text of a token that ends no UTF-8 character is held back:
    # the OpenAI streams then send no chunk for it)
    return sum(r.count(b"data: ") for r in responses), sum(chunks(r) for r in responses), wall


class Server:
    def __init__(self, tree: Path, model_dir: Path, clients: int, extra: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, "-m", "crsm", "--log-level", "WARNING", "serve", "--model", str(model_dir),
                   "--model-name", "tiny", "--device", "cpu", "--port", str(self.port), "--engine-process",
                   "--max-sessions", str(clients), "--queue-size", str(4 * clients), "--torch-threads", "1",
                   "--no-ui", *extra]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.process = subprocess.Popen(command, cwd=tree, env=env)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not get ready"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def measure(server: Server, endpoint: str, clients: int, tokens: int) -> dict:
    asyncio.run(streams(server.port, endpoint, clients, max(8, tokens // 8)))   # warm-up
    before = cpu_seconds(server.process.pid)
    events, sends, wall = asyncio.run(streams(server.port, endpoint, clients, tokens))
    cpu = cpu_seconds(server.process.pid) - before
    if endpoint == "generate" and events != clients * (tokens + 1):
        raise RuntimeError(f"{events} events, expected {clients * (tokens + 1)} (a token event each, and done)")
    return {"events": events, "events_per_send": round(events / sends, 2), "wall_s": round(wall, 3),
            "server_cpu_s": round(cpu, 3), "us_per_event": round(cpu / events * 1e6, 2),
            "events_per_s": round(events / wall), "events_per_cpu_s": round(events / cpu)}


def parse_server(text: str) -> tuple[str, Path, list[str]]:
    label, _, rest = text.partition("=")
    tree, _, flags = rest.partition(":")
    return label, Path(tree or REPO), flags.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", type=parse_server,
                        help="LABEL=TREE[:FLAGS] (repeatable; default: this tree as it is)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512, help="token events per stream")
    parser.add_argument("--endpoint", choices=sorted(PATHS), default="generate")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    configs = args.server or [("this", REPO, [])]
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        model = CRSMModel(MambaLM(tiny_config()), tokenizer=ByteTokenizer())
        model.save_pretrained(Path(directory))
        model.close()
        servers = {label: Server(tree, Path(directory), args.clients, flags) for label, tree, flags in configs}
        results: dict[str, list[dict]] = {label: [] for label in servers}
        try:
            for server in servers.values():
                server.wait_ready()
            for _ in range(args.rounds):
                for label, server in servers.items():
                    results[label].append(measure(server, args.endpoint, args.clients, args.tokens))
        finally:
            for server in servers.values():
                server.stop()
    for (label, tree, flags), runs in zip(configs, results.values()):
        runs.sort(key=lambda r: r["us_per_event"])
        print(json.dumps({"server": label, "tree": str(tree), "flags": flags, "endpoint": args.endpoint,
                          "clients": args.clients, "median": runs[len(runs) // 2],
                          "us_per_event_all": [r["us_per_event"] for r in runs],
                          "events_per_send_all": [r["events_per_send"] for r in runs]}))


if __name__ == "__main__":
    main()
