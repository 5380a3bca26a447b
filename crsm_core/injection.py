"""What a plan delivers to its session, and how the generator uses it.

Position t = tokens consumed; S_t = the state after them; the step that consumes token t from S_t
gives S_{t+1} and the distribution of token t+1. A plan starts from the generator's S_t, advances its
own copy through the tokens it assumes the generator will emit (`assumed_tokens`, positions t..r-1),
and searches from S_r for token r (its `decision_position`). Its result is an entry with

- `action` a*: the planned token r, and the tokens a* beats by the adoption margin (`beats`);
- `target_state` T: the state of the child a*, i.e. what the model holds at position r + 1 had it
  read a* at r: a state of position `state_position` = r + 1.

The generator, holding S_q before choosing token q, resolves what is due (`TargetBuffer.due`):

1. q == r (the decision): if the tokens it emitted at t..r-1 are not the assumed ones the entry is
   DIVERGED; otherwise, with suggestions on and a* preferred over every alternative the search
   valued, token r is a* (the suggestion).
2. q == state_position: the entry is APPLIED. If the emitted token at r is a*, or one the plan does not
   judge worse by the margin, nothing needs changing (`effect` "suggested" or "none"). If a* beats the
   emitted token, T is blended into S_q, layer by layer, S <- (1 - alpha_i) S + alpha_i T: the state is
   moved toward having read a* (`effect` "blended"). Both states are of the same position and read the
   same tokens but the one at r, so the blend moves exactly that.
3. An entry that reaches its session after its state position is caught up: T is advanced with exact
   steps through the tokens the generator emitted since (`catch_up`, batched over entries; the
   planner's worker does all but the last token or two, the generator the rest, through the same
   function), alpha decays by delta_decay ** lateness, and it is APPLIED_LATE, or PRUNED when later
   than `max_lag`.
Besides: VETOED (the value heads disagree beyond the model's calibrated threshold) and REJECTED (another
generation's entry, a non-finite target or gate, or a target whose ssm norm in a gated layer exceeds
`max_target_norm_ratio` times the live state's).

Why the target is the child state applied one position after the decision (design.md, "Plan
semantics"): a state blended into S_r cannot change token r, whose distribution was read out of the
step that produced S_r; the only place a state can carry the plan's choice of token r is S_{r+1}.

The norm bound exists because a finite but huge target is as harmful as a non-finite one: blended at
alpha 0.05 it leaves a state of the same order, which overflows or drowns the model's own state
(measured on the default model: a target of 1e38 everywhere gives NaN logits at the next step; one of
1e30 leaves ssm entries near 4e28 for the next 100 steps). Targets of a working planner stand within a
few times the live norm, so the default of 10 leaves a wide margin while bounding one blend's growth
of a layer's norm to 1 + alpha * (ratio - 1) (1.45x at alpha 0.05). The live norm is the one the
producer measured on the snapshot its plan started from (`reference_norms`), so that the generator
never waits for the device to compare.

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

from .state import RecurrentState, StepFn
from .streams import hand_over, wait

DEFAULT_MAX_TARGET_NORM_RATIO = 10.0  # see the module docstring


class InjectionOutcome(str, Enum):
    APPLIED = "applied"              # reached its position on time
    APPLIED_LATE = "applied_late"    # caught up through the tokens emitted after its position
    PRUNED = "pruned"                # later than max_lag, or the session ended first
    VETOED = "vetoed"                # the value heads disagree
    DIVERGED = "diverged"            # the generator did not emit the tokens the plan assumed
    REJECTED = "rejected"            # failed a safety check


LANDED = (InjectionOutcome.APPLIED, InjectionOutcome.APPLIED_LATE)


class Effect(str, Enum):
    """What an applied entry did to the stream."""
    SUGGESTED = "suggested"   # its action was the token emitted at its decision position
    BLENDED = "blended"       # its state was blended in (a* beat the emitted token by the margin)
    NONE = "none"             # the emitted token was a*, or one the plan did not judge worse


def default_layer_weights(n_layer: int) -> torch.Tensor:
    """[L]: 0 for the lower half of the layers (syntax left alone), 1 for the upper half."""
    weights = torch.zeros(n_layer)
    weights[n_layer // 2:] = 1.0
    return weights


def gates(layer_values: torch.Tensor, injection_rate: float, layer_weights: torch.Tensor) -> torch.Tensor:
    """layer_values: [L] per-layer probabilities in [0, 1] -> alpha [L] = rate * weight_i * v_i."""
    if layer_values.shape != layer_weights.shape:
        raise ValueError(f"layer_values {tuple(layer_values.shape)} and layer_weights "
                         f"{tuple(layer_weights.shape)} must both be [L]")
    return injection_rate * layer_weights.float().to(layer_values.device) * layer_values.float()


@dataclass
class TargetEntry:
    """One plan's result for one session."""
    generation_id: int
    captured_position: int          # t: the plan started from the generator's S_t
    assumed_tokens: tuple[int, ...]  # the tokens it assumed at t .. decision_position - 1
    action: int                     # a*: the planned token at decision_position
    candidates: tuple[int, ...]     # the root's candidate tokens, highest prior first (exact logits)
    beats: frozenset[int]           # tokens a* is preferred to by the adoption margin (valued by the search)
    confident: bool                 # a* beats every other candidate the search valued
    value: float                    # the search's score of a*, a probability
    target_state: RecurrentState    # 1 row: the child state of a*, advanced to `state_position`
    alpha: torch.Tensor             # [L] gates, on the CPU (all 0 when vetoed)
    vetoed: bool
    spread: float                   # std over the value heads of a*'s values
    veto_threshold: float
    planner_stats: dict[str, float] = field(default_factory=dict)
    state_position: int = -1        # where target_state stands (decision_position + 1 unless caught up)
    captured_at: float = field(default_factory=time.monotonic)
    ready: torch.cuda.Event | None = None   # on the producer's stream, after target_state was written
    finite: bool = True             # every entry of target_state is finite (checked by the producer)
    norms: torch.Tensor | None = None   # [L] ssm norm of each layer of target_state (CPU; with `finite`)
    reference_norms: torch.Tensor | None = None  # [L] the same of the live state S_t the plan started from
    suggested: bool = False         # the generator emitted `action` as its suggestion

    def __post_init__(self) -> None:
        if self.state_position < 0:
            self.state_position = self.decision_position + 1
        if self.target_state.batch != 1:
            raise ValueError(f"a target holds one row, got {self.target_state.batch}")
        self.refresh_finite()

    @property
    def decision_position(self) -> int:
        """r: the position whose token the plan chose."""
        return self.captured_position + len(self.assumed_tokens)

    @property
    def lateness(self) -> int:
        """Positions the target had to be caught up through."""
        return self.state_position - self.decision_position - 1

    def refresh_finite(self) -> None:
        """Recheck `finite` and the norms (a device sync: done by whoever last wrote the target, so that
        the generator does not wait for the GPU to find out)."""
        self.finite = bool(self.target_state.is_finite().all())
        self.norms = self.target_state.layer_norms()[:, 0].cpu()


