"""Stage 3: per-layer value heads trained where the search uses them, and the veto calibrated.

The planner evaluates child states: the state after an answer prefix and one candidate token. So the
heads are trained on exactly those, with Monte-Carlo returns of exactly those (deliberation-forensics
B2: heads trained on every state of a rollout labelled with that rollout's outcome learned prompt
difficulty, not which digit is right):

1. `rollouts` sampled completions of each training prompt (the frozen backbone, through the engine);
2. at every answer position j of each (the end of the prompt, then after each answer token), the
   model's top `branch_top_k` candidate tokens a, each completed `branch_rollouts` times from
   prefix + [a] (end-of-text: no completion, the answer as it stands is checked): the candidate's
   return is the share of those completions the checker accepts;
3. each head (one per layer, reading only its layer's state of prefix + [a]) fits the returns with
   binary cross-entropy; the terminal candidates (a = end-of-text) make it an outcome head too.

Quality, on held-out prompts branched the same way: per answer position, the sibling-ranking AUC (the
chance that, of two candidates at one branch point whose returns differ, the better is ranked higher)
of the heads' mean probability against the LM prior's. The heads are used by the search only where they
beat the prior (`ValueHeadsConfig.beats_prior`; otherwise a plan without a verifier values every node
the same, and the search keeps the model's own choice).

The veto threshold: the 99th percentile of the heads' spread over held-out rollout states (stored with
the heads as `veto_threshold`): a plan is vetoed only when its heads disagree more than they do on all
but 1% of ordinary states.
Output: `<out_dir>/value/` (value_heads.safetensors + .json) and `reports/value.json`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..state import RecurrentState
from ..tasks import check, heldout_prompts, sample_prompts
from ..tokenizer import ByteTokenizer
from ..value import ValueHeads, ValueHeadsConfig, calibrate_veto
from .common import device_description, git_commit, progress, resolve_device, round_matrices_, write_report
from .config import TrainConfig
from .rollout import generate, replay
from .stage2_dynamics import load_frozen_backbone

log = logging.getLogger(__name__)

STAGE = "value"
VETO_PERCENTILE = 99.0


def value_dir(cfg: TrainConfig) -> Path:
    return cfg.out_path / STAGE


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None when one class is absent."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((probs - labels.astype(np.float64)) ** 2))


# ---- branch points and their returns ---------------------------------------------------------------

@dataclasses.dataclass
class Branches:
    """Candidate continuations at the answer positions of rollouts, with their Monte-Carlo returns."""
    sequences: list[list[int]]   # prompt + answer prefix + candidate token
    returns: np.ndarray          # [N] share of accepted completions from there
    prior: np.ndarray            # [N] the model's probability of the candidate at its branch point
    position: np.ndarray         # [N] j: answer tokens before the candidate
    group: np.ndarray            # [N] the branch point's id (siblings share it)
    terminal: np.ndarray         # [N] bool: the candidate is end-of-text


@torch.no_grad()
def candidates(model, prompts: list[list[int]], completions: list[list[int]], k: int) -> list[list[tuple]]:
    """Teacher-forced: at each answer position j of each row (0 .. len(completion)), the model's top-k
    tokens and probabilities there: out[row][j] = (tokens, probs)."""
    device = model.device
    seqs = [p + c for p, c in zip(prompts, completions)]
    out: list[list[tuple]] = [[] for _ in seqs]
    state = model.allocate_state(len(seqs))
    for t in range(max(len(s) for s in seqs)):
        inputs = torch.tensor([s[t] if t < len(s) else 0 for s in seqs], device=device)
        probs = torch.softmax(model.step(inputs, state).float(), dim=-1)
        top = probs.topk(k, dim=-1)
        tokens, values = top.indices.tolist(), top.values.tolist()
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            if len(p) <= t + 1 <= len(s):
                out[i].append((tokens[i], values[i]))
    return out


def branches(model, prompts: list[str], cfg: TrainConfig, seed: int) -> tuple[Branches, list[str], list[list[int]]]:
    """Rollouts of `prompts`, their branch points and candidates' returns (see the module docstring).
    Also returns the rollouts (prompt per rollout, completion ids) for the veto calibration."""
    tok, v = ByteTokenizer(), cfg.value
    repeated = [p for p in prompts for _ in range(v.rollouts)]
    ids = [tok.encode(p) for p in repeated]
    sampled = generate(model, ids, v.max_new_tokens, v.temperature, tok.eos_id, seed=seed,
                       max_sessions=v.rollout_sessions)
    tops = candidates(model, ids, sampled.completions, v.branch_top_k)
    sequences, prior, position, group, terminal, owner, prefix_of = [], [], [], [], [], [], []
    groups = 0
    for i, (prompt, completion) in enumerate(zip(repeated, sampled.completions)):
        for j, (tokens, probs) in enumerate(tops[i][:v.max_new_tokens]):
            for a, p in zip(tokens, probs):
                sequences.append(ids[i] + completion[:j] + [a])
                prior.append(p), position.append(j), group.append(groups), terminal.append(a == tok.eos_id)
                owner.append(prompt), prefix_of.append(completion[:j] + [a])
            groups += 1
    # Returns: the terminal candidates are checked as they stand; the others completed branch_rollouts
    # times (identical sequences are completed once).
    returns = np.zeros(len(sequences))
    first_of: dict[tuple[int, ...], int] = {}
    for n, (seq, prompt, answer, end) in enumerate(zip(sequences, owner, prefix_of, terminal)):
        if end:
            returns[n] = float(check(prompt, tok.decode(answer[:-1])))
        else:
            first_of.setdefault(tuple(seq), n)
    todo = list(first_of.values())
    rows = [n for n in todo for _ in range(v.branch_rollouts)]
    out = generate(model, [sequences[n] for n in rows], [max(1, v.max_new_tokens - len(prefix_of[n])) for n in rows],
                   v.branch_temperature, tok.eos_id, seed=seed + 7, max_sessions=v.rollout_sessions)
    completions: dict[int, list[list[int]]] = defaultdict(list)
    for n, c in zip(rows, out.completions):
        completions[n].append(c)
    value_of = {tuple(sequences[n]): float(np.mean([check(owner[n], tok.decode(prefix_of[n] + c))
                                                     for c in completions[n]])) for n in todo}
    for n, seq in enumerate(sequences):
        if not terminal[n]:
            returns[n] = value_of[tuple(seq)]
    return (Branches(sequences, returns, np.asarray(prior), np.asarray(position), np.asarray(group),
                     np.asarray(terminal)), repeated, sampled.completions)


@torch.no_grad()
def head_probabilities(model, heads: ValueHeads, sequences: list[list[int]], batch: int) -> np.ndarray:
    """[N, L] the heads' probabilities at the state after each sequence."""
    out = np.zeros((len(sequences), heads.config.n_layer))
    for start in range(0, len(sequences), batch):
        part = sequences[start:start + batch]

        def record(state: RecurrentState, rows: torch.Tensor) -> None:
            out[start + rows.cpu().numpy()] = torch.sigmoid(heads(state.gather(rows)).float()).cpu().numpy()

        replay(model, part, [[] for _ in part], record, ByteTokenizer.pad_id)
    return out


