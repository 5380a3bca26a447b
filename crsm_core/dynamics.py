"""Latent dynamics: (per-layer state, token) -> (next per-layer state, next logits).

`LatentDynamics.step` has `MambaLM.step`'s signature (state.StepFn: `step(tokens [K], state) -> logits
[K, V]`, the state advanced in place), so a planner can step states with either (its `steps` setting:
"exact" or "dynamics"); deliberation.DYNAMICS_MIN_TOP1 says when it may use this one.

Design of `LatentDynamics`. A Mamba-2 layer's step is `ssm <- exp(dt A) ssm + dt x B^T` with
(x, B, C) = silu(depthwise_conv(conv window shifted by one new input column)). Almost all of a
backbone step's cost is producing that column and dt (in_proj: d_model -> d_in_proj) and reading the
layer output back into the residual stream (out_proj), plus the LM head. We keep the exact, cheap
part (the layer's own conv weights, A, dt_bias, D: borrowed from the backbone, not learned) and
replace the expensive part by a rank-r residual stream that runs through the layers:

    h_0 = E[token]                                                   [K, r]
    h_l = h_{l-1} + silu(Read_l(rmsnorm(c_l)) + Mix_l(h_{l-1}))     c_l = layer l's last conv input
    column_l = Write_l(h_l);  dt_l = softplus(Dt_l(h_l) + dt_bias_l)
    conv_l <- shift(conv_l, column_l);  (x, B, C) = silu(conv(conv_l))
    ssm_l  <- exp(dt_l A_l) ssm_l + dt_l x B^T                      (the exact Mamba-2 update form)
    logits = Head(rmsnorm(h_L + ReadY(C . ssm_top + D x)))           low-rank head, rank r

`Write_l` starts at zero: an untrained model feeds a zero input column (the window shifts, the state
decays at the layer's own rate), a better start than noise. The column is predicted afresh each step
rather than as a correction to the previous one, so errors do not integrate over a rollout.
The state update touches every ssm element (3 flops each), which is unavoidable for any model that
emits a full next state; everything else is rank r. Apart from the top layer's output (for the
logits), the model does not read the ssm states: a read costs two thirds of an update, and reading
every layer would break the budget. Each layer's summary of the context is its conv window's last
column (the previous input). A variant that read every layer's output back into h (a rank-r copy of
the block) fitted no better on a random tiny backbone and cost 10.1% at r = 16.

Cost on the 768x24 / vocab 50277 configuration (mamba2-130m's shape) with r = 32, per row (see
`step_cost`, checked against torch's flop counter in tests/test_dynamics.py): 24.1 MFLOP against
281.7 MFLOP for a backbone step (8.5%); 6.1M parameters against 129.0M (4.7%). Measured on 2 CPU
cores in fp32 (median of 20 steps): 6.2 ms against 51 ms at batch 1 (0.12), 0.08-0.18 at batch 8-32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import MambaLM
from .checkpoint import load_component_state, check_state_dict, save_component
from .config import MambaConfig
from .state import RecurrentState, StepFn

COMPONENT_NAME = "dynamics"


@dataclass(frozen=True)
class StepCost:
    """Floating-point operations of one decode step for one row."""
    matmul: int        # matrix products (what torch's FlopCounterMode counts)
    elementwise: int   # state updates, convolution taps, norms, activations

    @property
    def total(self) -> int:
        return self.matmul + self.elementwise


def backbone_step_cost(config: MambaConfig) -> StepCost:
    """One `MambaLM.step` for one row."""
    s = config.ssm_cfg
    d, di, H, P, N = config.d_model, config.d_inner, config.nheads, s.headdim, s.d_state
    hpn = H * P * N
    per_layer_mm = 2 * d * config.d_in_proj + 2 * hpn + 2 * di * d   # in_proj, y = C.state, out_proj
    per_layer_ew = (2 * config.conv_dim * s.d_conv + 3 * hpn + H * P  # conv taps, state update, dt*x
                    + 5 * di + 4 * d)                                # gated norm, residual add + norm
    if config.d_intermediate > 0:
        hidden = (config.d_intermediate + 127) // 128 * 128
        per_layer_mm += 2 * d * 2 * hidden + 2 * hidden * d
        per_layer_ew += 3 * hidden + 4 * d
    head_mm = 2 * d * config.padded_vocab_size
    return StepCost(matmul=config.n_layer * per_layer_mm + head_mm,
                    elementwise=config.n_layer * per_layer_ew + 4 * d)


@dataclass(frozen=True)
class DynamicsConfig:
    """Sizes of a `LatentDynamics`; the backbone-derived ones are checked against the backbone."""
    n_layer: int
    vocab_size: int
    padded_vocab_size: int
    conv_dim: int
    d_conv: int
    nheads: int
    headdim: int
    d_state: int
    ngroups: int
    rank: int = 32

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"DynamicsConfig.{name} must be positive, got {value}")

    @classmethod
    def for_model(cls, config: MambaConfig, rank: int = 32) -> "DynamicsConfig":
        s = config.ssm_cfg
        return cls(n_layer=config.n_layer, vocab_size=config.vocab_size,
                   padded_vocab_size=config.padded_vocab_size, conv_dim=config.conv_dim, d_conv=s.d_conv,
                   nheads=config.nheads, headdim=s.headdim, d_state=s.d_state, ngroups=s.ngroups, rank=rank)

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DynamicsConfig":
        return cls(**raw)


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class LatentDynamics(nn.Module):
    """Learned one-step model of the backbone; see the module docstring for the design."""

    def __init__(self, config: DynamicsConfig, backbone: MambaLM):
        super().__init__()
        self.config = config
        L, C, r, H, V = config.n_layer, config.conv_dim, config.rank, config.nheads, config.padded_vocab_size
        self.tok = nn.Parameter(torch.empty(V, r))
        self.read = nn.Parameter(torch.randn(L, C, r) / C ** 0.5)
        self.mix = nn.Parameter(torch.randn(L, r, r) / r ** 0.5)
        self.write = nn.Parameter(torch.zeros(L, r, C))
        self.write_bias = nn.Parameter(torch.zeros(L, C))
        self.dt = nn.Parameter(torch.zeros(L, r, H))
        self.dt_out_bias = nn.Parameter(torch.zeros(L, H))
        self.read_y = nn.Parameter(torch.randn(config.d_inner, r) / config.d_inner ** 0.5)
        self.head_norm = nn.Parameter(torch.ones(r))
        self.head = nn.Parameter(torch.randn(r, V) / r ** 0.5)
        # The layers' own exact parameters, borrowed from the backbone (not saved with this part).
        for name, shape in (("conv_weight", (L, C, config.d_conv)), ("conv_bias", (L, C)), ("A", (L, H)),
                            ("dt_bias", (L, H)), ("D", (L, H))):
            self.register_buffer(name, torch.zeros(shape), persistent=False)
        self.bind(backbone)
        with torch.no_grad():
            # Start from a projection of the backbone's embeddings so similar tokens start close.
            emb = backbone.backbone.embedding.weight.detach().float().cpu()
            proj = torch.randn(emb.shape[1], r) / emb.shape[1] ** 0.5
            self.tok.copy_(_rms(emb @ proj))

    @torch.no_grad()
    def bind(self, backbone: MambaLM) -> None:
        """Copy the backbone layers' conv weights, A, dt_bias and D (after loading new weights)."""
        expected = DynamicsConfig.for_model(backbone.config, self.config.rank)
        if expected != self.config:
            raise ValueError(f"dynamics config {self.config} does not match the backbone ({expected})")
        for l, block in enumerate(backbone.backbone.layers):
            m = block.mixer
            self.conv_weight[l].copy_(m.conv1d.weight[:, 0, :])
            self.conv_bias[l].copy_(m.conv1d.bias)
            self.A[l].copy_(-torch.exp(m.A_log.float()))
            self.dt_bias[l].copy_(m.dt_bias)
            self.D[l].copy_(m.D)

    def _layer(self, l: int, h: torch.Tensor, conv_l: torch.Tensor):
        """The learned part of layer l's step, and its exact conv. h: [K, r]; conv_l: [K, C, W].
        Returns (h [K, r], new conv window [K, C, W], dt [K, H], x [K, H, P], B [K, H, N], C [K, H, N])."""
        cfg = self.config
        K, gn, per_group = h.shape[0], cfg.ngroups * cfg.d_state, cfg.nheads // cfg.ngroups
        last = conv_l[:, :, -1].float()                                        # [K, C]
        h = h + F.silu(_rms(last) @ self.read[l] + h @ self.mix[l])
        column = h @ self.write[l] + self.write_bias[l]                        # [K, C]
        dt = F.softplus(h @ self.dt[l] + self.dt_out_bias[l] + self.dt_bias[l])  # [K, H]
        window = torch.cat([conv_l[:, :, 1:].float(), column[:, :, None]], dim=-1)
        xbc = F.silu((window * self.conv_weight[l]).sum(-1) + self.conv_bias[l])
        x, B, C = torch.split(xbc, [cfg.d_inner, gn, gn], dim=-1)
        Bh = B.reshape(K, cfg.ngroups, cfg.d_state).repeat_interleave(per_group, dim=1)
        Ch = C.reshape(K, cfg.ngroups, cfg.d_state).repeat_interleave(per_group, dim=1)
        return h, window, dt, x.reshape(K, cfg.nheads, cfg.headdim), Bh, Ch

    def _logits(self, h: torch.Tensor, top_ssm: torch.Tensor, x: torch.Tensor, Ch: torch.Tensor) -> torch.Tensor:
        """Low-rank head over h [K, r] and the top layer's output C . ssm + D x -> [K, vocab_size]."""
        K = h.shape[0]
        y = torch.einsum("khpn,khn->khp", top_ssm.float(), Ch) + x * self.D[-1][None, :, None]
        z = _rms(h + y.reshape(K, self.config.d_inner) @ self.read_y) * self.head_norm
        return (z @ self.head)[:, : self.config.vocab_size]

    def forward(self, tokens: torch.Tensor, conv: torch.Tensor,
                ssm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Functional step (differentiable, for training). tokens: [K]; conv: [L, K, C, W];
        ssm: [L, K, H, P, N]. Returns (logits [K, vocab_size], new conv, new ssm)."""
        h = self.tok[tokens].float()
        new_convs, new_ssms = [], []
        for l in range(self.config.n_layer):
            h, window, dt, x, Bh, Ch = self._layer(l, h, conv[l])
            decay = torch.exp(dt * self.A[l])                                   # [K, H]
            new = ssm[l].float() * decay[:, :, None, None] + (dt[:, :, None] * x)[..., None] * Bh[:, :, None, :]
            new_convs.append(window.to(conv.dtype))
            new_ssms.append(new.to(ssm.dtype))
        # x and Ch are the top layer's, from the last iteration
        return self._logits(h, new_ssms[-1], x, Ch), torch.stack(new_convs), torch.stack(new_ssms)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """tokens: [K]; state: K rows, advanced in place -> logits [K, vocab_size].

        Same math as `forward`, but the ssm update is done in place (scale, then one batched rank-1
        update per head) so a step makes two passes over the state instead of allocating new ones."""
        cfg = self.config
        K = tokens.shape[0]
        h = self.tok[tokens].float()
        for l in range(cfg.n_layer):
            h, window, dt, x, Bh, Ch = self._layer(l, h, state.conv[l])
            state.conv[l].copy_(window)
            ssm = state.ssm[l].view(K * cfg.nheads, cfg.headdim, cfg.d_state)   # rows are contiguous
            ssm.mul_(torch.exp(dt * self.A[l]).reshape(-1, 1, 1).to(ssm.dtype))
            ssm.baddbmm_((dt[:, :, None] * x).reshape(-1, cfg.headdim, 1).to(ssm.dtype),
                         Bh.reshape(-1, 1, cfg.d_state).to(ssm.dtype))
        return self._logits(h, state.ssm[-1], x, Ch)

    def step_cost(self) -> StepCost:
        """Flops of one `step` for one row (counted like `backbone_step_cost`)."""
        c = self.config
        r, C, H, hpn = c.rank, c.conv_dim, c.nheads, c.nheads * c.headdim * c.d_state
        per_layer_mm = 2 * C * r + 2 * r * r + 2 * r * C + 2 * r * H           # read, mix, write, dt
        # norm, silu, column, conv taps; then the state update (scale + rank-1, 3 flops an element)
        per_layer_ew = 3 * C + 2 * r + C + 2 * C * c.d_conv + C + 3 * H + 3 * hpn + H * c.headdim
        top_mm = 2 * hpn + 2 * c.d_inner * r + 2 * r * c.padded_vocab_size     # C.state, read_y, head
        top_ew = 2 * c.d_inner + 6 * r
        return StepCost(matmul=c.n_layer * per_layer_mm + top_mm, elementwise=c.n_layer * per_layer_ew + top_ew)

    def save(self, directory: str | Path) -> None:
        save_component(directory, COMPONENT_NAME, self, self.config.to_dict())

    @classmethod
    def load(cls, directory: str | Path, backbone: MambaLM) -> "LatentDynamics":
        tensors, raw = load_component_state(directory, COMPONENT_NAME)
        module = cls(DynamicsConfig.from_dict(raw), backbone)
        check_state_dict(module.state_dict(), tensors, Path(directory) / f"{COMPONENT_NAME}.safetensors")
        module.load_state_dict(tensors)
        return module.to(backbone.device)


@dataclass
class LagFidelity:
    lag: int
    cosine: list[float]       # per layer, mean over rows, of cos(predicted ssm, exact ssm)
    rel_error: list[float]    # per layer, mean over rows, of |predicted - exact| / |exact|
    top1_agreement: float     # fraction of rows whose next-token argmax agrees


@torch.no_grad()
def fidelity(backbone: MambaLM, dynamics: StepFn, state: RecurrentState, tokens: torch.Tensor,
             lags: tuple[int, ...] = (1, 3, 8)) -> list[LagFidelity]:
    """Roll `state` (B rows, not modified) through `tokens [B, T]` with exact backbone steps and with
    `dynamics` (open loop: the dynamics feeds on its own predictions) and compare at each lag <= T."""
    if max(lags) > tokens.shape[1]:
        raise ValueError(f"lags {lags} need at least {max(lags)} tokens, got {tokens.shape[1]}")
    exact, predicted = state.clone(), state.clone()
    reports = []
    for t in range(1, max(lags) + 1):
        exact_logits = backbone.step(tokens[:, t - 1], exact)
        predicted_logits = dynamics(tokens[:, t - 1], predicted)
        if t not in lags:
            continue
        e, p = exact.ssm.float().flatten(2), predicted.ssm.float().flatten(2)   # [L, B, X]
        cos = F.cosine_similarity(p, e, dim=2).mean(dim=1)
        rel = ((p - e).norm(dim=2) / e.norm(dim=2).clamp_min(1e-12)).mean(dim=1)
        agree = (exact_logits.argmax(-1) == predicted_logits.argmax(-1)).float().mean().item()
        reports.append(LagFidelity(t, cos.tolist(), rel.tolist(), agree))
    return reports


def distillation_loss(dynamics: LatentDynamics, backbone: MambaLM, state: RecurrentState,
                      tokens: torch.Tensor) -> torch.Tensor:
    """One-step distillation loss from `state` (K rows, not modified) on `tokens [K]`: per-layer
    relative squared error of the ssm state plus KL(exact next-token distribution || predicted)."""
    with torch.no_grad():
        exact = state.clone()
        exact_logits = backbone.step(tokens, exact)
    logits, _, ssm = dynamics(tokens, state.conv, state.ssm)
    e, p = exact.ssm.float().flatten(2), ssm.float().flatten(2)
    state_loss = ((p - e).pow(2).sum(2) / e.pow(2).sum(2).clamp_min(1e-12)).mean()
    kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(exact_logits.float(), -1),
                  log_target=True, reduction="batchmean")
    return state_loss + kl
