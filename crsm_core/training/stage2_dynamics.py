"""Stage 2: distil the latent dynamics model (S_t, token) -> S_{t+1} from the frozen backbone.

Training states come from the backbone itself: rows of training text (and task documents) are prefilled
for a random prefix, then stepped exactly, token by token. At each step the dynamics model starts from
the exact state and runs open loop (on its own predicted states) through the next `horizon` tokens,
compared with exact backbone steps after each one: the way the planner uses it, so errors that compound
over several steps are trained against, not only the one-step error. Fidelity is then
measured open loop on held-out text at the configured lags (per-layer cosine and relative error of the
ssm state against exact steps), next to two references: the untrained model and "persistence" (the
state left unchanged), which says how much of the cosine the state's slow decay gives for free.
Output: `<out_dir>/dynamics/` (dynamics.safetensors + dynamics.json) and `reports/dynamics.json`.
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

from ..backbone import MambaLM
from ..checkpoint import load_pretrained
from ..dynamics import DynamicsConfig, LatentDynamics, backbone_step_cost, fidelity
from ..state import StepFn
from ..state import RecurrentState
from .common import (StepBudget, cosine_lr, device_description, git_commit, load_training_state, progress,
                     resolve_device, rng_state, round_matrices_, save_training_state, set_rng_state, write_report)
from .config import TrainConfig
from .data import BatchSampler, heldout_text_windows, load_corpus
from .stage1_backbone import exported_backbone

log = logging.getLogger(__name__)

STAGE = "dynamics"


def dynamics_dir(cfg: TrainConfig) -> Path:
    return cfg.out_path / STAGE


class Persistence:
    """Reference stepper: predicts that the state does not change (uniform logits)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        return torch.zeros(tokens.shape[0], self.vocab_size, device=tokens.device)


def load_frozen_backbone(cfg: TrainConfig, device: torch.device) -> MambaLM:
    """Stage 1's model in fp32 (the states the planner sees are compared in full precision)."""
    model = load_pretrained(exported_backbone(cfg), device=device, dtype=torch.float32, impl="reference")
    model.requires_grad_(False)
    return model.eval()


def open_loop_loss(dynamics: LatentDynamics, backbone: MambaLM, state: RecurrentState,
                   tokens: torch.Tensor) -> torch.Tensor:
    """From the exact state (K rows, not modified) through tokens [K, h], the dynamics feeding on its own
    predictions: mean over the h steps of the per-layer relative squared error of the ssm state plus
    KL(exact next-token distribution || predicted). With h = 1 this is one-step distillation."""
    exact = state.clone()
    conv, ssm = state.conv, state.ssm
    total = torch.zeros((), device=state.ssm.device)
    for j in range(tokens.shape[1]):
        with torch.no_grad():
            exact_logits = backbone.step(tokens[:, j], exact)
        logits, conv, ssm = dynamics(tokens[:, j], conv, ssm)
        e = exact.ssm.float().flatten(2).clone()                              # [L, K, X]
        p = ssm.float().flatten(2)
        state_loss = ((p - e).pow(2).sum(2) / e.pow(2).sum(2).clamp_min(1e-12)).mean()
        kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(exact_logits.float(), -1),
                      log_target=True, reduction="batchmean")
        total = total + state_loss + kl
    return total / tokens.shape[1]


@torch.no_grad()
def measure_fidelity(backbone: MambaLM, step: StepFn, windows: torch.Tensor, prefix: int,
                     lags: tuple[int, ...]) -> list[dict[str, Any]]:
    """windows: [R, prefix + max(lags)] held-out ids. Prefill the prefix exactly, then compare."""
    ids = windows.to(backbone.device)
    state = backbone.allocate_state(ids.shape[0])
    if prefix:
        backbone.prefill(ids[:, :prefix], state)
    reports = fidelity(backbone, step, state, ids[:, prefix:prefix + max(lags)], lags)
    return [{"lag": r.lag, "cosine": [round(c, 5) for c in r.cosine], "rel_error": [round(e, 5) for e in r.rel_error],
             "mean_cosine": round(float(np.mean(r.cosine)), 5), "mean_rel_error": round(float(np.mean(r.rel_error)), 5),
             "top1_agreement": round(r.top1_agreement, 4)} for r in reports]


