"""Gated per-layer injection of planner targets into a generator's recurrent state.

Position t = tokens consumed; S_t = state after them. An entry for target position p carries the
planner's target T_p and per-layer gates alpha. The generator hands its state to `apply_due` when it
holds S_q, just before the step that consumes token q:

- q == p: S_p <- (1 - alpha_i) S_p + alpha_i T_i per layer (ssm; conv only with blend_conv) -> APPLIED
- p < q <= p + max_lag: T is fast-forwarded through the tokens actually generated at p..q-1 (exact
  backbone steps) and alpha is decayed by delta_decay ** (q - p) -> APPLIED_LATE
- q > p + max_lag -> PRUNED; another generation's entry, a non-finite target (before or after the
  fast-forward) or gate, or a target whose ssm norm in a gated layer exceeds `max_target_norm_ratio`
  times the live state's -> REJECTED; an entry whose heads disagreed -> VETOED.

The norm bound exists because a finite but huge target is as harmful as a non-finite one: blended at
alpha 0.05 it leaves a state of the same order, which overflows or drowns the model's own state
(measured on the default model: a target of 1e38 everywhere gives NaN logits at the next step; one of
1e30 leaves ssm entries near 4e28 for the next 100 steps). Targets of a working planner stand within a
few times the live norm (measured: at most 3.1x, tiny random and default models, dynamics and exact
search), so the default of 10 leaves a wide margin while bounding one blend's growth of a layer's
norm to 1 + alpha * (ratio - 1) (1.45x at alpha 0.05). The live norm is the one the producer measured
on the snapshot its plan started from (`reference_norms`, S_t, a few positions before S_p), so that the
generator never waits for the device to compare; an entry without it is compared with the state at
hand.

Every entry put into a buffer leaves it exactly once, through one of these outcomes, and is counted.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Sequence

import torch

from .state import RecurrentState
from .streams import hand_over, wait

# (tokens [K], state K rows advanced in place) -> logits [K, V]
StepFn = Callable[[torch.Tensor, RecurrentState], torch.Tensor]

DEFAULT_MAX_TARGET_NORM_RATIO = 10.0  # see the module docstring


class InjectionOutcome(str, Enum):
    APPLIED = "applied"
    APPLIED_LATE = "applied_late"
    PRUNED = "pruned"
    VETOED = "vetoed"
    REJECTED = "rejected"


def default_layer_weights(n_layer: int) -> torch.Tensor:
    """[L]: 0 for the lower half of the layers (syntax left alone), 1 for the upper half."""
    weights = torch.zeros(n_layer)
    weights[n_layer // 2:] = 1.0
    return weights


def gates(layer_values: torch.Tensor, injection_rate: float, layer_weights: torch.Tensor) -> torch.Tensor:
    """layer_values: [L] per-layer confidences -> alpha [L] = rate * weight_i * sigmoid(v_i)."""
    if layer_values.shape != layer_weights.shape:
        raise ValueError(f"layer_values {tuple(layer_values.shape)} and layer_weights "
                         f"{tuple(layer_weights.shape)} must both be [L]")
    return injection_rate * layer_weights.float().to(layer_values.device) * torch.sigmoid(layer_values.float())


@dataclass
class TargetEntry:
    """One planner result for one session."""
    generation_id: int
    target_position: int            # p: apply when the generator holds S_p
    captured_position: int          # t: the planner's snapshot was S_t
    action: int                     # a*: the planned token p
    target_state: RecurrentState    # 1 row: T_p, already fast-forwarded to `state_position`
    alpha: torch.Tensor             # [L] gates (all 0 when vetoed)
    vetoed: bool
    spread: float                   # std over the value heads of the chosen child
    planner_stats: dict[str, float] = field(default_factory=dict)
    state_position: int = -1        # the position target_state stands at (p unless caught up)
    captured_at: float = field(default_factory=time.monotonic)
    ready: torch.cuda.Event | None = None   # on the producer's stream, after target_state was written
    finite: bool = True             # every entry of target_state is finite (checked by the producer)
    norms: torch.Tensor | None = None   # [L] ssm norm of each layer of target_state (CPU; with `finite`)
    reference_norms: torch.Tensor | None = None  # [L] the same of the live state S_t the plan started from

    def __post_init__(self) -> None:
        if self.state_position < 0:
            self.state_position = self.target_position
        if self.target_state.batch != 1:
            raise ValueError(f"a target holds one row, got {self.target_state.batch}")
        self.refresh_finite()

    def refresh_finite(self) -> None:
        """Recheck `finite` (a device sync: done by whoever last wrote the target, so that the generator
        does not wait for the GPU to find out)."""
        self.finite = bool(self.target_state.is_finite().all())
        self.norms = self.target_state.layer_norms()[:, 0].cpu()


@dataclass(frozen=True)
class InjectionEvent:
    position: int               # the generator's position when the entry was resolved
    target_position: int
    captured_position: int
    generation_id: int
    outcome: InjectionOutcome
    alpha: list[float]          # the gates actually used (decayed when late; empty when not applied)
    lateness: int               # position - target_position (0 when on time or resolved early)
    action: int
    reason: str
    latency_s: float            # from the planner's snapshot to resolution

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "target_position": self.target_position,
                "captured_position": self.captured_position, "generation_id": self.generation_id,
                "outcome": self.outcome.value, "alpha": self.alpha, "lateness": self.lateness,
                "action": self.action, "reason": self.reason, "latency_s": self.latency_s}


@dataclass
class InjectionCounters:
    produced: int = 0
    applied: int = 0
    applied_late: int = 0
    pruned: int = 0
    vetoed: int = 0
    rejected: int = 0

    def count(self, outcome: InjectionOutcome) -> None:
        name = outcome.value
        setattr(self, name, getattr(self, name) + 1)

    @property
    def resolved(self) -> int:
        return self.applied + self.applied_late + self.pruned + self.vetoed + self.rejected

    def as_dict(self) -> dict[str, int]:
        return {"produced": self.produced, "applied": self.applied, "applied_late": self.applied_late,
                "pruned": self.pruned, "vetoed": self.vetoed, "rejected": self.rejected}


def check_norm_ratio(ratio: float) -> None:
    """max_target_norm_ratio must be a finite number >= 1: below 1 even a target equal to the live
    state would be refused, and an infinite bound is no bound."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"max_target_norm_ratio must be a finite number >= 1, got {ratio!r}")


