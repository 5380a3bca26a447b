"""Stage 4: one model directory the server loads.

    config.json, model.safetensors     backbone (mamba_ssm layout; matrices in the shipped dtype)
    tokenizer_config.json              byte-level tokenizer
    dynamics.safetensors / .json       latent dynamics model
    value_heads.safetensors / .json    per-layer value heads
    crsm.json                          deliberation defaults
    training_report.json, TRAINING_REPORT.md

Matrices are stored in `assemble.dtype` (bf16 by default) and the per-channel parameters in fp32;
loading casts everything to the runtime dtype. The earlier stages rounded their weights the same way
before their final measurements, so the reported numbers are those of these files.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_pretrained, save_component, save_pretrained
from ..deliberation import DELIBERATION_FILE
from ..dynamics import COMPONENT_NAME as DYNAMICS_COMPONENT, LatentDynamics
from ..tokenizer import ByteTokenizer
from ..value import COMPONENT_NAME as VALUE_COMPONENT, ValueHeads
from .common import cast_matrices, git_commit, read_report
from .config import TrainConfig, deliberation_config
from .rollout import generate
from .stage1_backbone import exported_backbone
from .stage2_dynamics import dynamics_dir
from .stage3_value import value_dir, value_section

log = logging.getLogger(__name__)


REPORT_JSON = "training_report.json"
REPORT_MD = "TRAINING_REPORT.md"
SAMPLE_PROMPTS = ("def ", "The ", "import ", "12+34=")


def assemble(cfg: TrainConfig) -> Path:
    out = cfg.model_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = ByteTokenizer()
    backbone = load_pretrained(exported_backbone(cfg), dtype=torch.float32, impl="reference")
    save_pretrained(cast_matrices(backbone, cfg.assemble.dtype), out, tok)

    dynamics = LatentDynamics.load(dynamics_dir(cfg), backbone)
    save_component(out, DYNAMICS_COMPONENT, cast_matrices(dynamics, cfg.assemble.dtype), dynamics.config.to_dict())

    heads = ValueHeads.load(value_dir(cfg))
    save_component(out, VALUE_COMPONENT, cast_matrices(heads, cfg.assemble.dtype), heads.config.to_dict())

    write_deliberation_defaults(out, cfg.deliberation)

    stages = {name: read_report(cfg.out_path, name) for name in ("backbone", "dynamics", "value")}
    report: dict[str, Any] = {
        "config": cfg.name,
        "commit": git_commit(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_dtype": cfg.assemble.dtype,
        "train_config": dataclasses.asdict(cfg),
        "model": backbone.config.to_dict(),
        "backbone_parameters": backbone.num_parameters(),
        "stages": stages,
        "samples": _samples(backbone, cfg.seed, cfg.assemble.sample_tokens),
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_MD).write_text(render_markdown(report))
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    total = sum(sizes.values())
    report["files"], report["total_bytes"] = sizes, total
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    log.info("assembled %s (%.2f MB)", out, total / 1e6)
    return out


def write_deliberation_defaults(directory: Path, settings: dict[str, Any]) -> None:
    """crsm.json: the config's deliberation settings (validated at config load). Only the settings the
    config names are written; the rest take DeliberationConfig's defaults when loaded."""
    deliberation_config(settings)
    (directory / DELIBERATION_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _samples(model, seed: int, max_new_tokens: int) -> list[dict[str, str]]:
    """A few sampled continuations (temperature 0.8, fixed seed) to show what the model writes."""
    tok = ByteTokenizer()
    out = generate(model.eval(), [tok.encode(p) for p in SAMPLE_PROMPTS], max_new_tokens, 0.8, tok.eos_id, seed=seed)
    return [{"prompt": p, "completion": tok.decode(c)} for p, c in zip(SAMPLE_PROMPTS, out.completions)]


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    b, d, v = (report["stages"][k] for k in ("backbone", "dynamics", "value"))
    lines = [
        f"# Training report: `{report['config']}`",
        "",
        f"Commit `{report['commit']}`, created {report['created']}. Weights: matrices in {report['weights_dtype']}, "
        "per-channel parameters in fp32.",
        "",
        "## Stage 1: backbone",
        "",
        f"- {b['parameters']:,} parameters; device {b['device']} ({b['precision']}); commit `{b['commit']}`.",
        f"- {b['steps']} steps of {b['batch_size']} x {b['seq_len']} tokens = {b['tokens_seen']:,} tokens in "
        f"{b['train_time_s']} s ({b['tokens_per_s']:,} tokens/s).",
        f"- Train loss {b['first_train_loss']:.3f} -> {b['final_train_loss']:.3f} nats/token; held-out text loss "
        f"{b['initial_heldout_text_loss']:.3f} -> {b['final_heldout_text_loss']:.3f} "
        f"({b['final_heldout_bits_per_byte']:.3f} bits/byte).",
        f"- Greedy accuracy on {b['heldout_task_prompts']} held-out prompts of each family: " + ", ".join(
            f"{family} {acc:.3f}" for family, acc in b.get("heldout_greedy_accuracy_by_family",
                                                          {"arithmetic": b["heldout_task_greedy_accuracy"]}).items()) + ".",
        f"- Corpus: Python {b['corpus']['python']} standard library, {b['corpus']['train_files']} train files "
        f"({b['corpus']['train_tokens']:,} tokens), {b['corpus']['heldout_files']} held-out files "
        f"({b['corpus']['heldout_tokens']:,} tokens).",
        "",
        "## Stage 2: latent dynamics (fidelity against exact backbone steps, held-out text, open loop)",
        "",
        f"Device {d['device']}, commit `{d['commit']}`; {d['steps']} steps of {d['rows']} rows (open loop over "
        f"{d['horizon']} steps); {d['parameters']:,} parameters; "
        f"a step costs {d['flops_ratio']:.3f} of a backbone step in flops and {d['time_ratio']:.3f} in time "
        f"(batch {d['time_ratio_rows']}). {d['heldout_rows']} held-out rows of the Python {d['corpus']['python']} "
        f"library after a {d['heldout_prefix_tokens']}-token prefix. Mean over layers (per layer: the JSON report):",
        "",
        "| lag | cosine | rel. error | top-1 agreement | persistence cosine | persistence rel. error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f, p in zip(d["fidelity"], d["fidelity_persistence"]):
        lines.append(f"| {f['lag']} | {f['mean_cosine']:.4f} | {f['mean_rel_error']:.4f} | {f['top1_agreement']:.3f} "
                     f"| {p['mean_cosine']:.4f} | {p['mean_rel_error']:.4f} |")
    lines += [
        "",
        "\"Persistence\" predicts that the state does not change: the cosine the state's slow decay gives for free.",
        "",
        "## Stage 3: value heads, trained on the candidates a search values",
        "",
        *value_section(v),
        "",
        "## Samples (temperature 0.8)",
        "",
    ]
    for s in report["samples"]:
        lines += ["```", s["prompt"] + s["completion"], "```", ""]
    return "\n".join(lines)
