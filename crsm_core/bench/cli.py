"""`crsm bench --out DIR [--quick] [--sections ...] [--tokens N] [--device ...] [--backbones ...]
[--docs PATH | --no-docs]`."""
from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from .settings import BACKBONES, DEFAULT_BACKBONES, DEFAULT_DOCS, DEVICES, SECTIONS, BenchSettings, SettingsError

log = logging.getLogger(__name__)
LOG_FILE = "bench.log"


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings.create(args.out, quick=args.quick, device=args.device, tokens=args.tokens,
                                sections=tuple(args.sections) if args.sections else None,
                                docs=None if args.no_docs else args.docs,
                                backbones=tuple(args.backbones) if args.backbones else None)


def command_line(settings: BenchSettings) -> str:
    """The run's settings as the command that repeats it (recorded in the report)."""
    parts = ["crsm bench", f"--out {settings.out}"]
    parts.append("--no-docs" if settings.docs is None else f"--docs {settings.docs}")
    if set(settings.sections) != set(SECTIONS):
        parts.append("--sections " + " ".join(settings.sections))
    parts += [f"--tokens {settings.tokens}", f"--device {settings.device}"] + (["--quick"] if settings.quick else [])
    if settings.backbones != DEFAULT_BACKBONES[settings.device]:
        parts.append("--backbones " + " ".join(settings.backbones))
    return " ".join(parts)


# Loads the functions of the sections beyond the core's (the http section: crsm/bench_server.py), when the
# command runs, so that registering it imports nothing of them.
SectionsLoader = Callable[[], Mapping[str, Callable[[Any], Any]]]


def _bench(args: argparse.Namespace, more_sections: SectionsLoader) -> int:
    from .report import summary
    from .runner import run_bench

    try:
        settings = settings_from_args(args)
    except SettingsError as e:
        log.error("%s", e)
        return 2
    settings.out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request of the HTTP section otherwise
    # The run's log next to its results: the one GPU run's story, tracebacks included.
    handler = logging.FileHandler(settings.out / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        run = run_bench(settings, command=command_line(settings), sections=more_sections())
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    print(summary(run))
    failed = [o for o in run.sections.values() if o.status == "failed"]
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction, more_sections: SectionsLoader) -> None:
    p = subparsers.add_parser("bench", help="serving benchmark: engine, baselines, deliberation overhead, HTTP")
    p.add_argument("--out", type=Path, required=True, help="directory for bench.json, bench.md, the plot and the log")
    docs = p.add_mutually_exclusive_group()
    docs.add_argument("--docs", type=Path, default=DEFAULT_DOCS,
                      help="markdown file whose generated section is rewritten (default: docs/benchmarks.md)")
    docs.add_argument("--no-docs", action="store_true", help="do not touch the documentation")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=None, help="subset to run (default: all)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per session (default 256; --quick 24)")
    p.add_argument("--quick", action="store_true", help="tiny model, fp32, CPU: a smoke run in seconds")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, default=None,
                   help="backbones of the engine section, the first also every other section's "
                        "(default: fused_step fused on CUDA, reference on the CPU)")
    p.set_defaults(func=functools.partial(_bench, more_sections=more_sections))
