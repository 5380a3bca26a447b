"""`CRSMModel`: backbone + latent dynamics + value heads + tokenizer, and the seed's API

    result = await model.think_and_generate(prompt, max_length=100, use_deliberation=True,
                                            deliberation_lag=3)

`think_and_generate` runs through the model's own `Engine` (started on first use), the engine the
server runs: one generation loop, so what it measures is what users are served.
"""
from __future__ import annotations

import itertools
import math
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .backbone import Impl, MambaLM
from .checkpoint import has_component, load_pretrained, save_pretrained
from .deliberation import UNCALIBRATED_VETO, DeliberationConfig, SessionDeliberator, load_deliberation_config
from .dynamics import COMPONENT_NAME as DYNAMICS, DynamicsConfig, LatentDynamics
from .injection import Effect, InjectionEvent
from .engine_config import PlannerMode
from .planner.runtime import PlannerRuntime, TokenLog, Verifier
from .sampling import SamplingParams
from .verifiers import shipped as shipped_verifiers
from .state import StepFn
from .tokenizer import Tokenizer, load_tokenizer
from .value import COMPONENT_NAME as VALUE_HEADS, ValueHeads, ValueHeadsConfig

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger(__name__)

TRAINING_REPORT = "training_report.json"


@dataclass
class PositionLog:
    position: int                   # the position of `token` (tokens before it, prompt included)
    token: int
    suggested: bool                 # the token is the planner's action, not a sample
    events: list[InjectionEvent]    # entries resolved at this position (before the token was chosen)

    def to_dict(self) -> dict:
        return {"position": self.position, "token": self.token, "suggested": self.suggested,
                "events": [e.to_dict() for e in self.events]}


@dataclass
class GenerationResult:
    generation_id: int
    prompt_tokens: list[int]
    tokens: list[int]                       # the generated tokens
    text: str | None                        # decoded, when the model has a tokenizer
    finish_reason: str                      # "length" | "eos"
    log: list[PositionLog]
    closing_events: list[InjectionEvent]    # entries resolved when the session closed
    counters: dict[str, int] = field(default_factory=dict)
    decode_time_s: float = 0.0              # first to last token

    @property
    def events(self) -> list[InjectionEvent]:
        return [e for entry in self.log for e in entry.events] + self.closing_events


def dynamics_top1(directory: str | Path) -> float | None:
    """The latent dynamics model's one-step top-1 agreement with exact steps (its training report)."""
    path = Path(directory) / TRAINING_REPORT
    if not path.exists():
        return None
    fidelity = json.loads(path.read_text())["stages"]["dynamics"]["fidelity"]
    return next((f["top1_agreement"] for f in fidelity if f["lag"] == 1), None)


