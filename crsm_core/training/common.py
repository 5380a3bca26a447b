"""What every stage shares: device and precision, resumable training state, learning-rate schedule,
progress bars, and the per-stage report files that assembly merges."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from .config import TrainConfig

log = logging.getLogger(__name__)

REPORTS = "reports"


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config asks for device cuda but CUDA is not available")
    return torch.device(cfg.device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} threads)"


def git_commit(path: Path | None = None) -> str:
    """CRSM_COMMIT if set (a copy of the tree without its .git), else the checkout's HEAD, else 'unknown'."""
    if os.environ.get("CRSM_COMMIT"):
        return os.environ["CRSM_COMMIT"]
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def cosine_lr(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to base, then cosine decay to base * min_ratio at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a run killed mid-write keeps the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_training_state(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def progress(total: int, initial: int, desc: str) -> tqdm:
    """A progress bar; redrawn at most every 5 s when stderr is not a terminal (logs stay short)."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 5.0)


def write_report(out_dir: Path, stage: str, report: dict[str, Any]) -> Path:
    path = out_dir / REPORTS / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def read_report(out_dir: Path, stage: str) -> dict[str, Any]:
    path = out_dir / REPORTS / f"{stage}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: stage {stage!r} has not been run for this config")
    return json.loads(path.read_text())


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class StepBudget:
    """Fits a run into a time budget: times a few early steps once, then fixes the total step count.

    The first steps carry warm-up costs (allocator, kernel selection), so steps [3, 13) are timed; a tenth
    of the budget is kept for evaluation and checkpoints. With budget 0 the planned count stands.
    """
    TIMED = (3, 13)

    def __init__(self, budget_s: float, planned: int, step: int):
        self.budget_s, self.total = budget_s, planned
        self.active = budget_s > 0 and step < self.TIMED[0]
        self._start = time.perf_counter()
        self._timed_from: float | None = None

    def after_step(self, step: int) -> int:
        """Call after each step (step = steps done); returns the (possibly shortened) total."""
        if not self.active:
            return self.total
        now = time.perf_counter()
        if step == self.TIMED[0]:
            self._timed_from = now
        elif step == self.TIMED[1] and self._timed_from is not None:
            per_step = (now - self._timed_from) / (self.TIMED[1] - self.TIMED[0])
            fit = step + int((0.9 * self.budget_s - (now - self._start)) / per_step)
            self.total = max(step + 1, min(self.total, fit))
            self.active = False
            log.info("%.4f s/step: %d steps fit in the %.0f s budget", per_step, self.total, self.budget_s)
        return self.total


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@torch.no_grad()
def round_matrices_(module: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Round every parameter of >= 2 dimensions through `dtype`, in place, keeping its own dtype.

    The shipped files keep matrices in `dtype` and the small per-channel parameters (norms, A_log,
    dt_bias, D, biases) in fp32; rounding before the final measurements makes the reported numbers
    those of the weights that ship."""
    target = TORCH_DTYPES[dtype]
    for p in module.parameters():
        if p.dim() >= 2:
            p.copy_(p.to(target).to(p.dtype))
    return module


def cast_matrices(module: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A copy whose >= 2-D parameters are stored in `dtype` (for writing the shipped files)."""
    shipped = copy.deepcopy(module)
    with torch.no_grad():
        for p in shipped.parameters():
            if p.dim() >= 2:
                p.data = p.data.to(TORCH_DTYPES[dtype])
    return shipped
