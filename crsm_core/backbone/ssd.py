"""Pure-PyTorch Mamba-2 kernels: the chunked SSD scan, the single-step update, the causal
depthwise convolution and the norms. They define the numerics the fused kernels are tested against.

Notation (per layer): B batch, T time, H heads, P headdim, G groups, N d_state, C conv channels,
K conv width, Q chunk size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D] -> [..., D] in weight's dtype, computed in fp32."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(weight.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual block entry: residual <- x + residual; returns (norm(residual), residual)."""
    residual = x if residual is None else x + residual
    if residual_in_fp32:
        residual = residual.float()
    return rms_norm(residual, weight, eps), residual


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """mamba_ssm's RMSNormGated with norm_before_gate=False: rmsnorm(y * silu(z)) per group.

    y, z: [..., D]; weight: [D].
    """
    g = (y.float() * F.silu(z.float()))
    shape = g.shape
    g = g.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.reshape(shape) * weight.float()).to(y.dtype)


def causal_conv(xbc: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv continuing from conv_state, then SiLU.

    xbc: [B, T, C]; conv_state: [B, C, K] (the previous K inputs); weight: [C, 1, K].
    Returns (out [B, T, C], new conv_state [B, C, K]).
    """
    k = weight.shape[-1]
    seq = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=2)  # [B, C, K + T]
    out = F.conv1d(seq[:, :, 1:], weight.to(xbc.dtype), bias, groups=seq.shape[1])  # [B, C, T]
    return F.silu(out).transpose(1, 2), seq[:, :, -k:]


def causal_conv_step(xbc: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """One step; updates conv_state in place. xbc: [B, C]; conv_state: [B, C, K] -> [B, C]."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = xbc.to(conv_state.dtype)
    out = (conv_state.float() * weight[:, 0, :].float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return F.silu(out).to(xbc.dtype)


def _expand_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: heads share their group's B / C."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor, chunk_size: int,
                   initial_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked state-space-dual scan, in fp32.

    x: [B, T, H, P]; dt: [B, T, H] (after softplus); A: [H] (negative); B, C: [B, T, G, N];
    D: [H]; initial_state: [B, H, P, N].
    Returns y: [B, T, H, P] and the final state [B, H, P, N].

    Within a chunk the output is a masked (decay-weighted) attention over the chunk; across chunks a
    recurrence carries the state. Padding positions get dt = 0: no decay and no input, so the final
    state is the state after the last real token.
    """
    bsz, seqlen, nheads, _ = x.shape
    q = chunk_size
    pad = (-seqlen) % q
    xf, dtf = x.float(), dt.float()
    Bf, Cf = _expand_groups(B.float(), nheads), _expand_groups(C.float(), nheads)
    if pad:
        xf, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
        dtf = F.pad(dtf, (0, 0, 0, pad))
    nchunks = xf.shape[1] // q
    # [B, c, Q, ...]
    xc = xf.view(bsz, nchunks, q, nheads, -1)
    Bc = Bf.view(bsz, nchunks, q, nheads, -1)
    Cc = Cf.view(bsz, nchunks, q, nheads, -1)
    dA = (dtf * A.float()).view(bsz, nchunks, q, nheads)
    cum = dA.cumsum(dim=2)                                             # [B, c, Q, H]
    xdt = xc * dtf.view(bsz, nchunks, q, nheads, 1)                    # [B, c, Q, H, P]

    # Intra-chunk: y_i = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j
    seg = cum.unsqueeze(3) - cum.unsqueeze(2)                          # [B, c, Qi, Qj, H]
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bcijh", Cc, Bc) * decay
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xdt)

    # Each chunk's own contribution to the state at its end.
    to_end = torch.exp(cum[:, :, -1:, :] - cum)                        # [B, c, Q, H]
    chunk_states = torch.einsum("bcjhn,bcjh,bcjhp->bchpn", Bc, to_end, xdt)
    chunk_decay = torch.exp(cum[:, :, -1, :])                          # [B, c, H]

    # Inter-chunk recurrence and the carried state's contribution to each position.
    state = initial_state.float()
    carried = []
    for c in range(nchunks):
        carried.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    carried_states = torch.stack(carried, dim=1)                       # [B, c, H, P, N]
    y = y + torch.einsum("bcihn,bchpn,bcih->bcihp", Cc, carried_states, torch.exp(cum))

    y = y.reshape(bsz, nchunks * q, nheads, -1)[:, :seqlen]
    y = y + xf[:, :seqlen] * D.float()[:, None]
    return y, state


def ssd_step(ssm_state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """One recurrence step; updates ssm_state in place.

    ssm_state: [B, H, P, N]; x: [B, H, P]; dt: [B, H] (after softplus); B, C: [B, G, N].
    Returns y: [B, H, P] in fp32.
    """
    nheads = x.shape[1]
    Bh, Ch = _expand_groups(B.float(), nheads), _expand_groups(C.float(), nheads)
    dtf = dt.float()
    decay = torch.exp(dtf * A.float())                                 # [B, H]
    new = ssm_state.float() * decay[:, :, None, None] + \
        (dtf[:, :, None] * x.float())[..., None] * Bh[:, :, None, :]
    ssm_state.copy_(new.to(ssm_state.dtype))
    return torch.einsum("bhpn,bhn->bhp", new, Ch) + x.float() * D.float()[:, None]