def catch_up(entry: TargetEntry, tokens: Sequence[int], until: int, step_fn: StepFn) -> None:
    """Advance entry.target_state in place through tokens[state_position:until] (exact steps)."""
    if until < entry.state_position:
        raise ValueError(f"target stands at {entry.state_position}, past position {until}")
    if until == entry.state_position:
        return
    device = entry.target_state.ssm.device
    ids = torch.as_tensor(list(tokens[entry.state_position:until]), dtype=torch.long, device=device)
    if ids.numel() != until - entry.state_position:
        raise ValueError(f"need the tokens at positions {entry.state_position}..{until - 1}, "
                         f"got {len(tokens)} tokens")
    for token in ids:
        step_fn(token.view(1), entry.target_state)
    entry.state_position = until


class TargetBuffer:
    """Pending planner results of one session, keyed by target position. `put` may be called from any
    thread; `apply_due` and `finish` from the generator's thread."""

    def __init__(self, generation_id: int, *, max_lag: int, delta_decay: float, blend_conv: bool = False,
                 max_target_norm_ratio: float = DEFAULT_MAX_TARGET_NORM_RATIO):
        if max_lag < 0 or not 0.0 <= delta_decay <= 1.0:
            raise ValueError("max_lag must be >= 0 and delta_decay in [0, 1]")
        check_norm_ratio(max_target_norm_ratio)
        self.generation_id = generation_id
        self.max_lag = max_lag
        self.delta_decay = delta_decay
        self.blend_conv = blend_conv
        self.max_target_norm_ratio = max_target_norm_ratio
        self.counters = InjectionCounters()
        self._pending: list[TargetEntry] = []   # arrival order
        self._lock = threading.Lock()
        self._finished = False

    def put(self, entry: TargetEntry) -> None:
        with self._lock:
            if self._finished:
                raise RuntimeError("put into a finished target buffer")
            self._pending.append(entry)
            self.counters.produced += 1

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _take(self, position: int, everything: bool) -> list[TargetEntry]:
        """Remove and return the entries to resolve now: due ones and foreign ones."""
        due, keep = [], []
        with self._lock:
            for e in self._pending:
                now = everything or e.target_position <= position or e.generation_id != self.generation_id
                (due if now else keep).append(e)
            self._pending = keep
        return sorted(due, key=lambda e: e.target_position)

    def _event(self, entry: TargetEntry, position: int, outcome: InjectionOutcome, reason: str,
               alpha: torch.Tensor | None = None) -> InjectionEvent:
        self.counters.count(outcome)
        return InjectionEvent(
            position=position, target_position=entry.target_position,
            captured_position=entry.captured_position, generation_id=entry.generation_id, outcome=outcome,
            alpha=[] if alpha is None else [float(a) for a in alpha],
            lateness=max(0, position - entry.target_position),
            action=entry.action, reason=reason, latency_s=time.monotonic() - entry.captured_at)

    def apply_due(self, position: int, state_row: RecurrentState, generated_tokens: Sequence[int],
                  step_fn: StepFn) -> list[InjectionEvent]:
        """Resolve every entry due at `position`, blending applied ones into `state_row` (1 row, S_q).

        generated_tokens[i] is the token at position i (prompt included); at least `position` of them.
        step_fn is the exact backbone step used to fast-forward late targets."""
        events = []
        for entry in self._take(position, everything=False):
            if entry.generation_id != self.generation_id:
                events.append(self._event(entry, position, InjectionOutcome.REJECTED,
                                          f"generation {entry.generation_id} != {self.generation_id}"))
                continue
            if not entry.finite:
                events.append(self._event(entry, position, InjectionOutcome.REJECTED, "non-finite target"))
                continue
            if not bool(torch.isfinite(entry.alpha).all()):
                # value heads that read a wild state can give NaN gates; blend_ would skip those layers
                # and the entry would count as applied with nothing applied
                events.append(self._event(entry, position, InjectionOutcome.REJECTED, "non-finite gates"))
                continue
            if entry.vetoed:
                events.append(self._event(entry, position, InjectionOutcome.VETOED,
                                          f"value heads disagree (spread {entry.spread:.4g})"))
                continue
            lateness = position - entry.target_position
            if lateness > self.max_lag:
                events.append(self._event(entry, position, InjectionOutcome.PRUNED,
                                          f"lateness {lateness} > max_lag {self.max_lag}"))
                continue
            wait(entry.ready)                 # the producer's stream has written the target
            hand_over(entry.target_state)
            stood_at = entry.state_position
            catch_up(entry, generated_tokens, position, step_fn)   # a no-op when on time
            if entry.state_position != stood_at:
                entry.refresh_finite()
                if not entry.finite:
                    events.append(self._event(entry, position, InjectionOutcome.REJECTED,
                                              "non-finite target after fast-forward"))
                    continue
            alpha = entry.alpha * self.delta_decay ** lateness
            too_large = self._norm_excess(entry, state_row, alpha)
            if too_large is not None:
                events.append(self._event(entry, position, InjectionOutcome.REJECTED, too_large))
                continue
            state_row.blend_(entry.target_state, alpha, blend_conv=self.blend_conv)
            outcome = InjectionOutcome.APPLIED if lateness == 0 else InjectionOutcome.APPLIED_LATE
            events.append(self._event(entry, position, outcome, "on time" if lateness == 0
                                      else f"late by {lateness}, decay {self.delta_decay ** lateness:.4g}",
                                      alpha))
        return events

    def _norm_excess(self, entry: TargetEntry, state_row: RecurrentState, alpha: torch.Tensor) -> str | None:
        """Why the entry's target is too large to blend, or None. Only gated layers (alpha > 0, CPU) count:
        the others are not touched. A norm that overflows float32 is inf and so always too large."""
        gated = torch.nonzero(alpha > 0).flatten().tolist()
        if not gated:
            return None
        live = entry.reference_norms if entry.reference_norms is not None else state_row.layer_norms()[:, 0]
        target_norms, live_norms = entry.norms.tolist(), live.tolist()
        for layer in gated:
            limit = self.max_target_norm_ratio * live_norms[layer]
            if not target_norms[layer] <= limit:
                return (f"target ssm norm {target_norms[layer]:.4g} in layer {layer} exceeds "
                        f"{self.max_target_norm_ratio:g} x the live state's {live_norms[layer]:.4g}")
        return None

    def finish(self, position: int) -> list[InjectionEvent]:
        """The generation ended at `position`: resolve what is left (never reached: PRUNED; foreign:
        REJECTED). Later `put`s raise."""
        events = []
        for entry in self._take(position, everything=True):
            if entry.generation_id != self.generation_id:
                events.append(self._event(entry, position, InjectionOutcome.REJECTED,
                                          f"generation {entry.generation_id} != {self.generation_id}"))
            else:
                events.append(self._event(entry, position, InjectionOutcome.PRUNED,
                                          "generation ended before its position"))
        with self._lock:
            self._finished = True
        return events

