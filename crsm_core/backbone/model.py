"""Mamba-2 language model with mamba_ssm's `MambaLMHeadModel` parameter layout.

One module tree serves both backbones: the numerics live in a `Kernels` table, pure PyTorch for
the reference (any device, CI) and mamba_ssm's Triton kernels for the fused GPU path. The state is
explicit: `prefill` and `step` read and update a `RecurrentState` in place, so a prompt can be
prefilled in pieces and any row of a pool can be decoded, cloned or blended.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MambaConfig
from ..state import RecurrentState
from . import ssd


@dataclass(frozen=True)
class Kernels:
    """The numeric operations a Mamba-2 block needs; see ssd.py for shapes."""
    name: str
    # (x[B,T,H,P], dt_raw[B,T,H], dt_bias[H], A[H], B[B,T,G,N], C[B,T,G,N], D[H], chunk, init[B,H,P,N])
    #   -> (y[B,T,H,P], final_state[B,H,P,N])
    chunk_scan: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # (ssm_state[B,H,P,N] updated in place, x[B,H,P], dt_raw[B,H], dt_bias, A, B[B,G,N], C, D) -> y[B,H,P]
    state_step: Callable[..., torch.Tensor]
    conv: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    conv_step: Callable[..., torch.Tensor]
    gated_norm: Callable[..., torch.Tensor]
    add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # (model, tokens [M], state (a pool of R >= M rows), src_rows [M] | None, dst_rows [M] | None)
    #   -> logits [M, V]: the whole decode step (see `MambaLM.step_rows`)
    decode_step: Callable[..., torch.Tensor]


def _reference_chunk_scan(x, dt_raw, dt_bias, A, B, C, D, chunk_size, initial_state):
    dt = F.softplus(dt_raw.float() + dt_bias.float())
    return ssd.ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state)


def _reference_state_step(ssm_state, x, dt_raw, dt_bias, A, B, C, D):
    dt = F.softplus(dt_raw.float() + dt_bias.float())
    return ssd.ssd_step(ssm_state, x, dt, A, B, C, D)


def layered_step(model: "MambaLM", tokens: torch.Tensor, state: RecurrentState, src_rows: torch.Tensor | None,
                 dst_rows: torch.Tensor | None) -> torch.Tensor:
    """The decode step as the blocks' `step` methods, one table kernel at a time. With rows, the rows
    are gathered, stepped and scattered (the fused step kernels read and write them in place)."""
    if src_rows is None:
        return model.step_layers(tokens, state)
    rows = state.gather(src_rows)
    logits = model.step_layers(tokens, rows)
    state.scatter_(dst_rows, rows)
    return logits


REFERENCE_KERNELS = Kernels(
    name="reference",
    chunk_scan=_reference_chunk_scan,
    state_step=_reference_state_step,
    conv=ssd.causal_conv,
    conv_step=ssd.causal_conv_step,
    gated_norm=ssd.gated_rms_norm,
    add_norm=ssd.add_rms_norm,
    decode_step=layered_step,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Mamba2Mixer(nn.Module):
    """Parameters named as mamba_ssm's Mamba2: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj."""

    def __init__(self, config: MambaConfig, kernels: Kernels):
        super().__init__()
        s = config.ssm_cfg
        self.kernels = kernels
        self.nheads, self.headdim, self.d_state = config.nheads, s.headdim, s.d_state
        self.ngroups, self.chunk_size, self.d_inner = s.ngroups, s.chunk_size, config.d_inner
        self.in_proj = nn.Linear(config.d_model, config.d_in_proj, bias=False)
        self.conv1d = nn.Conv1d(config.conv_dim, config.conv_dim, s.d_conv, groups=config.conv_dim,
                                padding=s.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNorm(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        # As mamba_ssm: dt log-uniform in [dt_min, dt_max] stored as softplus^-1; A uniform in [1, 16].
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D.fill_(1.0)

    def _split(self, zxbcdt: torch.Tensor):
        gn = self.ngroups * self.d_state
        return torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * gn, self.nheads], dim=-1)

    def forward(self, u: torch.Tensor, conv_state: torch.Tensor,
                ssm_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u: [B, T, d_model]; conv_state: [B, C, K]; ssm_state: [B, H, P, N].
        Returns (out [B, T, d_model], new conv_state, new ssm_state)."""
        bsz, seqlen, _ = u.shape
        z, xbc, dt = self._split(self.in_proj(u))
        xbc, new_conv = self.kernels.conv(xbc, conv_state, self.conv1d.weight, self.conv1d.bias)
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        y, new_ssm = self.kernels.chunk_scan(
            x.reshape(bsz, seqlen, self.nheads, self.headdim), dt, self.dt_bias, -torch.exp(self.A_log.float()),
            B.reshape(bsz, seqlen, self.ngroups, self.d_state), C.reshape(bsz, seqlen, self.ngroups, self.d_state),
            self.D, self.chunk_size, ssm_state)
        y = self.kernels.gated_norm(y.reshape(bsz, seqlen, self.d_inner).to(u.dtype), z, self.norm.weight,
                                    self.norm.eps, self.d_inner // self.ngroups)
        return self.out_proj(y), new_conv, new_ssm

    def step(self, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """u: [B, d_model] -> [B, d_model]; conv_state and ssm_state are updated in place."""
        bsz = u.shape[0]
        z, xbc, dt = self._split(self.in_proj(u))
        xbc = self.kernels.conv_step(xbc, conv_state, self.conv1d.weight, self.conv1d.bias)
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        y = self.kernels.state_step(
            ssm_state, x.reshape(bsz, self.nheads, self.headdim), dt, self.dt_bias,
            -torch.exp(self.A_log.float()), B.reshape(bsz, self.ngroups, self.d_state),
            C.reshape(bsz, self.ngroups, self.d_state), self.D)
        y = self.kernels.gated_norm(y.reshape(bsz, self.d_inner).to(u.dtype), z, self.norm.weight, self.norm.eps,
                                    self.d_inner // self.ngroups)
        return self.out_proj(y)


class GatedMLP(nn.Module):
    """mamba_ssm's GatedMLP (used when d_intermediate > 0): fc2(y * silu(gate))."""

    def __init__(self, d_model: int, d_intermediate: int, multiple_of: int = 128):
        super().__init__()
        hidden = (d_intermediate + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class Block(nn.Module):
    def __init__(self, config: MambaConfig, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, config.norm_epsilon)
        self.mixer = Mamba2Mixer(config, kernels)
        if config.d_intermediate > 0:
            self.norm2 = RMSNorm(config.d_model, config.norm_epsilon)
            self.mlp: GatedMLP | None = GatedMLP(config.d_model, config.d_intermediate)
        else:
            self.mlp = None

    def _norm(self, norm: RMSNorm, h, residual):
        return self.kernels.add_norm(h, residual, norm.weight, norm.eps, self.residual_in_fp32)

    def _mlp(self, h, residual):
        if self.mlp is None:
            return h, residual
        h, residual = self._norm(self.norm2, h, residual)
        return self.mlp(h), residual


class MambaLM(nn.Module):
    """`backbone.embedding`, `backbone.layers.{i}`, `backbone.norm_f`, `lm_head`, as mamba_ssm."""

    def __init__(self, config: MambaConfig, kernels: Kernels = REFERENCE_KERNELS):
        super().__init__()
        self.config = config
        self.kernels = kernels
        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.backbone.layers = nn.ModuleList(Block(config, kernels) for _ in range(config.n_layer))
        self.backbone.norm_f = RMSNorm(config.d_model, config.norm_epsilon)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for block in self.backbone.layers:
            # GPT-2 style rescale of the residual-writing projection, as mamba_ssm's _init_weights.
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            block.mixer.out_proj.weight /= math.sqrt(self.config.n_layer)

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    def allocate_state(self, batch: int) -> RecurrentState:
        return RecurrentState.allocate(self.config, batch, self.device, self.dtype)

    def _final(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h, _ = self.kernels.add_norm(h, residual, self.backbone.norm_f.weight, self.backbone.norm_f.eps,
                                     self.config.residual_in_fp32)
        return self.lm_head(h)[..., : self.config.vocab_size]

    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None) -> torch.Tensor:
        """Chunked prefill. input_ids: [B, T] -> logits [B, T, vocab_size].

        With a state, continues from it and writes the final state back (in place); without one,
        starts from zeros and keeps nothing (training)."""
        bsz = input_ids.shape[0]
        if state is None:
            scratch = RecurrentState.allocate(self.config, bsz, self.device, self.dtype)
        else:
            scratch = state
        h, residual = self.backbone.embedding(input_ids), None
        for i, block in enumerate(self.backbone.layers):
            h, residual = block._norm(block.norm, h, residual)
            h, conv, ssm_state = block.mixer(h, scratch.conv[i], scratch.ssm[i])
            if state is not None:
                state.conv[i].copy_(conv)
                state.ssm[i].copy_(ssm_state)
            h, residual = block._mlp(h, residual)
        return self._final(h, residual)

    def prefill(self, input_ids: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """input_ids: [B, T]; returns the logits of the last position [B, V]; state advanced by T."""
        return self.forward(input_ids, state)[:, -1]

    def step(self, input_ids: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """One decode step. input_ids: [B] -> logits [B, V]; state (B rows) advanced by one token in place."""
        if state.batch != input_ids.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} tokens for a state of {state.batch} rows")
        return self.kernels.decode_step(self, input_ids, state, None, None)

    def step_rows(self, input_ids: torch.Tensor, pool: RecurrentState, rows: torch.Tensor,
                  dst_rows: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of chosen rows of a pool. input_ids: [M]; rows: [M] long, the pool rows to
        read; dst_rows: [M] long, where their advanced states go (default: rows, in place). Returns
        logits [M, V]. Destination rows must be distinct and none another entry's source row.

        `step(ids, state)` is the same step over rows 0..B-1. The fused step kernels read and write
        the rows where they are; the layered step gathers and scatters them."""
        if rows.shape != input_ids.shape or (dst_rows is not None and dst_rows.shape != rows.shape):
            raise ValueError(f"rows {tuple(rows.shape)} and dst_rows must match the tokens {tuple(input_ids.shape)}")
        return self.kernels.decode_step(self, input_ids, pool, rows, rows if dst_rows is None else dst_rows)

    def step_layers(self, input_ids: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """The decode step block by block with the table's kernels (`layered_step`)."""
        h, residual = self.backbone.embedding(input_ids), None
        for i, block in enumerate(self.backbone.layers):
            h, residual = block._norm(block.norm, h, residual)
            h = block.mixer.step(h, state.conv[i], state.ssm[i])
            h, residual = block._mlp(h, residual)
        return self._final(h, residual)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