def _time_step(step: StepFn, backbone: MambaLM, rows: int, repeats: int = 20) -> float:
    """Seconds per batched step of `rows` rows (after a warm-up)."""
    state = backbone.allocate_state(rows)
    tokens = torch.zeros(rows, dtype=torch.long, device=backbone.device)
    for _ in range(3):
        step(tokens, state)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step(tokens, state)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def train_dynamics(cfg: TrainConfig, stop_after: int | None = None) -> dict[str, Any]:
    t = cfg.dynamics
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    backbone = load_frozen_backbone(cfg, device)
    dyn_config = DynamicsConfig.for_model(backbone.config, **t.model)
    dynamics = LatentDynamics(dyn_config, backbone).to(device)
    optimizer = torch.optim.AdamW(dynamics.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    ckpt_path = dynamics_dir(cfg) / "train_state.pt"

    corpus = load_corpus(cfg.data)
    row_len = t.max_prefix + t.unroll + t.horizon
    sampler = BatchSampler(corpus, cfg.tasks, dataclasses.replace(cfg.data, seq_len=row_len), t.rows, cfg.seed + 2)
    fid_prefix = t.max_prefix
    windows = heldout_text_windows(corpus, t.fidelity_rows, fid_prefix + max(t.lags))

    saved = load_training_state(ckpt_path)
    if saved is not None:
        dynamics.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        step, total, history = saved["step"], saved["total_steps"], saved["history"]
        log.info("resuming %s from step %d of %d", ckpt_path, step, total)
    else:
        step, total = 0, t.steps
        history = {"loss": [], "elapsed_s": 0.0,
                   "initial": measure_fidelity(backbone, dynamics.step, windows, fid_prefix, t.lags),
                   "persistence": measure_fidelity(backbone, Persistence(backbone.config.vocab_size).step, windows,
                                                   fid_prefix, t.lags)}

    def checkpoint() -> None:
        save_training_state(ckpt_path, {"model": dynamics.state_dict(), "optimizer": optimizer.state_dict(),
                                        "step": step, "total_steps": total, "rng": rng_state(),
                                        "history": history})

    bar = progress(total, step, "dynamics")
    budget = StepBudget(t.time_budget_s, total, step)
    started_at = step
    dynamics.train()
    state: RecurrentState | None = None
    ids: torch.Tensor | None = None
    prefix = 0
    while step < total:
        j = step % t.unroll
        if j == 0:
            # checkpoints fall on draw boundaries, so a resumed run redraws exactly these rows
            if stop_after is not None and step - started_at >= stop_after:
                break
            draw = step // t.unroll
            ids = sampler.batch(draw).to(device)
            prefix = int(np.random.default_rng([cfg.seed, draw]).integers(0, t.max_prefix + 1))
            state = backbone.allocate_state(t.rows)
            if prefix:
                with torch.no_grad():
                    backbone.prefill(ids[:, :prefix], state)
        elif state is None:  # resumed mid-draw cannot happen: checkpoints are at draw boundaries
            raise RuntimeError("dynamics training state lost its rows")
        tick = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total, t.lr, min(100, total // 10), 0.1)
        tokens = ids[:, prefix + j]
        loss = open_loop_loss(dynamics, backbone, state, ids[:, prefix + j:prefix + j + t.horizon])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dynamics.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            backbone.step(tokens, state)
        loss_value = loss.item()
        step += 1
        history["elapsed_s"] += time.perf_counter() - tick
        history["loss"].append((step, round(loss_value, 5)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        total = budget.after_step(step)
        bar.total = total
        if step % t.unroll == 0 and (step % t.checkpoint_every < t.unroll or step >= total):
            checkpoint()
    bar.close()
    if step < total:
        checkpoint()
        return {}
    checkpoint()

    dynamics.eval()
    round_matrices_(dynamics, cfg.assemble.dtype)
    out = dynamics_dir(cfg)
    dynamics.save(out)
    final = measure_fidelity(backbone, dynamics.step, windows, fid_prefix, t.lags)
    rows = 16
    backbone_s, dynamics_s = _time_step(backbone.step, backbone, rows), _time_step(dynamics.step, backbone, rows)
    report = {
        "device": device_description(device),
        "commit": git_commit(),
        "steps": step,
        "rows": t.rows,
        "horizon": t.horizon,
        "train_time_s": round(history["elapsed_s"], 1),
        "first_loss": history["loss"][0][1],
        "final_loss": round(float(np.mean([l for _, l in history["loss"][-max(1, len(history["loss"]) // 20):]])), 5),
        "parameters": sum(p.numel() for p in dynamics.parameters()),
        "config": dyn_config.to_dict(),
        "corpus": corpus.describe(),
        "heldout_prefix_tokens": fid_prefix,
        "heldout_rows": t.fidelity_rows,
        "fidelity": final,
        "fidelity_untrained": history["initial"],
        "fidelity_persistence": history["persistence"],
        "flops_ratio": round(dynamics.step_cost().total / backbone_step_cost(backbone.config).total, 4),
        "time_ratio": round(dynamics_s / backbone_s, 4),
        "time_ratio_rows": rows,
    }
    write_report(cfg.out_path, STAGE, report)
    log.info("stage 2 done: " + ", ".join(f"lag {f['lag']}: cos {f['mean_cosine']:.4f} rel {f['mean_rel_error']:.4f}"
                                          for f in final))
    return report