class CRSMModel:
    _generation_ids = itertools.count(1)

    def __init__(self, backbone: MambaLM, *, tokenizer: Tokenizer | None = None, dynamics: LatentDynamics | None = None,
                 value_heads: ValueHeads | None = None, config: DeliberationConfig | None = None,
                 dynamics_top1: float | None = None, verifiers: dict[str, Verifier] | None = None):
        self.backbone = backbone.eval()
        self.tokenizer = tokenizer
        self.dynamics = dynamics if dynamics is not None else \
            LatentDynamics(DynamicsConfig.for_model(backbone.config), backbone).to(backbone.device).eval()
        self.value_heads = value_heads if value_heads is not None else \
            ValueHeads(ValueHeadsConfig.for_model(backbone.config)).to(backbone.device).eval()
        self.config = config or DeliberationConfig()
        self.dynamics_top1 = dynamics_top1
        self.verifiers = dict(verifiers or {})   # the checkers requests may name (deliberation.verifier)
        self._runtime: PlannerRuntime | None = None   # made on first use (on CUDA it captures graphs)
        self._engine: "Engine | None" = None

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu",
                        config: DeliberationConfig | None = None, impl: Impl = "auto") -> "CRSMModel":
        """A checkpoint directory: backbone + tokenizer, and `dynamics` / `value_heads` when present
        (untrained ones are built otherwise, and a warning is logged). Deliberation defaults come from
        `config`, else the directory's crsm.json, else the built-in defaults. impl: the backbone's kernels."""
        backbone = load_pretrained(directory, device=device, impl=impl)
        dynamics = value_heads = None
        if has_component(directory, DYNAMICS):
            dynamics = LatentDynamics.load(directory, backbone).eval()
        else:
            logger.warning("%s has no %s; using an untrained dynamics model", directory, DYNAMICS)
        if has_component(directory, VALUE_HEADS):
            value_heads = ValueHeads.load(directory, device).eval()
        else:
            logger.warning("%s has no %s; using untrained value heads", directory, VALUE_HEADS)
        tokenizer = load_tokenizer(directory, backbone.config.vocab_size)
        return cls(backbone, tokenizer=tokenizer, dynamics=dynamics, value_heads=value_heads,
                   config=config or load_deliberation_config(directory), dynamics_top1=dynamics_top1(directory),
                   verifiers=shipped_verifiers(tokenizer))

    @property
    def veto_threshold(self) -> float:
        """The heads' calibrated spread threshold (stage 3 measures it), or no veto without one."""
        threshold = self.value_heads.config.veto_threshold
        return UNCALIBRATED_VETO if threshold is None else threshold

    def planner_runtime(self, mode: PlannerMode = "stream", ride: StepFn | None = None) -> PlannerRuntime:
        """A new planner runtime over this model's parts ("ride" mode: steps go to `ride`)."""
        runtime = PlannerRuntime(self.backbone, self.dynamics.step, self.value_heads, mode=mode, ride=ride,
                                 eos_id=None if self.tokenizer is None else self.tokenizer.eos_id,
                                 dynamics_top1=self.dynamics_top1, verifiers=self.verifiers)
        if self.config.enabled:
            runtime.prepare(self.config)
        return runtime

    @property
    def runtime(self) -> PlannerRuntime:
        """This model's own planner runtime (stream mode), for plans made outside an engine (the bench)."""
        if self._runtime is None:
            self._runtime = self.planner_runtime()
        return self._runtime

    def new_deliberator(self, config: DeliberationConfig | None, runtime: PlannerRuntime, *, tokens: TokenLog,
                        sampling: SamplingParams, seed: int, notify=None) -> SessionDeliberator:
        """A planner for one new session (its own generation id), on `runtime`."""
        return SessionDeliberator(runtime, config or self.config, next(self._generation_ids), tokens=tokens,
                                  sampling=sampling, seed=seed, veto_threshold=self.veto_threshold, notify=notify)

    def save_pretrained(self, directory: str | Path) -> None:
        save_pretrained(self.backbone, directory, self.tokenizer)
        self.dynamics.save(directory)
        self.value_heads.save(directory)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        ids = [int(i) for i in prompt]
        vocab = self.backbone.config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def engine(self) -> "Engine":
        """The model's own engine (the server's, with room for long generations), started on first use."""
        from .engine import Engine, EngineConfig

        if self._engine is None:
            # evaluation submits its whole set at once and waits as long as it takes
            self._engine = Engine.for_model(self, EngineConfig(max_sessions=64, queue_size=4096,
                                                               max_request_sessions=4096, queue_timeout_s=math.inf,
                                                               max_prompt_tokens=1 << 20, max_new_tokens=1 << 20))
            self._engine.start()
        return self._engine

    async def think_and_generate(self, prompt: str | Sequence[int], max_length: int = 100,
                                 use_deliberation: bool = True, deliberation_lag: int | None = None,
                                 sampling: SamplingParams = SamplingParams(), stop_at_eos: bool = True,
                                 config: DeliberationConfig | None = None) -> GenerationResult:
        """Generate up to `max_length` new tokens after `prompt` (text or token ids), with the
        asynchronous planner steering the state when `use_deliberation`. `config` overrides the
        model's deliberation settings for this call; `deliberation_lag`, when given, fixes its lag
        (None: the config's, by default the measured latency's)."""
        from .engine import DoneEvent, ErrorEvent, GenerationFailed, GenerationRequest, TokenEvent

        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if self.tokenizer is None:
            raise ValueError("think_and_generate needs a model with a tokenizer")
        settings = config or self.config
        if deliberation_lag is not None:
            settings = replace(settings, lag=deliberation_lag)
        request = GenerationRequest(tuple(ids), max_length, sampling, ignore_eos=not stop_at_eos,
                                    deliberation=replace(settings, enabled=True) if use_deliberation else None)
        session = self.engine().submit(request)
        tokens: list[tuple[int, int]] = []
        events: dict[int, list[InjectionEvent]] = {}
        try:
            async for event in session.stream():
                if isinstance(event, TokenEvent):
                    tokens.append((event.position, event.token_id))
                elif isinstance(event, InjectionEvent):
                    events.setdefault(event.position, []).append(event)
                elif isinstance(event, ErrorEvent):
                    raise GenerationFailed(event)
                elif isinstance(event, DoneEvent):
                    done = event
        finally:
            session.cancel()   # a no-op once finished; frees the slot when the caller stops early
        suggested = {e.target_position for es in events.values() for e in es if e.effect is Effect.SUGGESTED}
        log = [PositionLog(p, t, p in suggested, events.pop(p, [])) for p, t in tokens]
        generated = [t for _, t in tokens]
        eos = self.tokenizer.eos_id
        text_tokens = [t for t in generated if t != eos]
        return GenerationResult(
            generation_id=session.deliberator.generation_id if session.deliberator is not None else 0,
            prompt_tokens=ids, tokens=generated, text=self.tokenizer.decode(text_tokens),
            finish_reason="eos" if (stop_at_eos and generated and generated[-1] == eos) else "length", log=log,
            closing_events=[e for es in events.values() for e in es], counters=done.deliberation or {},
            decode_time_s=(done.timings.mean_itl_s or 0.0) * max(0, len(generated) - 1))

    def close(self) -> None:
        """Stop the model's engine and planner threads (after every generation has returned)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._runtime is not None:
            self._runtime.close()
