"""`crsm train backbone|dynamics|value|assemble|all --config configs/NAME.yaml` and `crsm eval`."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = ("backbone", "dynamics", "value", "assemble")


def _load(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, out_dir=args.out_dir, device=args.device)


def run_stage(cfg, stage: str, stop_after: int | None = None) -> dict | Path:
    if stage == "backbone":
        from .stage1_backbone import train_backbone
        return train_backbone(cfg, stop_after=stop_after)
    if stage == "dynamics":
        from .stage2_dynamics import train_dynamics
        return train_dynamics(cfg, stop_after=stop_after)
    if stage == "value":
        from .stage3_value import train_value
        return train_value(cfg)
    if stage == "assemble":
        from .stage4_assemble import assemble
        return assemble(cfg)
    raise ValueError(f"unknown stage {stage!r}")


def _train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        result = run_stage(cfg, stage, stop_after=args.stop_after)
        if stage == "assemble":
            print(f"assembled {result}")
        elif not result:
            print(f"stage {stage}: stopped after {args.stop_after} steps; rerun the same command to resume")
            return 0
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    cfg = _load(args)
    modes = tuple(args.modes) if args.modes else None
    result = evaluate(cfg, model_dir=args.model, modes=modes, prompts=args.prompts, out=args.out,
                      families=tuple(args.families) if args.families else None)
    print(json.dumps(result["summary"], indent=2))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="configs/NAME.yaml")
    p.add_argument("--out-dir", default=None, help="override the config's out_dir")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override the config's device")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="training pipeline: backbone, dynamics, value heads, assembly")
    p.add_argument("stage", choices=(*STAGES, "all"))
    _common(p)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (checkpointed); the same command resumes")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("eval", help="task accuracy with and without deliberation; writes a markdown table")
    _common(p)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the config's assembled one)")
    p.add_argument("--modes", nargs="+", default=None,
                   help="subset of: greedy async sync best_of_n oracle suggestions_only injection_only (default: all)")
    p.add_argument("--families", nargs="+", default=None,
                   help="task families to evaluate (default: the config's; a model trained on fewer: name them)")
    p.add_argument("--prompts", type=int, default=None, help="override eval.prompts")
    p.add_argument("--out", type=Path, default=None, help="markdown output (default: the config's eval.out)")
    p.set_defaults(func=_eval)
