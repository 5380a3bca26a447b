"""Where a run happened: device, versions, commit, date, and the model it measured."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..training.common import device_description, git_commit
from .workload import Workload

PACKAGES = {"torch": "torch", "triton": "triton", "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d",
            "transformers": "transformers", "matplotlib": "matplotlib"}


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def uncommitted_changes() -> bool:
    """True when the checkout the code runs from has changes to tracked files (the commit alone does not
    say what ran). False without git or without a checkout (CRSM_COMMIT then names the commit)."""
    if os.environ.get("CRSM_COMMIT"):
        return False
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "status", "--porcelain",
                              "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def describe_environment(workload: Workload, command: str | None) -> dict[str, Any]:
    s = workload.settings
    device = torch.device(s.device)
    return {
        "device": device_description(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        # torch's own string carries the CUDA build (2.11.0+cu130); its wheel metadata may not
        "versions": {**{name: package_version(dist) for name, dist in PACKAGES.items()}, "torch": torch.__version__},
        "commit": git_commit() + (" (with uncommitted changes)" if uncommitted_changes() else ""),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or "crsm_core.bench.runner.run_bench",
        "platform": f"{platform.system()} {platform.machine()}; {sys.implementation.name}",
        "model": describe_model(workload),
    }


def describe_model(workload: Workload) -> dict[str, Any]:
    c = workload.config
    backbone = workload.built_backbone
    return {"d_model": c.d_model, "n_layer": c.n_layer, "vocab_size": c.vocab_size,
            "padded_vocab_size": c.padded_vocab_size, "d_state": c.ssm_cfg.d_state, "headdim": c.ssm_cfg.headdim,
            "expand": c.ssm_cfg.expand, "ngroups": c.ssm_cfg.ngroups, "chunk_size": c.ssm_cfg.chunk_size,
            "backbone": workload.impl,
            "parameters": backbone.num_parameters() if backbone is not None else None}
