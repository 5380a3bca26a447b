"""`crsm eval`: what deliberation does to task accuracy, and what it costs in speed.

On held-out arithmetic prompts (never seen in training), one sequence at a time, greedy decoding:

  greedy     (a) no deliberation
  async      (b) asynchronous deliberation with the model's default settings (crsm.json)
  sync       (c) synchronous MCTS: a plan for every position, computed inline (blocks each token) -
                 the upper bound of what the planner can contribute at these settings
  best_of_n  (d) N samples (temperature eval.temperature) ranked by the value heads' mean at the end
                 of each completion, N chosen to match the planner's measured compute in (b)

Accuracy comes with a Wilson 95% interval; differences against (a) with a paired bootstrap 95%
interval over prompts. tokens/s = generated tokens / decode wall time (prefill excluded) for one
sequence. The table goes to docs/evaluation.md with the device and commit.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..deliberation import DeliberationConfig
from ..engine import Completion, GenerationRequest
from ..markdown import write_generated_section
from ..model import CRSMModel
from ..sampling import SamplingParams
from ..tokenizer import ByteTokenizer
from .common import device_description, git_commit, resolve_device
from .config import TrainConfig
from .rollout import replay
from .tasks import check, heldout_prompts

log = logging.getLogger(__name__)

MODES = ("greedy", "async", "sync", "best_of_n")
LABELS = {"greedy": "(a) no deliberation", "async": "(b) async deliberation (defaults)",
          "sync": "(c) synchronous MCTS, every token", "best_of_n": "(d) best-of-N, value-ranked"}
BOOTSTRAP = 2000


@dataclass
class ModeResult:
    mode: str
    correct: list[bool]
    tokens: int
    decode_s: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.decode_s, 1e-9)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: list[bool], b: list[bool], seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a and its 95% percentile interval, resampling prompts (the pairs) with replacement."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ---- the modes -------------------------------------------------------------------------------------

def run_best_of_n(crsm: CRSMModel, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                  seed: int) -> ModeResult:
    """(d) n sampled completions per prompt through the engine; the one whose final state the value heads
    rate highest (mean of the heads' probabilities, read by a teacher-forced replay) is the answer."""
    tok = ByteTokenizer()
    sampled = [SamplingParams(temperature=temperature, seed=seed * 1_000_003 + i) for i in range(n)]
    requests = [GenerationRequest(tuple(tok.encode(p)), max_new_tokens, s) for p in prompts for s in sampled]
    completions, decode_s = _run_all(crsm, requests)
    texts = [[t for t in c.token_ids if t != tok.eos_id] for c in completions]
    scores = torch.empty(len(texts))

    def score(state, rows):   # called at every state of each row: the last call is its final state
        scores[rows.cpu()] = torch.sigmoid(crsm.value_heads(state.gather(rows)).float()).mean(dim=1).cpu()

    with torch.no_grad():
        replay(crsm.backbone, [tok.encode(p) for p in prompts for _ in range(n)], texts, score, tok.pad_id)
    correct = []
    for i, prompt in enumerate(prompts):
        best = i * n + int(torch.argmax(scores[i * n:(i + 1) * n]))
        correct.append(check(prompt, tok.decode(texts[best])))
    tokens = sum(len(c.token_ids) for c in completions)
    return ModeResult("best_of_n", correct, tokens, decode_s, {"n": n, "temperature": temperature})


def _run_all(crsm: CRSMModel, requests: list[GenerationRequest]) -> tuple[list[Completion], float]:
    """Every request through the model's engine at once (batched as the server batches them); returns the
    completions and the wall time from the first submission to the last token."""
    async def run():
        sessions = crsm.engine().submit_all(requests)
        return [await s.collect() for s in sessions]

    start = time.perf_counter()
    completions = asyncio.run(run())
    return completions, time.perf_counter() - start


def run_crsm(crsm: CRSMModel, prompts: list[str], max_new_tokens: int, deliberation: DeliberationConfig | None,
             mode: str) -> ModeResult:
    """Greedy decoding of every prompt through the model's engine, with or without deliberation."""
    greedy = SamplingParams(temperature=0.0)
    tok = ByteTokenizer()
    requests = [GenerationRequest(tuple(tok.encode(p)), max_new_tokens, greedy, deliberation=deliberation)
                for p in prompts]
    completions, decode_s = _run_all(crsm, requests)
    counters: dict[str, int] = {}
    for c in completions:
        for k, v in (c.done.deliberation or {}).items():
            counters[k] = counters.get(k, 0) + v
    correct = [check(p, tok.decode([t for t in c.token_ids if t != tok.eos_id])) for p, c in zip(prompts, completions)]
    tokens = sum(len(c.token_ids) for c in completions)
    return ModeResult(mode, correct, tokens, decode_s, {"counters": counters})


# ---- the whole evaluation --------------------------------------------------------------------------

def evaluate(cfg: TrainConfig, model_dir: Path | None = None, modes: tuple[str, ...] | None = None,
             prompts: int | None = None, out: Path | None = None) -> dict[str, Any]:
    model_dir = Path(model_dir or cfg.model_dir)
    modes = tuple(modes or MODES)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown eval modes {unknown}; choose from {MODES}")
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    e = cfg.eval
    prompt_list = heldout_prompts(cfg.tasks, prompts or e.prompts, cfg.seed)
    results: dict[str, ModeResult] = {}
    # every mode runs through the model's engine, the server's generation loop, so their speeds compare
    crsm = CRSMModel.from_pretrained(model_dir, device=device)
    delib = crsm.config
    try:
        if "greedy" in modes:
            results["greedy"] = run_crsm(crsm, prompt_list, e.max_new_tokens, None, "greedy")
        if "async" in modes:
            results["async"] = run_crsm(crsm, prompt_list, e.max_new_tokens, delib, "async")
        if "sync" in modes:
            results["sync"] = run_crsm(crsm, prompt_list, e.max_new_tokens, replace(delib, synchronous=True), "sync")
        if "best_of_n" in modes:
            n, basis = e.best_of_n, "configured"
            if n == 0:
                n, basis = equal_compute_n(results), "equal compute"
            results["best_of_n"] = run_best_of_n(crsm, prompt_list, n, e.max_new_tokens, e.temperature, cfg.seed)
            results["best_of_n"].notes["n_basis"] = basis
    finally:
        crsm.close()
    for mode, r in results.items():
        log.info("%s: accuracy %.3f, %.1f tokens/s", mode, r.accuracy, r.tokens_per_s)

    summary = summarize(results)
    doc = out or Path(e.out)
    meta = {"device": device_description(device), "commit": git_commit(), "model": str(model_dir),
            "prompts": len(prompt_list), "max_new_tokens": e.max_new_tokens, "task": asdict(cfg.tasks),
            "deliberation": asdict(delib),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_markdown(doc, meta, summary, model_dir)
    (doc.with_suffix(".json")).write_text(json.dumps({"meta": meta, "summary": summary}, indent=2) + "\n")
    return {"meta": meta, "summary": summary}


def equal_compute_n(results: dict[str, ModeResult]) -> int:
    """N for best-of-N from the measured planner compute of (b): a plan costs what (c) adds per token
    over (a) (it plans at every position, inline); (b) launched `launched` plans for its tokens."""
    if not {"greedy", "async", "sync"} <= set(results):
        raise ValueError("best_of_n with eval.best_of_n 0 needs the greedy, async and sync modes")
    a, b, c = results["greedy"], results["async"], results["sync"]
    per_token_a = a.decode_s / max(a.tokens, 1)
    per_plan = max(0.0, c.decode_s / max(c.tokens, 1) - per_token_a)
    launched = b.notes["counters"].get("launched", 0)
    planner_s_per_token = launched * per_plan / max(b.tokens, 1)
    n = max(1, round(1 + planner_s_per_token / per_token_a))
    results["async"].notes["planner_s_per_token"] = planner_s_per_token
    results["async"].notes["backbone_s_per_token"] = per_token_a
    return n


def summarize(results: dict[str, ModeResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = results.get("greedy")
    for mode, r in results.items():
        k, n = int(sum(r.correct)), len(r.correct)
        lo, hi = wilson(k, n)
        row = {"label": LABELS[mode], "correct": k, "prompts": n, "accuracy": round(r.accuracy, 4),
               "ci95": [round(lo, 4), round(hi, 4)], "tokens": r.tokens, "decode_s": round(r.decode_s, 3),
               "tokens_per_s": round(r.tokens_per_s, 1), "notes": r.notes}
        if base is not None and mode != "greedy":
            d, dlo, dhi = paired_bootstrap(base.correct, r.correct)
            row["delta_vs_a"] = [round(d, 4), round(dlo, 4), round(dhi, 4)]
        out[mode] = row
    if {"greedy", "async", "sync"} <= set(results):
        gain_c = results["sync"].accuracy - results["greedy"].accuracy
        gain_b = results["async"].accuracy - results["greedy"].accuracy
        out["recovered_fraction"] = None if gain_c <= 0 else round(gain_b / gain_c, 3)
    return out


BEGIN, END = "<!-- crsm eval: begin (generated) -->", "<!-- crsm eval: end -->"


def write_markdown(path: Path, meta: dict[str, Any], summary: dict[str, Any], model_dir: Path) -> None:
    """Writes the generated part between the BEGIN / END markers; text around them (notes written by
    hand) is kept when the file already has the markers."""
    write_generated_section(path, render_markdown(meta, summary, model_dir), BEGIN, END, heading="# Evaluation\n\n")


def render_markdown(meta: dict[str, Any], summary: dict[str, Any], model_dir: Path) -> str:
    lines = [
        "## Task accuracy with and without deliberation",
        "",
        f"Model `{meta['model']}`; device {meta['device']}; commit `{meta['commit']}`; {meta['date']}.",
        f"{meta['prompts']} held-out arithmetic prompts (`a+b=` / `a-b=`, operands of 1 to "
        f"{meta['task']['max_digits']} digits, never seen in training), greedy decoding, at most "
        f"{meta['max_new_tokens']} new tokens, one sequence at a time. Accuracy: exact answer by the checker; "
        "interval: Wilson 95%. Difference to (a): paired bootstrap 95% over prompts. tokens/s: generated "
        "tokens over decode time (prefill excluded).",
        "",
        "| mode | accuracy | 95% CI | vs (a) [95% CI] | tokens/s | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        if mode not in summary:
            continue
        r = summary[mode]
        delta = "" if "delta_vs_a" not in r else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*r["delta_vs_a"])
        notes = _notes(mode, r["notes"])
        lines.append(f"| {r['label']} | {r['accuracy']:.3f} ({r['correct']}/{r['prompts']}) | "
                     f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {delta} | {r['tokens_per_s']:.1f} | {notes} |")
    if summary.get("recovered_fraction") is not None:
        lines += ["", f"(b) recovers {summary['recovered_fraction']:.2f} of (c)'s gain over (a)."]
    lines += ["", "Deliberation settings (the model's crsm.json):", "", "```json",
              json.dumps(meta["deliberation"], indent=1, sort_keys=True), "```"]
    report_path = model_dir / "training_report.json"
    if report_path.exists():
        lines += ["", training_sections(json.loads(report_path.read_text()))]
    return "\n".join(lines)


def _notes(mode: str, notes: dict[str, Any]) -> str:
    if mode == "best_of_n":
        return f"N = {notes['n']} ({notes['n_basis']}), temperature {notes['temperature']}"
    counters = notes.get("counters") or {}
    keys = ("launched", "skipped", "cancelled", "failed", "applied", "applied_late", "pruned", "vetoed", "diverged",
            "rejected", "suggested", "blended")
    return ", ".join(f"{k.replace('_', ' ')} {counters[k]}" for k in keys if counters.get(k))


def training_sections(report: dict[str, Any]) -> str:
    """Dynamics fidelity and value-head calibration from the model's training report."""
    d, v = report["stages"]["dynamics"], report["stages"]["value"]
    lines = [
        "## Dynamics fidelity",
        "",
        f"Training report of `{report['config']}`, commit `{d['commit']}`, device {d['device']}. Open loop "
        f"against exact backbone steps on {d['heldout_rows']} held-out rows of the Python {d['corpus']['python']} "
        f"library after a "
        f"{d['heldout_prefix_tokens']}-token prefix; mean over the {report['model']['n_layer']} layers "
        "(per-layer values in the model's training_report.json). Persistence = the state left unchanged.",
        "",
        "| lag | cosine | rel. error | top-1 agreement | persistence cosine | persistence rel. error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f, p in zip(d["fidelity"], d["fidelity_persistence"]):
        lines.append(f"| {f['lag']} | {f['mean_cosine']:.4f} | {f['mean_rel_error']:.4f} | {f['top1_agreement']:.3f} "
                     f"| {p['mean_cosine']:.4f} | {p['mean_rel_error']:.4f} |")
    c = v["calibration_heldout"]
    auc = "n/a" if c["auc_mean_head"] is None else f"{c['auc_mean_head']:.4f}"
    lines += [
        "",
        "## Value-head calibration",
        "",
        f"Device {v['device']}, commit `{v['commit']}`. {v['heldout_prompts']} held-out prompts x "
        f"{v['rollouts_per_prompt']} rollouts (temperature {v['temperature']}); prediction = sigmoid of the mean "
        "of the heads' logits at the end of the prompt; label = the rollout's outcome.",
        "",
        "| samples | success rate | Brier | Brier of the base rate | AUC |",
        "| --- | --- | --- | --- | --- |",
        f"| {c['samples']} | {c['success_rate']:.3f} | {c['brier_mean_head']:.4f} | {c['brier_base_rate']:.4f} "
        f"| {auc} |",
    ]
    return "\n".join(lines)