@dataclass(frozen=True)
class InjectionEvent:
    position: int               # the generator's position when the entry was resolved
    target_position: int        # the decision position r (the token the plan chose)
    state_position: int         # where its state stood when resolved
    captured_position: int
    generation_id: int
    outcome: InjectionOutcome
    effect: Effect | None       # for applied entries
    alpha: list[float]          # the gates used (decayed when late; empty when nothing was blended)
    lateness: int               # positions after its state position it was resolved (caught up through)
    action: int
    value: float
    reason: str
    latency_s: float            # from the planner's snapshot to resolution

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "target_position": self.target_position,
                "state_position": self.state_position, "captured_position": self.captured_position,
                "generation_id": self.generation_id, "outcome": self.outcome.value,
                "effect": None if self.effect is None else self.effect.value, "alpha": self.alpha,
                "lateness": self.lateness, "action": self.action, "value": self.value, "reason": self.reason,
                "latency_s": self.latency_s}


@dataclass
class InjectionCounters:
    produced: int = 0
    applied: int = 0
    applied_late: int = 0
    pruned: int = 0
    vetoed: int = 0
    diverged: int = 0
    rejected: int = 0
    suggested: int = 0     # applied entries by effect
    blended: int = 0

    def count(self, outcome: InjectionOutcome, effect: Effect | None) -> None:
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)
        if effect in (Effect.SUGGESTED, Effect.BLENDED):
            setattr(self, effect.value, getattr(self, effect.value) + 1)

    @property
    def resolved(self) -> int:
        return self.applied + self.applied_late + self.pruned + self.vetoed + self.diverged + self.rejected

    def as_dict(self) -> dict[str, int]:
        return {"produced": self.produced, "applied": self.applied, "applied_late": self.applied_late,
                "pruned": self.pruned, "vetoed": self.vetoed, "diverged": self.diverged,
                "rejected": self.rejected, "suggested": self.suggested, "blended": self.blended}


