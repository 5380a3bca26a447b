"""Deliberation as served: `crsm serve` on a model with its defaults, held-out prompts over HTTP with
deliberation on and off, and what became of every plan.

    python -m scripts.served_deliberation --model models/default --prompts 200 [--concurrency 16]
        [--deliberation '{"enabled": true}'] [--out docs/evaluation.md]

Writes its section of the output document (between its own markers), with the device, the commit and
the settings: accuracy on and off with a paired bootstrap interval of the difference, the plans'
outcomes and effects, the landing ratio (applied on time or caught up, over the plans that were not
vetoed), ITL and TTFT as the clients saw them.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from crsm_core.markdown import write_generated_section
from crsm_core.tasks import TaskSpec, check, heldout_prompts
from crsm_core.training.common import git_commit
from crsm_core.training.evaluate import paired_bootstrap, percentile

log = logging.getLogger("served_deliberation")
BEGIN, END = "<!-- served deliberation: begin (generated) -->", "<!-- served deliberation: end -->"
OUTCOMES = ("applied", "applied_late", "pruned", "vetoed", "diverged", "rejected")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(url: str, body: dict) -> dict:
    """One streamed /v1/generate: the text, the done event, the client-side token times."""
    start, times, text, done = time.perf_counter(), [], [], None
    with httpx.stream("POST", url + "/v1/generate", json={**body, "stream": True}, timeout=600) as r:
        r.raise_for_status()
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event is not None:
                data = json.loads(line.split(":", 1)[1])
                if event == "token":
                    times.append(time.perf_counter())
                    text.append(data["text"])
                elif event == "done":
                    done = data
    return {"text": "".join(text), "done": done, "ttft": times[0] - start if times else None,
            "itl": [b - a for a, b in zip(times, times[1:])]}


def run(url: str, prompts: list[str], deliberation: dict | None, concurrency: int, max_tokens: int) -> list[dict]:
    def one(prompt: str) -> dict:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if deliberation is not None:
            body["deliberation"] = deliberation
        return stream(url, body)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--deliberation", default='{"enabled": true}', help="the requests' deliberation object")
    parser.add_argument("--out", type=Path, default=Path("docs/evaluation.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    deliberation = json.loads(args.deliberation)
    prompts = heldout_prompts(TaskSpec(max_digits=5), args.prompts, seed=0)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "crsm", "--log-level", "WARNING", "serve", "--model",
                               str(args.model), "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        off = run(url, prompts, None, args.concurrency, args.max_tokens)
        on = run(url, prompts, deliberation, args.concurrency, args.max_tokens)
    finally:
        server.terminate()
        server.wait(timeout=60)
    right_off = [check(p, r["text"]) for p, r in zip(prompts, off)]
    right_on = [check(p, r["text"]) for p, r in zip(prompts, on)]
    counters: dict[str, int] = {}
    for r in on:
        for k, v in (r["done"]["deliberation"] or {}).items():
            counters[k] = counters.get(k, 0) + v
    judged = counters.get("produced", 0) - counters.get("vetoed", 0)
    landing = None if judged <= 0 else (counters["applied"] + counters["applied_late"]) / judged
    d, lo, hi = paired_bootstrap(right_off, right_on)
    lines = ["## Deliberation as served on this machine", "",
             f"`crsm serve` on `{args.model}` with its defaults; {args.prompts} held-out a+b prompts over HTTP, greedy, "
             f"{args.concurrency} clients at a time, at most {args.max_tokens} tokens; requests with "
             f"`\"deliberation\": {json.dumps(deliberation)}` against the same without. Commit `{git_commit()}`, "
             f"{time.strftime('%Y-%m-%d')}, {_device()}.", "",
             "| | accuracy | TTFT p50 (ms) | ITL p50 / p99 (ms) |", "| --- | --- | --- | --- |"]
    for name, runs, right in (("deliberation off", off, right_off), ("deliberation on", on, right_on)):
        itl = [1e3 * g for r in runs for g in r["itl"]]
        ttft = [1e3 * r["ttft"] for r in runs if r["ttft"] is not None]
        lines.append(f"| {name} | {np.mean(right):.3f} | {percentile(ttft, 50):.1f} | "
                     f"{percentile(itl, 50):.2f} / {percentile(itl, 99):.2f} |")
    lines += ["", f"On minus off: {100 * d:+.1f} points, paired bootstrap 95% [{100 * lo:+.1f}, {100 * hi:+.1f}].", "",
              "Plans: " + ", ".join(f"{k.replace('_', ' ')} {counters.get(k, 0)}" for k in
                                    ("launched", *OUTCOMES, "cancelled", "suggested", "blended")) + ".",
              f"Landing ratio (applied on time or caught up, over the plans not vetoed): "
              f"{'n/a' if landing is None else f'{landing:.2f}'}."]
    write_generated_section(args.out, "\n".join(lines), BEGIN, END, heading="# Evaluation\n\n")
    log.info("\n".join(lines))


def _device() -> str:
    import os
    import platform
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
