"""Stage 1: causal language-model training of the Mamba-2 backbone.

AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay, gradient clipping,
bf16 autocast on CUDA (fp32 master weights) and plain fp32 on the CPU. The training state (model,
optimiser, step, planned total steps, RNG, history) is checkpointed atomically; rerunning the same
command resumes from it. Output: `<out_dir>/backbone/model` (config.json, model.safetensors, tokenizer)
and `<out_dir>/reports/backbone.json`.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbone import MambaLM
from ..checkpoint import save_pretrained
from ..tokenizer import ByteTokenizer
from .common import (REPORTS, StepBudget, autocast, cast_matrices, cosine_lr, device_description, eval_mode,
                     git_commit, load_training_state, progress, read_report, resolve_device, rng_state,
                     round_matrices_, save_training_state, set_rng_state, write_report)
from .config import TrainConfig
from .data import BatchSampler, heldout_task_rows, heldout_text_windows, load_corpus
from .rollout import generate, successes
from ..tasks import heldout_prompts

log = logging.getLogger(__name__)

STAGE = "backbone"


def backbone_dir(cfg: TrainConfig) -> Path:
    return cfg.out_path / STAGE


def exported_backbone(cfg: TrainConfig) -> Path:
    return backbone_dir(cfg) / "model"


def build_optimizer(model: MambaLM, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    t = cfg.backbone
    # Matrices (projections, embedding, conv filters) decay; norms, A_log, dt_bias and D do not.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=fused)


def lm_loss(model: MambaLM, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """ids: [B, T+1] -> mean next-token cross-entropy (nats) over the B*T targets."""
    with autocast(device):
        logits = model(ids[:, :-1])                                   # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def evaluate_loss(model: MambaLM, rows: torch.Tensor, device: torch.device, batch: int) -> float:
    """Mean next-token loss (nats) over fixed rows [N, T+1]."""
    with eval_mode(model):
        total = 0.0
        for i in range(0, rows.shape[0], batch):
            chunk = rows[i:i + batch].to(device)
            total += lm_loss(model, chunk, device).item() * chunk.shape[0]
    return total / rows.shape[0]


@torch.no_grad()
def greedy_task_accuracy(model: MambaLM, prompts: list[str], max_new_tokens: int) -> float:
    tok = ByteTokenizer()
    with eval_mode(model):
        out = generate(model, [tok.encode(p) for p in prompts], max_new_tokens, 0.0, tok.eos_id)
    return float(np.mean(successes(prompts, out, tok.decode)))


def train_backbone(cfg: TrainConfig, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) stage 1. stop_after: return after this many steps in this call, checkpointed
    (the run resumes from there next time). Returns the stage report (empty when stopped early)."""
    t = cfg.backbone
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    model = MambaLM(cfg.model).to(device)           # fp32 master weights; autocast handles bf16
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    ckpt_path = backbone_dir(cfg) / "train_state.pt"
    corpus = load_corpus(cfg.data)
    sampler = BatchSampler(corpus, cfg.tasks, cfg.data, t.batch_size, cfg.seed)
    text_rows = heldout_text_windows(corpus, t.eval_windows, cfg.data.seq_len + 1)
    task_rows = heldout_task_rows(cfg.tasks, max(1, t.eval_windows // 4), cfg.data.seq_len + 1, cfg.seed)

    saved = load_training_state(ckpt_path)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        step, total_steps, history = saved["step"], saved["total_steps"], saved["history"]
        log.info("resuming %s from step %d of %d", ckpt_path, step, total_steps)
    else:
        step, total_steps = 0, t.steps
        history = {"train": [], "heldout": [], "elapsed_s": 0.0, "tokens": 0}
        history["heldout"].append(_heldout_point(model, 0, text_rows, task_rows, device, t.batch_size))
    if step >= total_steps and (cfg.out_path / REPORTS / f"{STAGE}.json").exists():
        log.info("stage 1 already complete (%d steps)", step)
        return read_report(cfg.out_path, STAGE)
    n_params = model.num_parameters()
    log.info("backbone %.2fM parameters on %s, %d steps of %d x %d tokens", n_params / 1e6, device,
             total_steps, t.batch_size, cfg.data.seq_len)

    def checkpoint() -> None:
        save_training_state(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "step": step, "total_steps": total_steps, "rng": rng_state(),
                                        "history": history, "config_name": cfg.name})

    tokens_per_step = t.batch_size * cfg.data.seq_len
    bar = progress(total_steps, step, "backbone")
    started_at = step
    budget = StepBudget(t.time_budget_s, total_steps, step)
    ema_tps = 0.0
    model.train()
    while step < total_steps:
        if stop_after is not None and step - started_at >= stop_after:
            break
        lr = cosine_lr(step, total_steps, t.lr, t.warmup_steps, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tick = time.perf_counter()
        ids = sampler.batch(step).to(device, non_blocking=True)
        loss = lm_loss(model, ids, device)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # syncs, so the step time below is real
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        step += 1
        dt = time.perf_counter() - tick
        history["elapsed_s"] += dt
        history["tokens"] += tokens_per_step
        ema_tps = tokens_per_step / dt if ema_tps == 0 else 0.9 * ema_tps + 0.1 * tokens_per_step / dt
        history["train"].append((step, round(loss_value, 5)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{ema_tps:,.0f}", lr=f"{lr:.2e}",
                        gnorm=f"{float(grad_norm):.2f}", refresh=False)

        total_steps = budget.after_step(step)
        bar.total = total_steps

        if step % t.eval_every == 0 or step == total_steps:
            point = _heldout_point(model, step, text_rows, task_rows, device, t.batch_size)
            history["heldout"].append(point)
            bar.write(f"step {step}: held-out text loss {point['text_loss']:.4f} "
                      f"({point['text_bits_per_byte']:.3f} bits/byte), task loss {point['task_loss']:.4f}")
        if step % t.checkpoint_every == 0 or step == total_steps:
            checkpoint()
    bar.close()
    checkpoint()
    if step < total_steps:
        return {}

    # Later stages and the shipped model use exactly these (rounded) weights.
    round_matrices_(model, cfg.assemble.dtype)
    history["heldout"].append(_heldout_point(model, step, text_rows, task_rows, device, t.batch_size))
    out = exported_backbone(cfg)
    save_pretrained(cast_matrices(model, cfg.assemble.dtype), out, ByteTokenizer())
    by_family = {}
    for family in cfg.tasks.families:
        prompts = heldout_prompts(cfg.tasks, min(cfg.eval.prompts, 200), cfg.seed, family)
        by_family[family] = greedy_task_accuracy(model, prompts, cfg.eval.max_new_tokens)
    accuracy = by_family[cfg.tasks.families[0]]
    train_tail = [loss for _, loss in history["train"][-max(1, len(history["train"]) // 20):]]
    report = {
        "device": device_description(device),
        "commit": git_commit(),
        "precision": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
        "parameters": n_params,
        "steps": step,
        "batch_size": t.batch_size,
        "seq_len": cfg.data.seq_len,
        "tokens_seen": history["tokens"],
        "train_time_s": round(history["elapsed_s"], 1),
        "tokens_per_s": round(history["tokens"] / max(history["elapsed_s"], 1e-9)),
        "first_train_loss": history["train"][0][1],
        "final_train_loss": round(float(np.mean(train_tail)), 5),
        "heldout": history["heldout"],
        "initial_heldout_text_loss": history["heldout"][0]["text_loss"],
        "final_heldout_text_loss": history["heldout"][-1]["text_loss"],
        "final_heldout_bits_per_byte": history["heldout"][-1]["text_bits_per_byte"],
        "heldout_task_greedy_accuracy": accuracy,
        "heldout_greedy_accuracy_by_family": by_family,
        "heldout_task_prompts": len(prompts),
        "corpus": corpus.describe(),
    }
    write_report(cfg.out_path, STAGE, report)
    log.info("stage 1 done: held-out loss %.4f -> %.4f, greedy task accuracy %s",
             report["initial_heldout_text_loss"], report["final_heldout_text_loss"], by_family)
    return report


def _heldout_point(model: MambaLM, step: int, text_rows: torch.Tensor, task_rows: torch.Tensor,
                   device: torch.device, batch: int) -> dict[str, float]:
    text = evaluate_loss(model, text_rows, device, batch)
    task = evaluate_loss(model, task_rows, device, batch)
    return {"step": step, "text_loss": round(text, 5), "text_bits_per_byte": round(text / math.log(2), 5),
            "task_loss": round(task, 5)}
