"""Mamba-2 backbones: `reference` (pure PyTorch, any device), `fused` (mamba_ssm's Triton kernels) and
`fused_step` (fused's prefill, and the decode step as this project's own kernels, three per layer:
step_kernels.py). All are `MambaLM` modules with the same parameters; `build_backbone` picks one."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Literal

import torch

from ..config import MambaConfig
from .model import REFERENCE_KERNELS, Kernels, MambaLM

log = logging.getLogger(__name__)

Impl = Literal["auto", "reference", "fused", "fused_step"]
IMPLS = ("auto", "reference", "fused", "fused_step")
GPU_IMPLS = ("fused", "fused_step")


def fused_available() -> bool:
    """True when the fused backbones can run here: a CUDA device and an installed mamba_ssm (which
    brings Triton)."""
    return torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None


def resolve_impl(impl: Impl, device: torch.device | str) -> Literal["reference", "fused", "fused_step"]:
    """`auto` -> fused on a CUDA device when mamba_ssm is installed, else reference (`build_backbone`
    then takes fused_step where the step kernels cover the config)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = torch.device(device).type == "cuda"
    if impl == "auto":
        return "fused" if on_cuda and fused_available() else "reference"
    if impl in GPU_IMPLS:
        if not on_cuda:
            raise ValueError(f"the {impl} backbone runs on a CUDA device, not {str(device)!r}")
        if not torch.cuda.is_available():
            raise RuntimeError(f"the {impl} backbone needs CUDA, and no CUDA device is available")
        if importlib.util.find_spec("mamba_ssm") is None:
            raise RuntimeError(f"the {impl} backbone needs mamba_ssm (pip install 'crsm-server[gpu]')")
    return impl


def kernels_for(impl: Literal["reference", "fused", "fused_step"]) -> Kernels:
    """The kernel table of a resolved impl (the GPU tables import mamba_ssm and Triton: only when asked)."""
    if impl == "reference":
        return REFERENCE_KERNELS
    from .fused import FUSED_KERNELS
    if impl == "fused":
        return FUSED_KERNELS
    from .step_kernels import decode_step
    return dataclasses.replace(FUSED_KERNELS, name="fused_step", decode_step=decode_step)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on the CPU, bf16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _step_kernels_cover(config: MambaConfig) -> bool:
    from ..config import ConfigError
    from .step_kernels import check_config
    try:
        check_config(config)
    except ConfigError:
        return False
    return True


def build_backbone(config: MambaConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   impl: Impl = "auto") -> MambaLM:
    """A freshly initialised `MambaLM` on `device` in `dtype` (default: `default_dtype(device)`),
    in eval mode, with the kernels of `impl` (see `resolve_impl`)."""
    chosen = resolve_impl(impl, device)
    if impl == "auto" and chosen == "fused" and _step_kernels_cover(config):
        # the step kernels where they cover the config (a decode step 1.8-3.8x faster than mamba_ssm's
        # on an H200, docs/benchmarks.md), mamba_ssm's kernels otherwise
        chosen = "fused_step"
    if chosen == "fused_step":
        from .step_kernels import check_config
        check_config(config)
    kernels = kernels_for(chosen)
    dtype = default_dtype(device) if dtype is None else dtype
    model = MambaLM(config, kernels).to(device=device, dtype=dtype).eval()
    log.info("built %s Mamba-2 backbone (%d layers, d_model %d) on %s in %s",
             kernels.name, config.n_layer, config.d_model, device, dtype)
    return model


__all__ = ["MambaLM", "Kernels", "REFERENCE_KERNELS", "build_backbone", "fused_available", "resolve_impl",
           "kernels_for", "default_dtype", "IMPLS", "GPU_IMPLS"]
