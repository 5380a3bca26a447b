"""`crsm eval`: does deliberation make answers better, at what cost, measured on the engine users are
served by.

Pre-registered. Primary endpoint: held-out accuracy (exact checker) per task family, mode (b) against
(a). Every mode runs the family's held-out prompts through the model's `Engine` (all prompts at once,
batched as the server batches them; greedy decoding unless said otherwise):

  greedy            (a) no deliberation
  async             (b) asynchronous deliberation with the family's verifier (`deliberation.verifier`),
                        the first `lead_window` answer tokens planned synchronously (the lead window)
  sync              (c) synchronous deliberation: a plan for every position, the session waits for each
  best_of_n         (d) N samples (temperature eval.temperature), the first the same verifier accepts,
                        N set so that (d) takes the GPU time (b) took (at least 1)
  oracle            (e) pass@k: some of k samples is right (the ceiling of any choice among k samples)
  suggestions_only  (b) with the state blend off (injection rate 0)
  injection_only    (b) with suggestions off: plans act only by blending their state

Statistics: accuracy with a Wilson 95% interval; the difference to (a) with a paired bootstrap 95%
interval over prompts and an exact McNemar test on the discordant pairs; fixes (a wrong -> right) and
regressions (a right -> wrong) counted apart. Cost beside each row: tokens/s over the run's wall time,
TTFT p50 and ITL p50/p99 over every session. The table goes to docs/evaluation.md with the device and
commit.
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

from ..deliberation import DeliberationConfig
from ..engine import GenerationRequest, Session
from ..markdown import write_generated_section
from ..model import CRSMModel
from ..sampling import SamplingParams
from ..tasks import check, heldout_prompts
from ..tokenizer import ByteTokenizer
from .common import device_description, git_commit, resolve_device
from .config import TrainConfig
from .stage3_value import value_section

log = logging.getLogger(__name__)

MODES = ("greedy", "async", "sync", "best_of_n", "oracle", "suggestions_only", "injection_only")
LABELS = {"greedy": "(a) greedy", "async": "(b) async deliberation", "sync": "(c) synchronous deliberation",
          "best_of_n": "(d) best-of-N, same verifier, equal GPU time", "oracle": "(e) oracle: pass@k",
          "suggestions_only": "(b) suggestions only", "injection_only": "(b) injection only"}
BOOTSTRAP = 2000
GREEDY = SamplingParams(temperature=0.0)


@dataclass
class ModeResult:
    mode: str
    correct: list[bool]
    tokens: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.wall_s, 1e-9)


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


def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """(fixes: a wrong -> b right, regressions: a right -> b wrong, exact two-sided McNemar p-value)."""
    fixes = sum(1 for x, y in zip(a, b) if not x and y)
    regressions = sum(1 for x, y in zip(a, b) if x and not y)
    n, k = fixes + regressions, min(fixes, regressions)
    if n == 0:
        return fixes, regressions, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return fixes, regressions, min(1.0, 2 * tail)


def percentile(values: list[float], q: float) -> float | None:
    return None if not values else float(np.percentile(values, q))


# ---- the modes -------------------------------------------------------------------------------------

def run_requests(crsm: CRSMModel, requests: list[GenerationRequest]) -> tuple[list, list[Session], float]:
    """Every request through the model's engine at once; the completions, the sessions (for their
    timings) and the wall time from the first submission to the last token."""
    async def run():
        sessions = crsm.engine().submit_all(requests)
        return [await s.collect() for s in sessions], sessions

    start = time.perf_counter()
    completions, sessions = asyncio.run(run())
    return completions, sessions, time.perf_counter() - start


def run_mode(crsm: CRSMModel, mode: str, prompts: list[str], max_new_tokens: int,
             deliberation: DeliberationConfig | None) -> ModeResult:
    tok = ByteTokenizer()
    requests = [GenerationRequest(tuple(tok.encode(p)), max_new_tokens, GREEDY, deliberation=deliberation)
                for p in prompts]
    completions, sessions, wall = run_requests(crsm, requests)
    counters: dict[str, int] = {}
    for c in completions:
        for k, v in (c.done.deliberation or {}).items():
            counters[k] = counters.get(k, 0) + v
    correct = [check(p, tok.decode([t for t in c.token_ids if t != tok.eos_id])) for p, c in zip(prompts, completions)]
    return ModeResult(mode, correct, sum(len(c.token_ids) for c in completions), wall,
                      [s.timings().ttft_s for s in sessions if s.timings().ttft_s is not None],
                      [gap for s in sessions for gap in s.inter_token_latencies()], {"counters": counters})


def run_samples(crsm: CRSMModel, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                seed: int) -> tuple[list[list[bool]], list[Session], float, int]:
    """n samples of every prompt -> per prompt the checker's verdict on each sample, the sessions, the
    wall time and the tokens."""
    tok = ByteTokenizer()
    requests = [GenerationRequest(tuple(tok.encode(p)), max_new_tokens,
                                  SamplingParams(temperature=temperature, seed=seed * 1_000_003 + i))
                for p in prompts for i in range(n)]
    completions, sessions, wall = run_requests(crsm, requests)
    flat = [check(prompts[k // n], tok.decode([t for t in c.token_ids if t != tok.eos_id]))
            for k, c in enumerate(completions)]
    verdicts = [flat[i * n:(i + 1) * n] for i in range(len(prompts))]
    return verdicts, sessions, wall, sum(len(c.token_ids) for c in completions)


def sampled_mode(mode: str, verdicts: list[list[bool]], sessions: list[Session], wall: float, tokens: int,
                 notes: dict[str, Any]) -> ModeResult:
    """(d) and (e) from samples: with an exact checker as the verifier, best-of-N takes a sample the
    checker accepts when there is one: some of the N samples is right."""
    return ModeResult(mode, [any(v) for v in verdicts], tokens, wall,
                      [s.timings().ttft_s for s in sessions if s.timings().ttft_s is not None],
                      [gap for s in sessions for gap in s.inter_token_latencies()], notes)


def deliberation_for(mode: str, family: str, base: DeliberationConfig, lead_window: int) -> DeliberationConfig | None:
    if mode == "greedy":
        return None
    config = replace(base, enabled=True, verifier=family)
    if mode == "sync":
        return replace(config, synchronous=True)
    config = replace(config, lead_window=lead_window)
    if mode == "suggestions_only":
        return replace(config, injection_rate=0.0)
    if mode == "injection_only":
        return replace(config, use_suggestions=False)
    return config


# ---- the whole evaluation --------------------------------------------------------------------------

def evaluate(cfg: TrainConfig, model_dir: Path | None = None, modes: tuple[str, ...] | None = None,
             prompts: int | None = None, out: Path | None = None,
             families: tuple[str, ...] | None = None) -> dict[str, Any]:
    model_dir = Path(model_dir or cfg.model_dir)
    modes = tuple(modes or MODES)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown eval modes {unknown}; choose from {MODES}")
    e = cfg.eval
    device = resolve_device(cfg)
    crsm = CRSMModel.from_pretrained(model_dir, device=device)
    base = crsm.config
    doc = out or Path(e.out)
    meta = {"device": device_description(device), "commit": git_commit(), "model": str(model_dir),
            "prompts": prompts or e.prompts, "max_new_tokens": e.max_new_tokens, "task": asdict(cfg.tasks),
            "lead_window": e.lead_window, "deliberation": asdict(base),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    summaries: dict[str, dict[str, Any]] = {}

    def record(family: str, results: dict[str, ModeResult]) -> None:
        # written after every mode: a run stopped part way (a time limit on a shared machine) keeps what it measured
        summaries[family] = summarize(results)
        write_markdown(doc, meta, summaries, model_dir)
        doc.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summaries}, indent=2) + "\n")

    try:
        # the engine's first graph captures and kernel compiles happen here, not inside mode (a)'s timing
        warm = heldout_prompts(cfg.tasks, 4, cfg.seed + 1, (families or cfg.tasks.families)[0])
        run_mode(crsm, "greedy", warm, e.max_new_tokens, None)
        for family in families or cfg.tasks.families:
            prompt_list = heldout_prompts(cfg.tasks, prompts or e.prompts, cfg.seed, family)
            results: dict[str, ModeResult] = {}
            for mode in modes:
                if mode in ("best_of_n", "oracle"):
                    continue
                results[mode] = run_mode(crsm, mode, prompt_list, e.max_new_tokens,
                                         deliberation_for(mode, family, base, e.lead_window))
                log.info("%s / %s: accuracy %.3f, %.0f tokens/s", family, mode, results[mode].accuracy,
                         results[mode].tokens_per_s)
                record(family, results)
            if "best_of_n" in modes:
                n, basis = e.best_of_n, "configured"
                if n == 0:
                    n, basis = equal_time_n(results), "equal GPU time as (b)"
                verdicts, sessions, wall, tokens = run_samples(crsm, prompt_list, n, e.max_new_tokens, e.temperature,
                                                               cfg.seed)
                results["best_of_n"] = sampled_mode("best_of_n", verdicts, sessions, wall, tokens,
                                                    {"n": n, "n_basis": basis, "temperature": e.temperature})
                record(family, results)
            if "oracle" in modes:
                verdicts, sessions, wall, tokens = run_samples(crsm, prompt_list, e.oracle_k, e.max_new_tokens,
                                                               e.temperature, cfg.seed + 1)
                results["oracle"] = sampled_mode("oracle", verdicts, sessions, wall, tokens,
                                                 {"k": e.oracle_k, "temperature": e.temperature})
                record(family, results)
    finally:
        crsm.close()
    return {"meta": meta, "summary": summaries}


def equal_time_n(results: dict[str, ModeResult]) -> int:
    """N for best-of-N: the GPU time (b) took, in runs of (a) (a sample costs what a greedy completion
    costs)."""
    if not {"greedy", "async"} <= set(results):
        raise ValueError("best_of_n with eval.best_of_n 0 needs the greedy and async modes")
    return max(1, round(results["async"].wall_s / max(results["greedy"].wall_s, 1e-9)))


def summarize(results: dict[str, ModeResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = results.get("greedy")
    for mode in MODES:
        if mode not in results:
            continue
        r = results[mode]
        k, n = int(sum(r.correct)), len(r.correct)
        lo, hi = wilson(k, n)
        itl_ms = [1e3 * g for g in r.itl_s]
        row = {"label": LABELS[mode], "correct": k, "prompts": n, "accuracy": round(r.accuracy, 4),
               "ci95": [round(lo, 4), round(hi, 4)], "tokens": r.tokens, "wall_s": round(r.wall_s, 3),
               "tokens_per_s": round(r.tokens_per_s, 1),
               "ttft_p50_ms": _r(percentile([1e3 * t for t in r.ttft_s], 50)),
               "itl_p50_ms": _r(percentile(itl_ms, 50)), "itl_p99_ms": _r(percentile(itl_ms, 99)),
               "notes": r.notes}
        if base is not None and mode != "greedy":
            d, dlo, dhi = paired_bootstrap(base.correct, r.correct)
            fixes, regressions, p = mcnemar(base.correct, r.correct)
            row.update(delta_vs_a=[round(d, 4), round(dlo, 4), round(dhi, 4)], fixes=fixes, regressions=regressions,
                       mcnemar_p=round(p, 5))
            if base.itl_s and r.itl_s:
                row["itl_p50_ratio"] = round(row["itl_p50_ms"] / (1e3 * float(np.percentile(base.itl_s, 50))), 3)
        out[mode] = row
    if {"greedy", "async", "oracle"} <= set(results):
        gap = results["oracle"].accuracy - results["greedy"].accuracy
        out["recovered_fraction"] = None if gap <= 0 else \
            round((results["async"].accuracy - results["greedy"].accuracy) / gap, 3)
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


BEGIN, END = "<!-- crsm eval: begin (generated) -->", "<!-- crsm eval: end -->"


def write_markdown(path: Path, meta: dict[str, Any], families: dict[str, Any], model_dir: Path) -> None:
    """Writes the generated part between the BEGIN / END markers; text around them (notes written by
    hand) is kept when the file already has the markers."""
    write_generated_section(path, render_markdown(meta, families, model_dir), BEGIN, END, heading="# Evaluation\n\n")


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def render_markdown(meta: dict[str, Any], families: dict[str, Any], model_dir: Path) -> str:
    lines = [
        "## Task accuracy with and without deliberation",
        "",
        f"Model `{meta['model']}`; device {meta['device']}; commit `{meta['commit']}`; {meta['date']}. "
        f"{meta['prompts']} held-out prompts of each family (never seen in training), at most "
        f"{meta['max_new_tokens']} new tokens, all prompts of a mode through the engine at once. Accuracy: the exact "
        "checker; interval: Wilson 95%. vs (a): paired bootstrap 95% interval (points), exact McNemar p, fixes "
        "(a wrong, this right) and regressions (a right, this wrong). Deliberation modes use the family's "
        f"verifier; (b) plans its first {meta['lead_window']} answer tokens synchronously (the lead window). "
        "Speed: tokens/s over the mode's wall time; TTFT and ITL over every session.",
    ]
    for family, summary in families.items():
        lines += ["", f"### {family}", "",
                  "| mode | accuracy | 95% CI | vs (a) [95% CI] | McNemar p | fixes / regressions | tokens/s | "
                  "TTFT p50 (ms) | ITL p50 / p99 (ms) | notes |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for mode in MODES:
            if mode not in summary:
                continue
            r = summary[mode]
            delta = "" if "delta_vs_a" not in r else "{} [{}, {}]".format(*(_pct(x) for x in r["delta_vs_a"]))
            p = "" if "mcnemar_p" not in r else f"{r['mcnemar_p']:.3g}"
            fr = "" if "fixes" not in r else f"{r['fixes']} / {r['regressions']}"
            itl = "-" if r["itl_p50_ms"] is None else f"{r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f}"
            ttft = "-" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.1f}"
            lines.append(f"| {r['label']} | {r['accuracy']:.3f} ({r['correct']}/{r['prompts']}) | "
                         f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {delta} | {p} | {fr} | {r['tokens_per_s']:.0f} | "
                         f"{ttft} | {itl} | {_notes(mode, r['notes'])} |")
        if summary.get("recovered_fraction") is not None:
            lines += ["", f"(b) recovers {summary['recovered_fraction']:.2f} of the gap between (a) and (e)."]
    lines += ["", "Deliberation settings (the model's crsm.json, with each mode's changes above):", "", "```json",
              json.dumps(meta["deliberation"], indent=1, sort_keys=True), "```"]
    report_path = model_dir / "training_report.json"
    if report_path.exists():
        lines += ["", training_sections(json.loads(report_path.read_text()))]
    return "\n".join(lines)


def _notes(mode: str, notes: dict[str, Any]) -> str:
    if mode == "best_of_n":
        return f"N = {notes['n']} ({notes['n_basis']}), temperature {notes['temperature']}"
    if mode == "oracle":
        return f"k = {notes['k']}, temperature {notes['temperature']}"
    counters = notes.get("counters") or {}
    keys = ("launched", "applied", "applied_late", "pruned", "vetoed", "diverged", "rejected", "suggested", "blended",
            "waited")
    return ", ".join(f"{k.replace('_', ' ')} {counters[k]}" for k in keys if counters.get(k))


def training_sections(report: dict[str, Any]) -> str:
    """Dynamics fidelity and the value heads' quality from the model's training report."""
    d, v = report["stages"]["dynamics"], report["stages"]["value"]
    lines = [
        "## Dynamics fidelity",
        "",
        f"Training report of `{report['config']}`, commit `{d['commit']}`, device {d['device']}. Open loop "
        f"against exact backbone steps on {d['heldout_rows']} held-out rows of the Python {d['corpus']['python']} "
        f"library after a {d['heldout_prefix_tokens']}-token prefix; mean over the {report['model']['n_layer']} layers. "
        "Persistence = the state left unchanged. The planner uses the latent dynamics only where the one-step "
        "top-1 agreement reaches 0.9.",
        "",
        "| lag | cosine | rel. error | top-1 agreement | persistence cosine | persistence rel. error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f, p in zip(d["fidelity"], d["fidelity_persistence"]):
        lines.append(f"| {f['lag']} | {f['mean_cosine']:.4f} | {f['mean_rel_error']:.4f} | {f['top1_agreement']:.3f} "
                     f"| {p['mean_cosine']:.4f} | {p['mean_rel_error']:.4f} |")
    lines += ["", "## Value heads: quality at every answer position", ""]
    if "quality_heldout" in v:
        lines += value_section(v)
    else:
        lines += ["This model's value heads were trained before stage 3 measured their sibling ranking; they are "
                  "not used by the search."]
    return "\n".join(lines)