def sibling_auc(scores: np.ndarray, b: Branches, mask: np.ndarray | None = None) -> float | None:
    """The chance that of two siblings whose returns differ, the one with the higher return scores
    higher (ties half), over the branch points selected by `mask`."""
    right = total = 0.0
    order = np.argsort(b.group, kind="stable")
    keep = np.ones(len(b.group), bool) if mask is None else mask
    for g in np.unique(b.group[keep]):
        members = order[np.searchsorted(b.group[order], g, "left"):np.searchsorted(b.group[order], g, "right")]
        r, s = b.returns[members], scores[members]
        better = r[:, None] > r[None, :]
        total += better.sum()
        right += (better & (s[:, None] > s[None, :])).sum() + 0.5 * (better & (s[:, None] == s[None, :])).sum()
    return None if total == 0 else float(right / total)


def quality(probs: np.ndarray, b: Branches, max_positions: int) -> dict[str, Any]:
    """Per answer position and overall: sibling-ranking AUC of the heads' mean against the prior's, and
    the outcome head's Brier score at the terminal candidates."""
    mean = probs.mean(axis=1)
    per_position = []
    for j in range(max_positions):
        at = b.position == j
        if not at.any():
            continue
        per_position.append({"position": j, "candidates": int(at.sum()),
                             "heads_auc": _round(sibling_auc(mean, b, at)), "prior_auc": _round(sibling_auc(b.prior, b, at))})
    term = b.terminal
    return {"candidates": len(b.sequences), "branch_points": int(len(np.unique(b.group))),
            "mean_return": round(float(b.returns.mean()), 4),
            "heads_auc": _round(sibling_auc(mean, b)), "prior_auc": _round(sibling_auc(b.prior, b)),
            "per_position": per_position,
            "terminal_candidates": int(term.sum()),
            "terminal_brier": None if not term.any() else round(brier(mean[term], b.returns[term] > 0.5), 5),
            "terminal_brier_base_rate": None if not term.any() else
            round(brier(np.full(int(term.sum()), float((b.returns[term] > 0.5).mean())), b.returns[term] > 0.5), 5)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@torch.no_grad()
def rollout_probabilities(model, heads: ValueHeads, prompts: list[str], completions: list[list[int]]) -> torch.Tensor:
    """[N, L] the heads' probabilities at every state of the rollouts (end of prompt and after each token)."""
    tok = ByteTokenizer()
    found: list[torch.Tensor] = []

    def record(state: RecurrentState, rows: torch.Tensor) -> None:
        found.append(torch.sigmoid(heads(state.gather(rows)).float()).cpu())

    replay(model, [tok.encode(p) for p in prompts], completions, record, tok.pad_id)
    return torch.cat(found)


def veto_calibration(model, heads: ValueHeads, prompts: list[str], completions: list[list[int]],
                     percentile: float = VETO_PERCENTILE) -> dict[str, Any]:
    """The spread distribution of the heads over held-out rollout states and the veto threshold from it."""
    probs = rollout_probabilities(model, heads, prompts, completions)
    spreads = probs.std(dim=1, correction=0)
    return {"states": int(probs.shape[0]), "percentile": percentile,
            "threshold": round(calibrate_veto(probs, percentile), 5),
            "spread_p50": round(float(spreads.quantile(0.5)), 5), "spread_p90": round(float(spreads.quantile(0.9)), 5),
            "spread_max": round(float(spreads.max()), 5)}


def train_value(cfg: TrainConfig) -> dict[str, Any]:
    v = cfg.value
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    model = load_frozen_backbone(cfg, device)
    heads = ValueHeads(ValueHeadsConfig.for_model(model.config, **v.model)).to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=v.lr, weight_decay=v.weight_decay)

    start = time.perf_counter()
    train_prompts = sample_prompts(np.random.default_rng([cfg.seed, 3]), cfg.tasks, v.train_prompts, heldout=False)
    held_prompts = [p for f in cfg.tasks.families
                    for p in heldout_prompts(cfg.tasks, max(1, v.heldout_prompts // len(cfg.tasks.families)),
                                             cfg.seed + 1, f)]
    train, _, _ = branches(model, train_prompts, cfg, cfg.seed + 3)
    held, held_rollout_prompts, held_completions = branches(model, held_prompts, cfg, cfg.seed + 4)
    rollout_s = time.perf_counter() - start
    base_rate = float(train.returns.mean())
    log.info("branches: %d train candidates (mean return %.3f), %d held-out (%.1f s)", len(train.sequences),
             base_rate, len(held.sequences), rollout_s)
    with torch.no_grad():   # every head starts at the base rate: an uninformative state predicts it
        heads.b2.fill_(float(np.log((base_rate + 1e-3) / (1 - base_rate + 1e-3))))
    initial = quality(head_probabilities(model, heads, held.sequences, v.batch_rollouts), held, v.max_new_tokens)

    n = len(train.sequences)
    rng = np.random.default_rng([cfg.seed, 33])
    batches = [(e, b) for e in range(v.epochs) for b in range(0, n, v.batch_rollouts)]
    bar = progress(len(batches), 0, "value")
    losses: list[float] = []
    order = rng.permutation(n)
    targets = torch.as_tensor(train.returns, dtype=torch.float32, device=device)
    for epoch, b in batches:
        if b == 0:
            order = rng.permutation(n)
        rows = order[b:b + v.batch_rollouts]
        terms: list[torch.Tensor] = []

        def add_loss(state: RecurrentState, which: torch.Tensor) -> None:
            logits = heads(state.gather(which))                                       # [R, L]
            label = targets[torch.as_tensor(rows, device=device)[which]][:, None].expand_as(logits)
            terms.append(F.binary_cross_entropy_with_logits(logits, label, reduction="sum"))

        replay(model, [train.sequences[i] for i in rows], [[] for _ in rows], add_loss, ByteTokenizer.pad_id)
        loss = torch.stack(terms).sum() / (len(rows) * heads.config.n_layer)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(epoch=epoch, bce=f"{losses[-1]:.4f}", refresh=False)
    bar.close()

    round_matrices_(heads, cfg.assemble.dtype)
    final = quality(head_probabilities(model, heads, held.sequences, v.batch_rollouts), held, v.max_new_tokens)
    beats_prior = final["heads_auc"] is not None and final["prior_auc"] is not None and \
        final["heads_auc"] > final["prior_auc"]
    veto = veto_calibration(model, heads, held_rollout_prompts, held_completions)
    heads.config = dataclasses.replace(heads.config, veto_threshold=veto["threshold"], veto_percentile=VETO_PERCENTILE,
                                       beats_prior=beats_prior)
    heads.save(value_dir(cfg))
    report = {
        "device": device_description(device),
        "commit": git_commit(),
        "train_prompts": v.train_prompts,
        "heldout_prompts": len(held_prompts),
        "families": list(cfg.tasks.families),
        "rollouts_per_prompt": v.rollouts,
        "branch_top_k": v.branch_top_k,
        "branch_rollouts": v.branch_rollouts,
        "temperature": v.temperature,
        "max_new_tokens": v.max_new_tokens,
        "train_candidates": n,
        "train_mean_return": round(base_rate, 4),
        "rollout_time_s": round(rollout_s, 1),
        "train_time_s": round(time.perf_counter() - start, 1),
        "optimizer_steps": len(batches),
        "first_bce": round(losses[0], 5),
        "final_bce": round(float(np.mean(losses[-max(1, len(losses) // 10):])), 5),
        "parameters": sum(p.numel() for p in heads.parameters()),
        "config": heads.config.to_dict(),
        "quality_heldout": final,
        "quality_heldout_untrained": initial,
        "heads_beat_the_prior": beats_prior,
        "veto": veto,
    }
    write_report(cfg.out_path, STAGE, report)
    log.info("stage 3 done: held-out sibling AUC heads %s vs prior %s (%s); veto threshold %.4f", final["heads_auc"],
             final["prior_auc"], "heads used" if beats_prior else "heads not used", veto["threshold"])
    return report


def value_section(v: dict[str, Any]) -> list[str]:
    """The value heads' part of TRAINING_REPORT.md and docs/evaluation.md, from the stage's report."""
    q, veto = v["quality_heldout"], v["veto"]
    used = "**used** by the search (they rank candidates better than the prior)" if v["heads_beat_the_prior"] \
        else "**not used** by the search: they rank candidates no better than the model's own prior, so a plan " \
             "without a verifier values every node the same and keeps the model's choice"
    lines = [
        f"Device {v['device']}, commit `{v['commit']}`; families {', '.join(v['families'])}; {v['train_prompts']} train "
        f"prompts x {v['rollouts_per_prompt']} rollouts (temperature {v['temperature']}); at every answer position the "
        f"top {v['branch_top_k']} candidate tokens, each completed {v['branch_rollouts']} times: "
        f"{v['train_candidates']:,} training candidates (mean return {v['train_mean_return']:.3f}). Held out: "
        f"{v['heldout_prompts']} prompts, {q['candidates']:,} candidates at {q['branch_points']:,} branch points.",
        "",
        "Sibling-ranking AUC: of two candidates at one branch point whose Monte-Carlo returns differ, the chance "
        "that the better one scores higher (the heads' mean probability; the LM prior's probability).",
        "",
        "| answer position | candidates | heads AUC | prior AUC |",
        "| --- | --- | --- | --- |",
    ]
    for p in q["per_position"]:
        lines.append(f"| {p['position']} | {p['candidates']} | {_fmt(p['heads_auc'])} | {_fmt(p['prior_auc'])} |")
    lines += [f"| all | {q['candidates']} | {_fmt(q['heads_auc'])} | {_fmt(q['prior_auc'])} |", "",
              f"Outcome head (end-of-text candidates, {q['terminal_candidates']}): Brier {_fmt(q['terminal_brier'])} "
              f"against {_fmt(q['terminal_brier_base_rate'])} for the base rate. The heads are {used}.", "",
              f"Veto threshold: the {veto['percentile']:g}th percentile of the heads' spread over {veto['states']:,} "
              f"held-out rollout states, {veto['threshold']:.4f} (median spread {veto['spread_p50']:.4f})."]
    return lines


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
