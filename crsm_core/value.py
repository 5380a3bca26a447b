"""Consensus value heads: one small head per layer, each reading only its own layer's state.

Every head estimates the same thing (the probability that the continuation from this state succeeds),
from a different depth of the model. The planner reads them as probabilities (sigmoid of each head's
logit); their mean is the value, their spread (std over heads of the probabilities) the uncertainty.
A plan whose heads disagree by more than `veto_threshold` is vetoed: the threshold is a percentile of
the spread the heads show on held-out states (stage 3 measures it and stores it here), not a
constant, so that a veto means "more disagreement than these heads usually show".

Features per layer l and row b: the ssm state `[H, P, N]` pooled over N (-> [H*P]) and over P
(-> [H*N]), concatenated and RMS-normalised, so the heads see the state's direction, not its scale
(the scale grows with context length). All layers' heads run as one batched einsum.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import check_state_dict, load_component_state, save_component
from .config import MambaConfig
from .state import RecurrentState

COMPONENT_NAME = "value_heads"


@dataclass(frozen=True)
class ValueHeadsConfig:
    n_layer: int
    nheads: int
    headdim: int
    d_state: int
    hidden: int = 64
    veto_threshold: float | None = None   # calibrated spread threshold (None: not measured)
    veto_percentile: float | None = None  # the percentile of held-out spreads it is
    # whether the heads rank sibling candidates better than the LM prior does on held-out branch points
    # (stage 3); None: not measured. The search uses them only when True.
    beats_prior: bool | None = None

    def __post_init__(self) -> None:
        for name in ("n_layer", "nheads", "headdim", "d_state", "hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ValueHeadsConfig.{name} must be positive, got {getattr(self, name)}")
        if self.veto_threshold is not None and not self.veto_threshold >= 0:
            raise ValueError(f"ValueHeadsConfig.veto_threshold must be >= 0, got {self.veto_threshold}")

    @classmethod
    def for_model(cls, config: MambaConfig, hidden: int = 64) -> "ValueHeadsConfig":
        s = config.ssm_cfg
        return cls(n_layer=config.n_layer, nheads=config.nheads, headdim=s.headdim, d_state=s.d_state,
                   hidden=hidden)

    @property
    def n_features(self) -> int:
        return self.nheads * (self.headdim + self.d_state)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ValueHeadsConfig":
        return cls(**raw)


class ValueHeads(nn.Module):
    """`forward(state) -> [B, L]`: head l reads layer l only (pooled ssm -> RMS norm -> MLP -> scalar)."""

    def __init__(self, config: ValueHeadsConfig):
        super().__init__()
        self.config = config
        L, F_, H = config.n_layer, config.n_features, config.hidden
        self.w1 = nn.Parameter(torch.randn(L, F_, H) / F_ ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(L, H))
        self.w2 = nn.Parameter(torch.randn(L, H) / H ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(L))

    def features(self, ssm: torch.Tensor) -> torch.Tensor:
        """ssm: [L, B, H, P, N] -> [L, B, F] RMS-normalised pooled features."""
        # means accumulated in float32 without a float32 copy of the (large, often bf16) state
        pooled = torch.cat([ssm.mean(dim=-1, dtype=torch.float32).flatten(2),
                            ssm.mean(dim=-2, dtype=torch.float32).flatten(2)], dim=-1)
        return pooled * torch.rsqrt(pooled.pow(2).mean(dim=-1, keepdim=True) + 1e-6)

    def forward(self, state: RecurrentState) -> torch.Tensor:
        """state: B rows -> values [B, L]."""
        x = self.features(state.ssm)                                          # [L, B, F]
        h = F.silu(torch.einsum("lbf,lfh->lbh", x, self.w1.float()) + self.b1.float()[:, None])
        v = torch.einsum("lbh,lh->lb", h, self.w2.float()) + self.b2.float()[:, None]
        return v.transpose(0, 1)                                              # [B, L]

    def save(self, directory: str | Path) -> None:
        save_component(directory, COMPONENT_NAME, self, self.config.to_dict())

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "ValueHeads":
        tensors, raw = load_component_state(directory, COMPONENT_NAME)
        heads = cls(ValueHeadsConfig.from_dict(raw))
        check_state_dict(heads.state_dict(), tensors, Path(directory) / f"{COMPONENT_NAME}.safetensors")
        heads.load_state_dict(tensors)
        return heads.to(device)


def spread(values: torch.Tensor) -> torch.Tensor:
    """values: [..., L] per-head probabilities -> [...] population std over heads (0 for a single head)."""
    return values.float().std(dim=-1, correction=0)


def calibrate_veto(probabilities: torch.Tensor, percentile: float = 99.0) -> float:
    """probabilities: [N, L] the heads' probabilities on held-out states -> the spread at `percentile`:
    the veto threshold, above which a plan's heads disagree more than they do on (100 - percentile)%
    of states."""
    if probabilities.dim() != 2 or probabilities.shape[0] == 0:
        raise ValueError(f"need [N > 0, L] probabilities, got {tuple(probabilities.shape)}")
    return float(torch.quantile(spread(probabilities), percentile / 100.0))
