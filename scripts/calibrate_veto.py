"""Calibrate a model directory's veto threshold (stage 3 does this for the models it trains).

    python -m scripts.calibrate_veto --model models/default [--prompts 256]

Completes held-out task prompts and held-out text at the model's defaults, measures the value heads'
spread at every state (training/stage3_value.py `veto_calibration`) and writes the threshold into the
directory's value_heads.json (and the figures into its training_report.json). Used once for the
bundled model, trained before stage 3 did it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from crsm_core.checkpoint import load_pretrained
from crsm_core.tokenizer import ByteTokenizer
from crsm_core.training.config import load_config
from crsm_core.training.rollout import generate
from crsm_core.training.stage3_value import VETO_PERCENTILE, veto_calibration
from crsm_core.tasks import heldout_prompts
from crsm_core.value import ValueHeads

log = logging.getLogger("calibrate_veto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--config", type=Path, default=Path("configs/small.yaml"))
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config)
    model = load_pretrained(args.model)
    heads = ValueHeads.load(args.model)
    tok = ByteTokenizer()
    prompts = heldout_prompts(cfg.tasks, args.prompts, args.seed)
    out = generate(model, [tok.encode(p) for p in prompts], cfg.value.max_new_tokens, cfg.value.temperature,
                   tok.eos_id, seed=args.seed)
    veto = veto_calibration(model, heads, prompts, out.completions)
    log.info("veto calibration: %s", veto)
    config = dataclasses.replace(heads.config, veto_threshold=veto["threshold"], veto_percentile=VETO_PERCENTILE)
    (args.model / "value_heads.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    report_path = args.model / "training_report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        report["stages"]["value"]["veto"] = {**veto, "prompts": args.prompts, "seed": args.seed,
                                             "by": "scripts/calibrate_veto.py"}
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.model / "value_heads.json")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
