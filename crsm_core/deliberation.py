"""One session's planner (System 2), running beside its generator (System 1) without blocking it.

The generator, holding S_q before it chooses token q, calls

    due = deliberator.due(q, tokens)          # what plans ask of this position (injection.py)
    ... catch up / blend what is due, use the suggestion ...
    deliberator.observe(q, state_row, logits, drawn)   # start a plan from S_q if the planner is idle

`observe` never waits: it clones S_q and hands it, as plain data (`PlanRequest`), to the model's
`PlannerRuntime` (one worker thread that batches the plans of all sessions); when the plan is done its
entry lands in this session's `TargetBuffer`, which the generator reads at the positions the entry
concerns. While a plan is in flight the planner is busy and later positions are skipped.

A lead window (`lead_window` W) plans the first W positions of a completion synchronously and the rest
asynchronously: time to think about how an answer starts, counted in the time to first token.

Asynchronous (the default): a plan speculates `lag` tokens (or, with `lag` None, as many as the
measured latency says it can afford: planner/runtime.py `LeadEstimator`) and plans for the position it
reaches; whether it arrives in time depends on how fast planner and generator run, so which positions
get a plan, and so the output, are timing-dependent. Synchronous (`synchronous`): every position gets
a plan made from the generator's own state, and the generator parks the session (its row leaves the
batch; the others go on) until the plan for the position it has reached is in, at most
`synchronous_timeout_s`: the output is then a function of the request alone.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .files import read_text
from .injection import (DEFAULT_MAX_TARGET_NORM_RATIO, Due, InjectionEvent, TargetBuffer, Verdict,
                        check_norm_ratio, default_layer_weights)
from .planner import PlannerConfig
from .planner.runtime import PlanCancelled, PlannerRuntime, PlanRequest, PlanResult, TokenLog
from .sampling import SamplingParams
from .state import RecurrentState
from .streams import record_current

logger = logging.getLogger(__name__)

StepMode = Literal["exact", "dynamics"]

DELIBERATION_FILE = "crsm.json"  # a model directory's deliberation defaults
# The latent dynamics model may replace exact steps only where its next-token agreement with them
# (top-1, one step, held-out text: the model's training report) reaches this. Below it the plans it
# speculates are not the generator's tokens (at 0.55, three tokens agree 17% of the time), and priors
# from its head are not the model's (deliberation-forensics B5, B6).
DYNAMICS_MIN_TOP1 = 0.9
# Without a calibrated threshold in the model directory: no plan is vetoed for the heads' spread.
UNCALIBRATED_VETO = float("inf")


def load_deliberation_config(directory: str | Path) -> "DeliberationConfig":
    """A model directory's deliberation defaults (crsm.json), or the built-in defaults without one."""
    path = Path(directory) / DELIBERATION_FILE
    if not path.exists():
        return DeliberationConfig()
    text = read_text(path, ValueError)
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON object was expected, not {type(raw).__name__}")
        return DeliberationConfig.from_dict(raw)
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