def check_norm_ratio(ratio: float) -> None:
    """max_target_norm_ratio must be a finite number >= 1: below 1 even a target equal to the live
    state would be refused, and an infinite bound is no bound."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"max_target_norm_ratio must be a finite number >= 1, got {ratio!r}")


# A gap of this many tokens or more is caught up by one chunked prefill (the SSD scan over all of them:
# on a GPU about the cost of a few steps whatever its length) instead of a step per token: a catch-up
# that costs a step per token never gains on a generator that emits a token per step.
PREFILL_CATCH_UP = 4
# (tokens [1, T] long, state 1 row, advanced in place) -> logits of the last position
PrefillFn = Callable[[torch.Tensor, RecurrentState], torch.Tensor]


def catch_up(entries: Sequence[TargetEntry], tokens: Sequence[Sequence[int]], until: Sequence[int],
             step: StepFn, prefill: PrefillFn | None = None, refresh: bool = True) -> None:
    """Advance each entry's target state (exact backbone computation) through the tokens its session
    emitted, from its state_position to until[i]: tokens[i][p] is the token at position p. Gaps of
    PREFILL_CATCH_UP tokens or more go through `prefill` (one call each) when given; the rest step
    together, one batched step per token. The one catch-up of late entries: the planner's worker and the
    generator both call it."""
    todo = [(e, t, u) for e, t, u in zip(entries, tokens, until) if u > e.state_position]
    for entry, toks, stop in todo:
        if len(toks) < stop:
            raise ValueError(f"catching up to position {stop} needs the tokens before it, got {len(toks)}")
    if not todo:
        return
    device = todo[0][0].target_state.ssm.device
    for entry, _, _ in todo:
        wait(entry.ready)
        hand_over(entry.target_state)
    if prefill is not None:
        for entry, toks, stop in todo:
            if stop - entry.state_position >= PREFILL_CATCH_UP:
                ids = torch.tensor([list(toks[entry.state_position:stop])], dtype=torch.long, device=device)
                prefill(ids, entry.target_state)
                entry.state_position = stop
        todo = [(e, t, u) for e, t, u in todo if u > e.state_position]
    while todo:
        states = RecurrentState.cat([e.target_state for e, _, _ in todo])
        ids = torch.tensor([t[e.state_position] for e, t, _ in todo], dtype=torch.long, device=device)
        step(ids, states)
        for k, (entry, _, _) in enumerate(todo):
            entry.target_state.copy_(states.rows(slice(k, k + 1)))
            entry.state_position += 1
        todo = [(e, t, u) for e, t, u in todo if u > e.state_position]
    if refresh:   # a device sync: the worker does it; the generator compares the worker's figures
        for entry in entries:
            entry.refresh_finite()


@dataclass(frozen=True)
class Verdict:
    outcome: InjectionOutcome
    reason: str
    effect: Effect | None = None


def verdict(entry: TargetEntry, tokens: Sequence[int], position: int, max_lag: int) -> Verdict | None:
    """How an entry resolves without being blended, given the tokens emitted before `position`
    (tokens[p] for p < position), or None when it still has something to do: reach its decision
    position, or be blended (its action beats the token emitted at its decision position). The one
    rule, used by the generator (TargetBuffer.due) and by the planner's worker for late entries."""
    if entry.vetoed:
        return Verdict(InjectionOutcome.VETOED,
                       f"value heads disagree: spread {entry.spread:.4g} > threshold {entry.veto_threshold:.4g}")
    r = entry.decision_position
    seen = min(position, r) - entry.captured_position
    emitted = tuple(tokens[entry.captured_position:entry.captured_position + seen])
    if emitted != entry.assumed_tokens[:seen]:
        at = next(i for i, (a, b) in enumerate(zip(emitted, entry.assumed_tokens)) if a != b)
        return Verdict(InjectionOutcome.DIVERGED, f"assumed token {entry.assumed_tokens[at]} at position "
                                                  f"{entry.captured_position + at}, the generator emitted {emitted[at]}")
    if position > r:
        arrived = InjectionOutcome.APPLIED if position <= r + 1 else InjectionOutcome.APPLIED_LATE
        if tokens[r] == entry.action:
            return Verdict(arrived, "the emitted token is the plan's",
                           Effect.SUGGESTED if entry.suggested else Effect.NONE)
        if tokens[r] not in entry.beats:
            return Verdict(arrived, f"no preference over the emitted token {tokens[r]}", Effect.NONE)
        if position - r - 1 > max_lag:
            return Verdict(InjectionOutcome.PRUNED, f"lateness {position - r - 1} > max_lag {max_lag}")
    if not entry.finite:
        return Verdict(InjectionOutcome.REJECTED, "non-finite target")
    if not bool(torch.isfinite(entry.alpha).all()):
        # value heads that read a wild state can give NaN gates; blend_ would skip those layers and the
        # entry would count as applied with nothing applied
        return Verdict(InjectionOutcome.REJECTED, "non-finite gates")
    return None


