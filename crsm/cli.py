"""`crsm`: the command line. Each subcommand lives next to what it drives; this file only wires them.

Building the parser imports no torch, no server and no training code (tests/test_cli.py checks it), so
that `crsm --help` answers at once: a command imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import logging
import sys

from crsm_core.bench import cli as bench_cli
from crsm_core.cli import register as register_core
from crsm_core.training.cli import register as register_training
from server.settings import ServerSettings


def _serve(args: argparse.Namespace) -> int:
    from server.cli import serve

    return serve(args)


def _bench_sections():
    from .bench_server import SECTIONS

    return SECTIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crsm", description="CRSM server: Mamba-2 inference with a latent planner")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    register_core(sub)
    p = sub.add_parser("serve", help="run the HTTP server (OpenAI-compatible and native SSE API)",
                       description="Every flag is also an environment variable CRSM_<NAME> (shown with each "
                                   "flag); a flag wins over the variable, the variable over the default.")
    ServerSettings.add_cli_args(p)
    p.set_defaults(func=_serve)
    register_training(sub)
    bench_cli.register(sub, _bench_sections)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return args.func(args)
