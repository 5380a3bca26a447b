"""Fused GPU kernels for `MambaLM`: mamba_ssm's Triton ops behind the `Kernels` table of model.py.

Why our own module tree and not mamba_ssm's `Mamba2` module: `Mamba2.forward` cannot continue a
prefill from an existing state. Once `inference_params.seqlen_offset > 0` it steps token by token,
so a prompt appended to a live session (or a planner fast-forwarding a cloned state through several
tokens) would be decoded one token at a time. Here the chunked scan takes the row's state as
`initial_states` and returns the final state, so prefill(a) then prefill(b) is one chunked scan each.

Shapes follow model.py: B batch, T time, H heads, P headdim, G groups, N d_state, C conv channels,
K conv width. Import this module only where CUDA and mamba_ssm are present (see `build_backbone`).
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import types

import torch

from . import ssd
from .model import Kernels, layered_step

log = logging.getLogger(__name__)


def register_selective_scan_stub() -> None:
    """Let `import mamba_ssm` succeed without its Mamba-1 CUDA extension.

    mamba-ssm 2.3.2 imports `selective_scan_cuda` (the compiled Mamba-1 scan) unconditionally in
    its package `__init__`, although Mamba-2 needs only its Triton kernels; the pure-Python build
    has no such extension. Registering an empty module under that name makes the import succeed;
    any Mamba-1 call would still fail loudly (attribute error), and we make none. When the real
    extension is installed it is left alone.
    """
    if "selective_scan_cuda" in sys.modules or importlib.util.find_spec("selective_scan_cuda") is not None:
        return
    log.debug("registering an empty selective_scan_cuda module (Mamba-1 CUDA extension not installed)")
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")


register_selective_scan_stub()

from mamba_ssm.ops.triton.layer_norm import rms_norm_fn  # noqa: E402
from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as gated_rmsnorm_fn  # noqa: E402
from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: E402
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: E402

# causal-conv1d is optional (its CUDA build is slow); without it the convolution is ssd.py's torch code.
HAVE_CAUSAL_CONV1D = importlib.util.find_spec("causal_conv1d") is not None
if HAVE_CAUSAL_CONV1D:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update


def chunk_scan(x, dt_raw, dt_bias, A, B, C, D, chunk_size, initial_state):
    """x: [B, T, H, P]; dt_raw: [B, T, H] (before bias and softplus); dt_bias, A, D: [H];
    B, C: [B, T, G, N]; initial_state: [B, H, P, N].
    Returns y: [B, T, H, P] (x's dtype) and the final state [B, H, P, N] (fp32)."""
    return mamba_chunk_scan_combined(x, dt_raw, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                                     initial_states=initial_state, dt_softplus=True, return_final_states=True)


def state_step(ssm_state, x, dt_raw, dt_bias, A, B, C, D):
    """ssm_state: [B, H, P, N], updated in place; x: [B, H, P]; dt_raw: [B, H]; dt_bias, A, D: [H];
    B, C: [B, G, N]. Returns y: [B, H, P].

    The kernel takes per-(head, channel) dt / A / D; Mamba-2 ties them over the head's channels, so
    they are broadcast (stride-0 views), which the kernel detects and uses to load them once per head.
    """
    bsz, nheads, headdim = x.shape
    d_state = ssm_state.shape[-1]
    return selective_state_update(
        ssm_state, x, dt_raw[:, :, None].expand(bsz, nheads, headdim),
        A.float()[:, None, None].expand(nheads, headdim, d_state), B, C,
        D=D[:, None].expand(nheads, headdim), dt_bias=dt_bias[:, None].expand(nheads, headdim),
        dt_softplus=True)


def causal_conv(xbc, conv_state, weight, bias):
    """xbc: [B, T, C]; conv_state: [B, C, K]; weight: [C, 1, K].
    Returns (SiLU(conv) [B, T, C], new conv_state [B, C, K])."""
    k = weight.shape[-1]
    # The kernel takes initial states only in channel-last memory layout (stride 1 over C).
    x = xbc.contiguous().transpose(1, 2)                                             # [B, C, T]
    initial = conv_state[:, :, 1:].to(xbc.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    out = causal_conv1d_fn(x, weight[:, 0, :], bias, initial_states=initial, activation="silu")
    new_state = torch.cat([conv_state.to(xbc.dtype), x], dim=2)[:, :, -k:]
    return out.transpose(1, 2), new_state


def causal_conv_step(xbc, conv_state, weight, bias):
    """xbc: [B, C]; conv_state: [B, C, K] (updated in place) -> SiLU(conv) [B, C]."""
    return causal_conv1d_update(xbc, conv_state, weight[:, 0, :], bias, "silu")


def gated_norm(y, z, weight, eps, group_size):
    """rmsnorm(y * silu(z)) per group of `group_size` channels. y, z: [..., D] -> [..., D]."""
    return gated_rmsnorm_fn(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)


def add_norm(x, residual, weight, eps, residual_in_fp32):
    """x, residual: [..., D] (residual None at the first block) -> (rmsnorm(x + residual), x + residual)."""
    return rms_norm_fn(x, weight, None, residual=residual, eps=eps, prenorm=True,
                       residual_in_fp32=residual_in_fp32)


FUSED_KERNELS = Kernels(
    name="fused",
    chunk_scan=chunk_scan,
    state_step=state_step,
    conv=causal_conv if HAVE_CAUSAL_CONV1D else ssd.causal_conv,
    conv_step=causal_conv_step if HAVE_CAUSAL_CONV1D else ssd.causal_conv_step,
    gated_norm=gated_norm,
    add_norm=add_norm,
    decode_step=layered_step,
)