@dataclass(frozen=True)
class DeliberationConfig:
    enabled: bool = True
    lag: int | None = None            # tokens a plan speculates before its root; None: from the measured latency
    max_lead: int = 32                # the most a latency-aware plan speculates
    max_lag: int = 64                 # an entry more positions late than this is pruned
    delta_decay: float = 0.9          # late entries: alpha * delta_decay ** lateness
    injection_rate: float = 0.05      # the seed's experimental sweet spot
    layer_weights: tuple[float, ...] | None = None   # None: 0 for the lower half, 1 for the upper
    veto_threshold: float | None = None  # std over the heads' probabilities above which a plan is vetoed;
                                         # None: the model's calibrated threshold (value_heads.json)
    # a target whose ssm norm in a gated layer is above this multiple of the live state's is rejected
    max_target_norm_ratio: float = DEFAULT_MAX_TARGET_NORM_RATIO
    blend_conv: bool = False          # also blend the conv state
    steps: StepMode = "exact"         # how plans step states: the backbone, or the latent dynamics model
    use_suggestions: bool = True      # a confident plan's token replaces the sampled one when it is in time
    adoption_margin: float = 0.05     # a* must beat an alternative's value (a probability) by this to act
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    verifier: str | None = None       # score plans by this checker (one the server knows), not the heads
    synchronous: bool = False         # a plan for every position; the session waits for it (deterministic)
    lead_window: int = 0              # the first this many completion positions are planned synchronously
    synchronous_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.lag is not None and self.lag < 0:
            raise ValueError(f"lag must be >= 0 or null, got {self.lag}")
        for name in ("max_lead", "max_lag"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.delta_decay <= 1.0:
            raise ValueError(f"delta_decay must be in [0, 1], got {self.delta_decay}")
        if not 0.0 <= self.injection_rate <= 1.0:
            raise ValueError(f"injection_rate must be in [0, 1], got {self.injection_rate}")
        if self.veto_threshold is not None and not self.veto_threshold >= 0:
            raise ValueError(f"veto_threshold must be >= 0 or null, got {self.veto_threshold}")
        if not 0.0 <= self.adoption_margin <= 1.0:
            raise ValueError(f"adoption_margin must be in [0, 1], got {self.adoption_margin}")
        if self.lead_window < 0:
            raise ValueError(f"lead_window must be >= 0, got {self.lead_window}")
        if not self.synchronous_timeout_s > 0:
            raise ValueError(f"synchronous_timeout_s must be > 0, got {self.synchronous_timeout_s}")
        check_norm_ratio(self.max_target_norm_ratio)
        if self.steps not in ("exact", "dynamics"):
            raise ValueError(f"steps must be 'exact' or 'dynamics', got {self.steps!r}")
        if self.layer_weights is not None and any(not 0.0 <= w <= 1.0 for w in self.layer_weights):
            raise ValueError("layer_weights must be in [0, 1]")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DeliberationConfig":
        """From JSON-shaped settings (a model's crsm.json, a training config); missing keys take the defaults."""
        values = dict(raw)
        planner = values.pop("planner", {})
        if not isinstance(planner, dict):
            raise ValueError("planner must be a mapping")
        if values.get("layer_weights") is not None:
            values["layer_weights"] = tuple(values["layer_weights"])
        try:
            return cls(planner=PlannerConfig(**planner), **values)
        except TypeError as e:  # unknown or missing fields
            raise ValueError(str(e)) from e

    def weights(self, n_layer: int) -> torch.Tensor:
        """[L] layer weights for a model of n_layer layers."""
        if self.layer_weights is None:
            return default_layer_weights(n_layer)
        if len(self.layer_weights) != n_layer:
            raise ValueError(f"layer_weights has {len(self.layer_weights)} entries for {n_layer} layers")
        return torch.tensor(self.layer_weights, dtype=torch.float32)


@dataclass
class PlannerCounters:
    launched: int = 0     # plans started (snapshots taken)
    skipped: int = 0      # positions observed while the planner was busy
    cancelled: int = 0    # plans stopped by close() before producing a result
    failed: int = 0       # plans that raised (logged)
    simulations: int = 0  # MCTS simulations run by the plans that finished
    state_steps: int = 0  # rows advanced by one token (speculation and expansions) by those plans
    waited: int = 0       # synchronous: positions the session was parked for its plan
    timed_out: int = 0    # synchronous: waits that ran past synchronous_timeout_s

    def as_dict(self) -> dict[str, int]:
        return {"launched": self.launched, "skipped": self.skipped, "cancelled": self.cancelled,
                "failed": self.failed, "simulations": self.simulations, "state_steps": self.state_steps,
                "waited": self.waited, "timed_out": self.timed_out}


class SessionDeliberator:
    """One session's side of deliberation: its settings, target buffer, counters and the plan in flight.
    The plans themselves are computed by the model's `PlannerRuntime`, batched with other sessions'.
    Every method but `counters` is called from the generator's thread."""

    def __init__(self, runtime: PlannerRuntime, config: DeliberationConfig, generation_id: int, *,
                 tokens: TokenLog, sampling: SamplingParams, seed: int, veto_threshold: float,
                 notify: Callable[[], None] | None = None):
        self.runtime = runtime
        self.config = config
        self.generation_id = generation_id
        self.tokens = tokens
        self.sampling, self.seed = sampling, seed
        self.veto_threshold = config.veto_threshold if config.veto_threshold is not None else veto_threshold
        self.buffer = TargetBuffer(generation_id, max_lag=config.max_lag, delta_decay=config.delta_decay,
                                   blend_conv=config.blend_conv, max_target_norm_ratio=config.max_target_norm_ratio,
                                   use_suggestions=config.use_suggestions)
        self.planner_counters = PlannerCounters()
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._request: PlanRequest | None = None   # the plan in flight
        self._planned_for = -1                      # synchronous: the last position a plan was made for
        self._gave_up_at = -1                       # synchronous: the position whose plan it stopped waiting for
        self._closed = False
        self._sync_until = len(tokens) + config.lead_window   # positions before it are planned synchronously
        self._notify = notify                       # called when a plan's result is filed (wakes the generator)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._request is not None

    def counters(self) -> dict[str, int]:
        return {**self.buffer.counters.as_dict(), **self.planner_counters.as_dict()}

    # ---- the generator's side ------------------------------------------------------------------

    def due(self, position: int) -> Due:
        """Before token `position` is chosen: what the plans ask of this position."""
        return self.buffer.due(position, self.tokens)

    def blend(self, entry, position: int, state_row: RecurrentState) -> InjectionEvent:
        return self.buffer.blend(entry, position, state_row)

    def observe(self, position: int, state_row: RecurrentState, logits: torch.Tensor, drawn: int) -> None:
        """The generator holds S_position (state_row, 1 row) and `logits` [1, V], the distribution of token
        `position`; it has drawn `drawn` tokens. Start a plan from copies if the planner is idle."""
        if self._closed or not self.config.enabled:
            return
        with self._lock:
            if self._request is not None:
                self.planner_counters.skipped += 1
                return
            synchronous = self.synchronous_at(position)
            if synchronous and self._planned_for >= position:
                return
            lead = 0 if synchronous else (
                self.config.lag if self.config.lag is not None else self.runtime.lead_estimator.lead(self.config.max_lead))
            # copies on the generator's stream, then an event the planner's stream waits for
            request = PlanRequest(self.generation_id, self.config, state_row.clone(), logits.detach().clone(),
                                  position, self.tokens, self.sampling, self.seed, drawn, lead, self.veto_threshold,
                                  cancelled=self._cancelled)
            request.ready = record_current(request.logits.device)
            self._request = request
            self._planned_for = position
            self.planner_counters.launched += 1
        request.future.add_done_callback(self._landed)
        try:
            self.runtime.submit([request])
        except RuntimeError:   # the runtime has closed (the engine is stopping): no plan
            request.future.cancel()

    def synchronous_at(self, position: int) -> bool:
        """Whether the plan for `position` is waited for: always in synchronous mode, else within the lead
        window (the first `lead_window` positions of the completion)."""
        return self.config.synchronous or position < self._sync_until

    def waits_at(self, position: int) -> bool:
        """The session must not choose token `position` before its plan is in (unless it gave up waiting)."""
        return (self.synchronous_at(position) and self.busy and self._planned_for == position
                and self._gave_up_at != position and not self._closed)

    def _landed(self, future) -> None:
        """The worker's thread (or the closing one): file the plan's result into the buffer. Under the lock,
        so that a result and `close` never cross: a result filed before close is resolved by it, one after
        is dropped (close counted it cancelled)."""
        with self._lock:
            self._request = None
            if self._closed:
                return
            if future.cancelled() or isinstance(future.exception(), PlanCancelled):
                self.planner_counters.cancelled += 1
            elif future.exception() is not None:
                logger.error("planner failed (generation %s): %s", self.generation_id, future.exception())
                self.planner_counters.failed += 1
            else:
                result: PlanResult = future.result()
                self.planner_counters.simulations += round(result.entry.planner_stats["simulations_per_root"])
                self.planner_counters.state_steps += round(result.entry.planner_stats["state_steps"])
                if result.outcome is None:
                    self.buffer.put(result.entry)
                else:
                    self.buffer.put_resolved(result.entry, Verdict(result.outcome, result.reason, result.effect))
        if self._notify is not None:
            self._notify()

    def give_up_waiting(self, position: int) -> None:
        """Synchronous mode: the plan for `position` took longer than synchronous_timeout_s; the session goes
        on without it (the plan still lands, late, if it can)."""
        self._gave_up_at = position
        self.planner_counters.timed_out += 1

    def close(self, position: int) -> list[InjectionEvent]:
        """Stop planning at `position` (the generation ended): cancel the plan in flight and resolve what is
        left in the buffer (PRUNED). Idempotent; returns the events of the resolution."""
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            self._cancelled.set()
            request, self._request = self._request, None
            if request is not None:
                self.planner_counters.cancelled += 1
        if request is not None:
            request.future.cancel()   # still queued: dropped; running: the worker stops at its next step
        return self.buffer.finish(position, self.tokens.snapshot())

