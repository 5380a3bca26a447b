"""Stage 3: per-layer value heads that predict task success from the recurrent state.

Targets are Monte-Carlo returns: the frozen backbone completes each training prompt `rollouts` times at
the sampling temperature, the checker marks every completion right or wrong, and that outcome is the
label of every state along the rollout (the end of the prompt and after each generated token), the states
a planner evaluates. Each head (one per layer, reading only its layer) is trained with binary
cross-entropy on its logit; v_i in the injection gate sigmoid(v_i) is that logit.

Calibration is measured on held-out prompts at the end of the prompt (before any answer token): Brier
score and ROC AUC of each head's sigmoid(v_i) and of the heads' mean, against each rollout's outcome,
next to the Brier score of always predicting the training success rate.

The veto threshold is calibrated here too: the spread (std over heads of their probabilities) at every
state of the held-out rollouts, and its VETO_PERCENTILE-th percentile is stored with the heads
(ValueHeadsConfig.veto_threshold), so that a plan is vetoed only when its heads disagree more than they
do on all but 1% of ordinary states (a constant threshold vetoed 173 of 177 served plans:
deliberation-forensics B3).
Output: `<out_dir>/value/` (value_heads.safetensors + .json) and `reports/value.json`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..state import RecurrentState
from ..tokenizer import ByteTokenizer
from ..value import ValueHeads, ValueHeadsConfig, calibrate_veto
from .common import device_description, git_commit, progress, resolve_device, round_matrices_, write_report
from .config import TrainConfig
from .rollout import Rollouts, generate, replay, successes
from .stage2_dynamics import load_frozen_backbone
from .tasks import heldout_prompts, sample_prompts

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


def run_rollouts(model, prompts: list[str], cfg: TrainConfig, seed: int) -> tuple[list[str], Rollouts, np.ndarray]:
    """Each prompt `rollouts` times at the sampling temperature -> (prompt per rollout, rollouts, outcomes).
    Rows are generated `rollout_chunk` at a time (each row holds a full recurrent state)."""
    tok = ByteTokenizer()
    v = cfg.value
    repeated = [p for p in prompts for _ in range(v.rollouts)]
    completions: list[list[int]] = []
    ended: list[bool] = []
    for i in range(0, len(repeated), v.rollout_chunk):
        part = generate(model, [tok.encode(p) for p in repeated[i:i + v.rollout_chunk]], v.max_new_tokens,
                        v.temperature, tok.eos_id, seed=seed + i, max_sessions=min(256, v.rollout_chunk))
        completions += part.completions
        ended += part.ended
    out = Rollouts(completions, ended)
    return repeated, out, np.asarray(successes(repeated, out, tok.decode), dtype=np.float64)


@torch.no_grad()
def prompt_end_values(model, heads: ValueHeads, prompts: list[str]) -> np.ndarray:
    """[len(prompts), L] head logits at the state right after each prompt."""
    tok = ByteTokenizer()
    ids = [tok.encode(p) for p in prompts]
    values = torch.zeros(len(ids), heads.config.n_layer)

    def record(state: RecurrentState, rows: torch.Tensor) -> None:
        values[rows.cpu()] = heads(state.gather(rows)).float().cpu()

    replay(model, ids, [[] for _ in ids], record, tok.pad_id)
    return values.numpy()


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


def calibration(logits: np.ndarray, outcomes: np.ndarray, base_rate: float) -> dict[str, Any]:
    """logits: [N, L] per-head logits; outcomes: [N] 0/1."""
    probs = 1 / (1 + np.exp(-logits))
    mean_prob = 1 / (1 + np.exp(-logits.mean(axis=1)))
    return {
        "samples": int(len(outcomes)),
        "success_rate": round(float(outcomes.mean()), 4),
        "brier_mean_head": round(brier(mean_prob, outcomes), 5),
        "auc_mean_head": _round(roc_auc(mean_prob, outcomes)),
        "brier_per_layer": [round(brier(probs[:, l], outcomes), 5) for l in range(probs.shape[1])],
        "auc_per_layer": [_round(roc_auc(probs[:, l], outcomes)) for l in range(probs.shape[1])],
        "brier_base_rate": round(brier(np.full(len(outcomes), base_rate), outcomes), 5),
        "mean_head_spread": round(float(logits.std(axis=1).mean()), 4),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def train_value(cfg: TrainConfig) -> dict[str, Any]:
    v = cfg.value
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    model = load_frozen_backbone(cfg, device)
    tok = ByteTokenizer()
    heads_config = ValueHeadsConfig.for_model(model.config, **v.model)
    heads = ValueHeads(heads_config).to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=v.lr, weight_decay=v.weight_decay)

    start = time.perf_counter()
    train_prompts = sample_prompts(np.random.default_rng([cfg.seed, 3]), cfg.tasks, v.train_prompts, heldout=False)
    held_prompts = heldout_prompts(cfg.tasks, v.heldout_prompts, cfg.seed + 1)
    rollout_prompts, rollouts, outcomes = run_rollouts(model, train_prompts, cfg, cfg.seed + 3)
    held_rollout_prompts, held_rollouts, held_outcomes = run_rollouts(model, held_prompts, cfg, cfg.seed + 4)
    rollout_s = time.perf_counter() - start
    base_rate = float(outcomes.mean())
    log.info("rollouts: train success rate %.3f over %d, held-out %.3f over %d (%.1f s)", base_rate,
             len(outcomes), held_outcomes.mean(), len(held_outcomes), rollout_s)
    # Start every head at the base rate, so an uninformative state predicts it.
    with torch.no_grad():
        heads.b2.fill_(float(np.log((base_rate + 1e-3) / (1 - base_rate + 1e-3))))

    initial = calibration(prompt_end_values(model, heads, held_prompts).repeat(v.rollouts, axis=0), held_outcomes,
                          base_rate)
    prompt_ids = [tok.encode(p) for p in rollout_prompts]
    n = len(prompt_ids)
    rng = np.random.default_rng([cfg.seed, 33])
    batches = [(e, b) for e in range(v.epochs) for b in range(0, n, v.batch_rollouts)]
    bar = progress(len(batches), 0, "value")
    losses: list[float] = []
    order = rng.permutation(n)
    for epoch, b in batches:
        if b == 0:
            order = rng.permutation(n)
        rows = order[b:b + v.batch_rollouts]
        labels_all = torch.as_tensor(outcomes[rows], dtype=torch.float32, device=device)
        terms: list[torch.Tensor] = []

        def add_loss(state: RecurrentState, which: torch.Tensor) -> None:
            logits = heads(state.gather(which))                                  # [R, L]
            target = labels_all[which][:, None].expand_as(logits)
            terms.append(F.binary_cross_entropy_with_logits(logits, target, reduction="sum"))

        replay(model, [prompt_ids[i] for i in rows], [rollouts.completions[i] for i in rows], add_loss, tok.pad_id)
        count = sum(len(rollouts.completions[i]) + 1 for i in rows) * heads_config.n_layer
        loss = torch.stack(terms).sum() / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(epoch=epoch, bce=f"{losses[-1]:.4f}", refresh=False)
    bar.close()

    round_matrices_(heads, cfg.assemble.dtype)
    held_logits = prompt_end_values(model, heads, held_prompts)
    final = calibration(held_logits.repeat(v.rollouts, axis=0),
                        held_outcomes, base_rate)
    train_logits = prompt_end_values(model, heads, train_prompts)
    train_fit = calibration(train_logits.repeat(v.rollouts, axis=0),
                            outcomes, base_rate)
    veto = veto_calibration(model, heads, held_rollout_prompts, held_rollouts.completions)
    heads.config = dataclasses.replace(heads.config, veto_threshold=veto["threshold"], veto_percentile=VETO_PERCENTILE)
    heads.save(value_dir(cfg))
    report = {
        "device": device_description(device),
        "commit": git_commit(),
        "train_prompts": v.train_prompts,
        "heldout_prompts": v.heldout_prompts,
        "rollouts_per_prompt": v.rollouts,
        "temperature": v.temperature,
        "max_new_tokens": v.max_new_tokens,
        "train_success_rate": round(base_rate, 4),
        "rollout_time_s": round(rollout_s, 1),
        "train_time_s": round(time.perf_counter() - start, 1),
        "optimizer_steps": len(batches),
        "first_bce": round(losses[0], 5),
        "final_bce": round(float(np.mean(losses[-max(1, len(losses) // 10):])), 5),
        "parameters": sum(p.numel() for p in heads.parameters()),
        "config": heads.config.to_dict(),
        "calibration_heldout": final,
        "calibration_heldout_untrained": initial,
        "calibration_train": train_fit,
        "veto": veto,
    }
    write_report(cfg.out_path, STAGE, report)
    log.info("stage 3 done: held-out Brier %.4f (base rate %.4f), AUC %s", final["brier_mean_head"],
             final["brier_base_rate"], final["auc_mean_head"])
    return report

