"""One session's planner (System 2), running beside its generator (System 1) without blocking it.

The generator calls, at each position q (it holds S_q; token q not yet chosen):

    events, suggestion = deliberator.apply_due(q, state_row, tokens)   # blend what is due at q
    deliberator.observe(q, state_row, logits)                          # maybe start a plan from S_q
    ... choose token q (the suggestion, if enabled and ready), step ...

`observe` never waits: if the planner is idle it clones S_q and hands it to an asyncio task whose
compute runs in a worker thread (an executor); if the planner is busy the position is skipped. The
plan fast-forwards S_q by `lag` greedy tokens (dynamics model or exact backbone), searches from
S_p (p = q + lag), gates the chosen child's state per layer and puts the entry into the session's
`TargetBuffer`. Before handing the entry over, the worker fast-forwards it (exact steps) through
the tokens the generator produced meanwhile, so a late entry costs the generator little.

Synchronous mode runs the plan inline in `observe` (no loop, no thread): deterministic, for tests.
The deliberator knows nothing of the loop that drives it, so the batched engine uses it as it is.
Threading: `observe` and `apply_due` are called from the generator's thread (any thread; one at a
time); in asynchronous mode the deliberator must be created on the event loop's thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .backbone import MambaLM
from .dynamics import Stepper, fast_forward
from .injection import (InjectionEvent, InjectionOutcome, TargetBuffer, TargetEntry, catch_up,
                        default_layer_weights, gates)
from .planner import PlannerConfig, search
from .state import RecurrentState
from .value import ValueHeads, spread

logger = logging.getLogger(__name__)

Mode = Literal["dynamics", "exact"]


DELIBERATION_FILE = "crsm.json"  # a model directory's deliberation defaults


def load_deliberation_config(directory: str | Path) -> "DeliberationConfig":
    """A model directory's deliberation defaults (crsm.json), or the built-in defaults without one."""
    path = Path(directory) / DELIBERATION_FILE
    if not path.exists():
        return DeliberationConfig()
    try:
        return DeliberationConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


@dataclass(frozen=True)
class DeliberationConfig:
    enabled: bool = True
    lag: int = 3                      # plan for position t + lag from a snapshot at t
    max_lag: int = 8                  # a later entry is pruned
    delta_decay: float = 0.9          # late entries: alpha * delta_decay ** lateness
    injection_rate: float = 0.05      # the seed's experimental sweet spot
    layer_weights: tuple[float, ...] | None = None   # None: 0 for the lower half, 1 for the upper
    veto_threshold: float = 1.0       # std over value heads above this vetoes the entry
    blend_conv: bool = False          # also blend the conv state
    fast_forward: Mode = "dynamics"   # how the snapshot is projected to the target position
    children: Mode = "dynamics"       # how the search expands children
    use_suggestions: bool = False     # the planned token replaces sampling when it is ready in time
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    synchronous: bool = False         # plan inline at observe time (deterministic test mode)

    def __post_init__(self) -> None:
        if self.lag < 1:
            raise ValueError(f"lag must be >= 1, got {self.lag}")
        if self.max_lag < 0:
            raise ValueError(f"max_lag must be >= 0, got {self.max_lag}")
        if not 0.0 <= self.delta_decay <= 1.0:
            raise ValueError(f"delta_decay must be in [0, 1], got {self.delta_decay}")
        if not 0.0 <= self.injection_rate <= 1.0:
            raise ValueError(f"injection_rate must be in [0, 1], got {self.injection_rate}")
        if self.veto_threshold < 0:
            raise ValueError(f"veto_threshold must be >= 0, got {self.veto_threshold}")
        for name in ("fast_forward", "children"):
            if getattr(self, name) not in ("dynamics", "exact"):
                raise ValueError(f"{name} must be 'dynamics' or 'exact', got {getattr(self, name)!r}")
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

    def with_lag(self, lag: int) -> "DeliberationConfig":
        return replace(self, lag=lag)


class PlanCancelled(Exception):
    """Raised inside a planner worker once its session has been closed."""