@dataclass
class Due:
    """What the generator must do for one session at one position (from `TargetBuffer.due`)."""
    suggestion: int | None = None                   # token to emit instead of the sampled one
    blends: list[TargetEntry] = field(default_factory=list)    # standing at the position: blend now
    behind: list[TargetEntry] = field(default_factory=list)    # stand before it: catch up, then blend
    events: list[InjectionEvent] = field(default_factory=list)


class TargetBuffer:
    """Pending plan results of one session. `put` may be called from any thread; `due`, `blend` and
    `finish` from the generator's thread."""

    def __init__(self, generation_id: int, *, max_lag: int, delta_decay: float, blend_conv: bool = False,
                 max_target_norm_ratio: float = DEFAULT_MAX_TARGET_NORM_RATIO, use_suggestions: bool = True):
        if max_lag < 0 or not 0.0 <= delta_decay <= 1.0:
            raise ValueError("max_lag must be >= 0 and delta_decay in [0, 1]")
        check_norm_ratio(max_target_norm_ratio)
        self.generation_id = generation_id
        self.max_lag = max_lag
        self.delta_decay = delta_decay
        self.blend_conv = blend_conv
        self.max_target_norm_ratio = max_target_norm_ratio
        self.use_suggestions = use_suggestions
        self.counters = InjectionCounters()
        self._pending: list[TargetEntry] = []   # arrival order
        self._resolved: list[tuple[TargetEntry, Verdict]] = []  # resolved by the producer, reported at the next position
        self._lock = threading.Lock()
        self._finished = False

    # ---- producer side -----------------------------------------------------------------------

    def put(self, entry: TargetEntry) -> None:
        with self._lock:
            if self._finished:
                raise RuntimeError("put into a finished target buffer")
            self._pending.append(entry)
            self.counters.produced += 1

    def put_resolved(self, entry: TargetEntry, resolution: Verdict) -> None:
        """An entry its producer already resolved (`verdict` on the tokens emitted so far): its event is
        made, at the generator's position then, and counted at the generator's next position."""
        with self._lock:
            if self._finished:
                raise RuntimeError("put into a finished target buffer")
            self.counters.produced += 1
            self._resolved.append((entry, resolution))

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # ---- generator side ----------------------------------------------------------------------

    def _event(self, entry: TargetEntry, position: int, resolution: Verdict,
               alpha: torch.Tensor | None = None) -> InjectionEvent:
        self.counters.count(resolution.outcome, resolution.effect)
        return InjectionEvent(
            position=position, target_position=entry.decision_position, state_position=entry.state_position,
            captured_position=entry.captured_position, generation_id=entry.generation_id,
            outcome=resolution.outcome, effect=resolution.effect,
            alpha=[] if alpha is None else [float(a) for a in alpha],
            lateness=max(0, position - entry.decision_position - 1), action=entry.action,
            value=entry.value, reason=resolution.reason, latency_s=time.monotonic() - entry.captured_at)

    def due(self, position: int, tokens: Sequence[int]) -> Due:
        """At S_position, before token `position` is chosen; tokens[p] for every p < position.
        Resolves what can be resolved and says what the generator must do (see the module docstring)."""
        out = Due()
        with self._lock:
            resolved, self._resolved = self._resolved, []
            entries, self._pending = self._pending, []
        out.events = [self._event(entry, position, found) for entry, found in resolved]
        keep = []
        for entry in entries:
            found = Verdict(InjectionOutcome.REJECTED, f"generation {entry.generation_id} != {self.generation_id}") \
                if entry.generation_id != self.generation_id else verdict(entry, tokens, position, self.max_lag)
            if found is not None:
                out.events.append(self._event(entry, position, found))
            elif entry.decision_position == position:
                if self.use_suggestions and entry.confident and out.suggestion is None:
                    out.suggestion = entry.action
                    entry.suggested = True
                keep.append(entry)
            elif entry.decision_position > position or entry.state_position > position:
                keep.append(entry)
            elif entry.state_position == position:
                out.blends.append(entry)
            else:
                out.behind.append(entry)
        with self._lock:
            self._pending.extend(keep)
        return out

    def blend(self, entry: TargetEntry, position: int, state_row: RecurrentState) -> InjectionEvent:
        """Resolve an entry whose target stands at `position` and whose action beats the emitted token
        (from `due`): state_row (S_position, 1 row) is blended toward it in place."""
        outcome = InjectionOutcome.APPLIED if entry.lateness == 0 else InjectionOutcome.APPLIED_LATE
        if not entry.finite:
            return self._event(entry, position, Verdict(InjectionOutcome.REJECTED, "non-finite target after catch-up"))
        alpha = entry.alpha * self.delta_decay ** entry.lateness
        too_large = self._norm_excess(entry, state_row, alpha)
        if too_large is not None:
            return self._event(entry, position, Verdict(InjectionOutcome.REJECTED, too_large))
        wait(entry.ready)                 # the producer's stream has written the target
        hand_over(entry.target_state)
        state_row.blend_(entry.target_state, alpha, blend_conv=self.blend_conv)
        reason = "on time" if entry.lateness == 0 else \
            f"caught up through {entry.lateness} tokens, decay {self.delta_decay ** entry.lateness:.4g}"
        return self._event(entry, position, Verdict(outcome, reason, Effect.BLENDED), alpha)

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

    def finish(self, position: int, tokens: Sequence[int]) -> list[InjectionEvent]:
        """The generation ended at `position` (tokens[p] for p < position): resolve what is left, by the
        tokens where they decide (`verdict`), else PRUNED; foreign entries REJECTED. Later `put`s raise."""
        with self._lock:
            resolved, self._resolved = self._resolved, []
            entries, self._pending = self._pending, []
            self._finished = True
        events = [self._event(entry, position, found) for entry, found in resolved]
        for entry in entries:
            if entry.generation_id != self.generation_id:
                found = Verdict(InjectionOutcome.REJECTED, f"generation {entry.generation_id} != {self.generation_id}")
            else:
                found = verdict(entry, tokens, position, self.max_lag)
                if found is None:
                    found = Verdict(InjectionOutcome.PRUNED, "generation ended before its position")
            events.append(self._event(entry, position, found))
        return events
