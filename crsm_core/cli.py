"""`crsm info`, `crsm generate`, `crsm init`: the core's own subcommands (crsm/cli.py wires every command).

Registering them imports nothing heavy; each command imports what it drives when it runs."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import DEFAULT_MODEL_DIR


def _info(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_pretrained
    from .state import RecurrentState

    model = load_pretrained(args.model, impl="reference")
    config = model.config
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    info = {
        "model": str(args.model),
        "config": config.to_dict(),
        "parameters": model.num_parameters(),
        "state_bytes_per_session": RecurrentState.bytes_per_row(config, dtype),
        "state_dtype": str(dtype).removeprefix("torch."),
    }
    print(json.dumps(info, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Stream a completion to stdout through the same engine the server uses."""
    import asyncio
    from dataclasses import replace

    from .engine import DoneEvent, Engine, EngineConfig, ErrorEvent, GenerationRequest, TokenEvent
    from .model import CRSMModel
    from .sampling import SamplingParams

    model = CRSMModel.from_pretrained(args.model)
    if model.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer")
    deliberation = replace(model.config, enabled=True, lag=args.lag) if args.deliberation else None
    request = GenerationRequest(
        prompt_ids=tuple(model.tokenizer.encode(args.prompt)), max_tokens=args.max_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
        deliberation=deliberation)

    async def run() -> int:
        engine = Engine.for_model(model, EngineConfig(max_sessions=1, queue_size=1))
        engine.start()
        try:
            session = engine.submit(request)
            async for event in session.stream():
                if isinstance(event, TokenEvent):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, DoneEvent):
                    sys.stdout.write("\n")
                    logging.getLogger("crsm").info("finish_reason=%s usage=%s deliberation=%s",
                                                   event.finish_reason, event.usage, event.deliberation)
                elif isinstance(event, ErrorEvent):
                    sys.stderr.write(f"error: {event.message}\n")
                    return 1
            return 0
        finally:
            await engine.shutdown()
            model.close()

    return asyncio.run(run())


def _init(args: argparse.Namespace) -> int:
    """A randomly initialised model directory (for trying the server before training one)."""
    import torch

    from .backbone import MambaLM
    from .checkpoint import save_pretrained
    from .config import tiny_config
    from .tokenizer import ByteTokenizer

    torch.manual_seed(args.seed)
    model = MambaLM(tiny_config(vocab_size=ByteTokenizer.vocab_size))
    save_pretrained(model, args.out, ByteTokenizer())
    print(f"wrote a random tiny model to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print a model's config, parameter count and state size per session")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=_info)

    p = subparsers.add_parser("generate", help="stream a completion of PROMPT to stdout")
    p.add_argument("prompt")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deliberation", action="store_true", help="steer with the background planner")
    p.add_argument("--lag", type=int, default=3, help="deliberation lag in tokens")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("init", help="write a randomly initialised tiny model directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init)