class _Guarded:
    """A stepper that stops the worker at its next step once the session is closed."""

    def __init__(self, stepper: Stepper, cancel: threading.Event):
        self.stepper, self.cancel = stepper, cancel

    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        if self.cancel.is_set():
            raise PlanCancelled()
        return self.stepper.step(tokens, state)


@dataclass
class PlannerCounters:
    launched: int = 0     # plans started (snapshots taken)
    skipped: int = 0      # positions observed while the planner was busy
    cancelled: int = 0    # plans stopped by close() before producing a result
    failed: int = 0       # plans that raised (logged)
    simulations: int = 0  # MCTS simulations run by the plans that finished
    state_steps: int = 0  # rows advanced by one token (fast-forward and expansions) by those plans

    def as_dict(self) -> dict[str, int]:
        return {"launched": self.launched, "skipped": self.skipped, "cancelled": self.cancelled,
                "failed": self.failed, "simulations": self.simulations, "state_steps": self.state_steps}


class SessionDeliberator:
    def __init__(self, backbone: MambaLM, dynamics: Stepper, value_heads: ValueHeads,
                 config: DeliberationConfig, generation_id: int, *,
                 executor: concurrent.futures.Executor | None = None):
        self.backbone = backbone
        self.value_heads = value_heads
        self.config = config
        self.generation_id = generation_id
        self.buffer = TargetBuffer(generation_id, max_lag=config.max_lag, delta_decay=config.delta_decay,
                                   blend_conv=config.blend_conv)
        self.planner_counters = PlannerCounters()
        self._weights = config.weights(backbone.config.n_layer)
        self._cancel = threading.Event()
        self._fast_forward = _Guarded(dynamics if config.fast_forward == "dynamics" else backbone, self._cancel)
        self._children = _Guarded(dynamics if config.children == "dynamics" else backbone, self._cancel)
        self._exact = _Guarded(backbone, self._cancel)
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._tokens: list[int] = []          # the session's tokens by position, for the worker's catch-up
        self._last_position = 0
        self._task: asyncio.Task | None = None
        self._worker: concurrent.futures.Future | None = None
        if config.synchronous:
            self._loop = None
            self._executor, self._owns_executor = None, False
        else:
            self._loop = asyncio.get_running_loop()
            self._owns_executor = executor is None
            self._executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crsm-planner")

    # ---- the plan itself (any thread) ---------------------------------------------------------

    @torch.no_grad()
    def plan(self, snapshot: RecurrentState, position: int, logits: torch.Tensor,
             captured_at: float | None = None) -> TargetEntry:
        """From S_t (snapshot, 1 row, consumed) and the logits that came with it ([1, V], the
        distribution of token t): fast-forward to p = t + lag, search, gate. Returns the entry."""
        cfg = self.config
        captured_at = time.monotonic() if captured_at is None else captured_at
        ahead = fast_forward(self._fast_forward, snapshot, steps=cfg.lag, logits=logits)
        result = search(snapshot, ahead.logits, self._children.step, self._values, cfg.planner)
        with self._lock:
            self.planner_counters.simulations += int(result.stats.simulations)
            self.planner_counters.state_steps += snapshot.batch * cfg.lag + int(result.stats.expansions)
        values = result.layer_values[0].float()                               # [L]
        disagreement = float(spread(values))
        vetoed = disagreement > cfg.veto_threshold
        alpha = torch.zeros_like(values) if vetoed else gates(values, cfg.injection_rate, self._weights)
        return TargetEntry(
            generation_id=self.generation_id, target_position=position + cfg.lag, captured_position=position,
            action=int(result.action[0]), target_state=result.target_state, alpha=alpha.cpu(), vetoed=vetoed,
            spread=disagreement,
            planner_stats={k: float(v) for k, v in asdict(result.stats).items()},
            captured_at=captured_at)

    def _values(self, states: RecurrentState) -> torch.Tensor:
        if self._cancel.is_set():
            raise PlanCancelled()
        return self.value_heads(states)

    def _work(self, snapshot: RecurrentState, position: int, logits: torch.Tensor,
              captured_at: float) -> TargetEntry:
        """Worker thread: plan, then catch up with the tokens generated meanwhile (when not hopeless)."""
        entry = self.plan(snapshot, position, logits, captured_at)
        with self._lock:
            tokens = list(self._tokens)
        if 0 < len(tokens) - entry.target_position <= self.config.max_lag and not entry.vetoed:
            with torch.no_grad():
                catch_up(entry, tokens, len(tokens), self._exact.step)
        return entry

    # ---- the generator's side ------------------------------------------------------------------

    def observe(self, position: int, state_row: RecurrentState, logits: torch.Tensor) -> None:
        """After the generator reached S_position (1 row) with `logits` [1, V] (the distribution of
        token `position`): start a plan from a copy if the planner is idle. Never waits for it."""
        if self._closed or not self.config.enabled:
            return
        if self.config.synchronous:
            self.planner_counters.launched += 1
            self.buffer.put(self.plan(state_row.clone(), position, logits.detach().clone()))
            return
        with self._lock:
            if self._busy:
                self.planner_counters.skipped += 1
                return
            self._busy = True
            self.planner_counters.launched += 1
        snapshot, logits, now = state_row.clone(), logits.detach().clone(), time.monotonic()
        self._loop.call_soon_threadsafe(self._launch, snapshot, position, logits, now)

    def apply_due(self, position: int, state_row: RecurrentState,
                  generated_tokens: list[int]) -> tuple[list[InjectionEvent], int | None]:
        """Before token `position` is chosen (state_row holds S_position, 1 row): apply what is due.
        generated_tokens[i] = token at position i, prompt included (at least `position` of them).
        Returns the events and, with use_suggestions, the planned token for this position if its
        entry was applied on time (else None)."""
        self._last_position = position
        with self._lock:
            self._tokens.extend(generated_tokens[len(self._tokens):position])
        with torch.no_grad():
            events = self.buffer.apply_due(position, state_row, generated_tokens, self.backbone.step)
        suggestion = None
        if self.config.use_suggestions:
            on_time = [e for e in events if e.outcome is InjectionOutcome.APPLIED and e.target_position == position]
            suggestion = on_time[0].action if on_time else None
        return events, suggestion

    # ---- the task ------------------------------------------------------------------------------

    def _launch(self, snapshot: RecurrentState, position: int, logits: torch.Tensor, captured_at: float) -> None:
        """Event loop thread."""
        if self._closed:
            with self._lock:
                self._busy = False
            self.planner_counters.cancelled += 1
            return
        self._task = self._loop.create_task(self._run(snapshot, position, logits, captured_at),
                                            name=f"crsm-planner-{self.generation_id}")

    async def _run(self, snapshot: RecurrentState, position: int, logits: torch.Tensor, captured_at: float) -> None:
        try:
            self._worker = self._executor.submit(self._work, snapshot, position, logits, captured_at)
            entry = await asyncio.wrap_future(self._worker)
        except PlanCancelled:
            self.planner_counters.cancelled += 1
            return
        except asyncio.CancelledError:
            self.planner_counters.cancelled += 1
            raise
        except Exception:  # a planner bug must not kill the session; it is logged and counted
            logger.exception("planner failed (generation %s, position %d)", self.generation_id, position)
            self.planner_counters.failed += 1
            return
        finally:
            with self._lock:
                self._busy = False
        self.buffer.put(entry)

    async def close(self) -> list[InjectionEvent]:
        """Cancel the planner task, wait until its worker has stopped, resolve what is left in the
        buffer (never reached: PRUNED). Idempotent; returns the events of the resolution."""
        if self._closed:
            return []
        self._closed = True
        self._cancel.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])
        while self._worker is not None and not self._worker.done():
            await asyncio.sleep(0.001)   # the worker stops at its next step
        if self._owns_executor:
            self._executor.shutdown(wait=True)
        return self.buffer.finish(self._last_position)

    @property
    def busy(self) -> bool:
        return self._busy

    def counters(self) -> dict[str, int]:
        return {**self.buffer.counters.as_dict(), **self.planner_counters.as_dict()}
