"""`crsm-client`: generate from the command line.

    crsm-client generate "Once upon a time" --stream --deliberation --url http://127.0.0.1:8000
    crsm-client health

The generated text goes to stdout (as it arrives, with --stream); a one-line summary (finish reason,
token counts, timings) goes to stderr, so `crsm-client generate ... > out.txt` keeps only the text.
With --json, stdout gets the result as JSON instead (with --stream: one JSON object per event).
Exit status: 0 on success, 1 when the server or the connection failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from clients.client import DEFAULT_URL, CRSMClient, Timeouts
from clients.errors import CRSMError
from clients.retry import RetryPolicy
from clients.types import (DeliberationOptions, DoneEvent, ErrorEvent, GenerateResult,
                           InjectionEvent, Timings, TokenEvent, Usage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crsm-client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("CRSM_URL", DEFAULT_URL),
                        help="server root (default: $CRSM_URL or %(default)s)")
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds")
    parser.add_argument("--read-timeout", type=float, default=120.0,
                        help="longest silence from the server, in seconds")
    parser.add_argument("--max-retries", type=int, default=3, help="on 429/503 and refused connects")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a continuation of a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", default=None,
                     help="keep generating past the end-of-text token")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--deliberation", action=argparse.BooleanOptionalAction, default=None,
                     help="turn the planner on or off (default: the server's setting)")
    gen.add_argument("--lag", type=int, help="planner lag in tokens (with --deliberation)")
    gen.add_argument("--simulations", type=int, help="searches per plan (with --deliberation)")
    gen.add_argument("--injection-rate", type=float, help="gate scale (with --deliberation)")
    gen.add_argument("--use-suggestions", action=argparse.BooleanOptionalAction, default=None,
                     help="take the planner's token when ready (with --deliberation)")
    gen.add_argument("--show-injections", action="store_true",
                     help="with --stream: print each injection to stderr")
    gen.add_argument("--json", action="store_true", help="print JSON instead of text")

    commands.add_parser("health", help="is the server alive (/health) and ready (/ready)?")
    return parser


def _deliberation(args: argparse.Namespace, parser: argparse.ArgumentParser
                  ) -> DeliberationOptions | None:
    knobs = {"lag": args.lag, "simulations": args.simulations,
             "injection_rate": args.injection_rate, "use_suggestions": args.use_suggestions}
    given = {name: value for name, value in knobs.items() if value is not None}
    if given and not args.deliberation:
        parser.error(f"--{next(iter(given)).replace('_', '-')} needs --deliberation")
    if args.deliberation is None:
        return None
    return DeliberationOptions(enabled=args.deliberation, **given)


def _summary(finish_reason: str, usage: Usage, timings: Timings) -> str:
    parts = [f"finish_reason={finish_reason}", f"prompt_tokens={usage.prompt_tokens}",
             f"completion_tokens={usage.completion_tokens}"]
    for name in ("queue_s", "ttft_s", "mean_itl_s", "tokens_per_s"):
        value = getattr(timings, name)
        if value is not None:
            parts.append(f"{name}={value:.4g}")
    return " ".join(parts)


def _run_stream(client: CRSMClient, options: dict[str, Any], args: argparse.Namespace,
                out: TextIO, err: TextIO) -> int:
    with client.stream(args.prompt, **options) as events:
        for event in events:
            if args.json:
                out.write(json.dumps({"event": type(event).__name__, **event.model_dump()}) + "\n")
                out.flush()
            elif isinstance(event, TokenEvent):
                out.write(event.text)
                out.flush()
            elif isinstance(event, InjectionEvent) and args.show_injections:
                err.write(f"\n[injection target={event.target_position} at={event.position} "
                          f"outcome={event.outcome} lateness={event.lateness}]\n")
            if isinstance(event, DoneEvent):
                if not args.json:
                    out.write("\n")
                err.write(_summary(event.finish_reason, event.usage, event.timings) + "\n")
            elif isinstance(event, ErrorEvent):
                err.write(f"error: {event.type}: {event.message}\n")
                return 1
    return 0


def _run_generate(client: CRSMClient, options: dict[str, Any], args: argparse.Namespace,
                  out: TextIO, err: TextIO) -> int:
    result: GenerateResult = client.generate(args.prompt, **options)
    if args.json:
        out.write(result.model_dump_json() + "\n")
    else:
        out.write(result.text + "\n")
    err.write(_summary(result.finish_reason, result.usage, result.timings) + "\n")
    return 0


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    if args.command == "generate":
        options = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                   "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
                   "stop": args.stop, "ignore_eos": args.ignore_eos,
                   "deliberation": _deliberation(args, parser)}
        options = {name: value for name, value in options.items() if value is not None}
    timeouts = Timeouts(connect_s=args.connect_timeout, read_s=args.read_timeout)
    retry = RetryPolicy(max_retries=args.max_retries)
    with CRSMClient(args.url, timeouts=timeouts, retry=retry) as client:
        try:
            if args.command == "health":
                alive, ready = client.health(), client.ready()
                out.write(f"alive={alive} ready={ready}\n")
                return 0 if alive and ready else 1
            if args.stream:
                return _run_stream(client, options, args, out, err)
            return _run_generate(client, options, args, out, err)
        except CRSMError as error:
            err.write(f"error: {error}\n")
            return 1


if __name__ == "__main__":
    sys.exit(main())
