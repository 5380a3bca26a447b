"""Recurrent decoding state for a pool of rows.

Per layer l and row b the state is `conv[l, b]: [conv_dim, d_conv]` (the last d_conv inputs of the
depthwise convolution) and `ssm[l, b]: [nheads, headdim, d_state]`. Layers are stacked in one tensor
each, so that clone / gather / blend are single kernels and `conv[l]` is a contiguous per-layer view
that kernels (and captured graphs) can update in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import MambaConfig


@dataclass
class RecurrentState:
    conv: torch.Tensor  # [L, B, conv_dim, d_conv]
    ssm: torch.Tensor   # [L, B, nheads, headdim, d_state]

    @classmethod
    def allocate(cls, config: MambaConfig, batch: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> "RecurrentState":
        s = config.ssm_cfg
        conv = torch.zeros(config.n_layer, batch, config.conv_dim, s.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(config.n_layer, batch, config.nheads, s.headdim, s.d_state, device=device,
                          dtype=dtype)
        return cls(conv, ssm)

    @staticmethod
    def bytes_per_row(config: MambaConfig, dtype: torch.dtype = torch.float32) -> int:
        s = config.ssm_cfg
        elems = config.n_layer * (config.conv_dim * s.d_conv + config.nheads * s.headdim * s.d_state)
        return elems * torch.empty((), dtype=dtype).element_size()

    @property
    def batch(self) -> int:
        return self.conv.shape[1]

    @property
    def n_layer(self) -> int:
        return self.conv.shape[0]

    @staticmethod
    def cat(states: "list[RecurrentState]") -> "RecurrentState":
        """A new state holding the rows of `states`, in order."""
        return RecurrentState(torch.cat([s.conv for s in states], dim=1), torch.cat([s.ssm for s in states], dim=1))

    def clone(self) -> "RecurrentState":
        return RecurrentState(self.conv.clone(), self.ssm.clone())

    def rows(self, index: slice) -> "RecurrentState":
        """A view of a contiguous range of rows; writes go to this pool."""
        return RecurrentState(self.conv[:, index], self.ssm[:, index])

    def gather(self, rows: torch.Tensor | list[int]) -> "RecurrentState":
        """A copy of the given rows, in that order. rows: [R] long."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.conv.device)
        return RecurrentState(self.conv.index_select(1, idx), self.ssm.index_select(1, idx))

    def scatter_(self, rows: torch.Tensor | list[int], source: "RecurrentState") -> None:
        """Write source's rows (in order) into the given rows of this state."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.conv.device)
        self.conv.index_copy_(1, idx, source.conv.to(self.conv.dtype))
        self.ssm.index_copy_(1, idx, source.ssm.to(self.ssm.dtype))

    def copy_(self, source: "RecurrentState") -> None:
        self.conv.copy_(source.conv)
        self.ssm.copy_(source.ssm)

    def zero_(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()

    def blend_(self, target: "RecurrentState", alpha: torch.Tensor, blend_conv: bool = False) -> None:
        """S <- (1 - alpha_l) S + alpha_l T, layer by layer, in place.

        alpha: [L] (same gate for every row) or [L, B]. A layer with alpha 0 is left bit-identical
        (it is not rewritten); the convex combination never leaves the segment between S and T.
        """
        alpha = alpha.to(torch.float32)
        if alpha.dim() == 1:
            alpha = alpha[:, None].expand(self.n_layer, self.batch)
        if alpha.shape != (self.n_layer, self.batch):
            raise ValueError(f"alpha must be [L] or [L, B] = [{self.n_layer}, {self.batch}], "
                             f"got {tuple(alpha.shape)}")
        # Which layers to touch is read where alpha lives (the planner's gates are on the CPU), so that a
        # blend into a GPU state queues its kernels without waiting for the device.
        layers = torch.nonzero(alpha.abs().sum(dim=1) > 0).flatten().tolist()
        alpha = alpha.to(self.ssm.device)
        tensors = [(self.ssm, target.ssm)] + ([(self.conv, target.conv)] if blend_conv else [])
        for layer in layers:
            a = alpha[layer]
            for mine, theirs in tensors:
                view = a.view(-1, *([1] * (mine.dim() - 2)))
                mixed = torch.lerp(mine[layer].float(), theirs[layer].to(mine.device).float(), view)
                # rows whose alpha is 0 keep their exact bits
                keep = (a == 0).view_as(view)
                mine[layer].copy_(torch.where(keep, mine[layer].float(), mixed).to(mine.dtype))

    def is_finite(self) -> torch.Tensor:
        """[B] bool: every entry of that row is finite."""
        conv_ok = torch.isfinite(self.conv).flatten(2).all(dim=2).all(dim=0)
        ssm_ok = torch.isfinite(self.ssm).flatten(2).all(dim=2).all(dim=0)
        return conv_ok & ssm_ok

    def layer_norms(self) -> torch.Tensor:
        """[L, B] Frobenius norm of each layer's ssm state."""
        return self.ssm.float().flatten(2).norm(dim=2)


# One decode step: (tokens [K] long, state with K rows, advanced in place) -> logits [K, V]. The
# backbone's `step`, the latent dynamics model's, a captured replay of either and a ride in the
# generator's batch all have this shape, and everything that steps states takes one.
StepFn = Callable[[torch.Tensor, RecurrentState], torch.Tensor]
