"""`CRSMModel`: backbone + latent dynamics + value heads + tokenizer, and the seed's API

    result = await model.think_and_generate(prompt, max_length=100, use_deliberation=True,
                                            deliberation_lag=3)

One session at a time per call: the generator's steps run in a single worker thread (never on the
event loop) and never wait for the planner, which runs as that session's `SessionDeliberator`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from .backbone import MambaLM
from .checkpoint import has_component, load_pretrained, save_pretrained
from .deliberation import DeliberationConfig, SessionDeliberator, load_deliberation_config
from .dynamics import COMPONENT_NAME as DYNAMICS, DynamicsConfig, LatentDynamics, Stepper
from .engine_config import PlannerMode
from .injection import InjectionEvent
from .planner.runtime import PlannerRuntime, RideStep
from .sampling import SamplingParams, SamplingTable
from .tokenizer import Tokenizer, load_tokenizer
from .value import COMPONENT_NAME as VALUE_HEADS, ValueHeads, ValueHeadsConfig

logger = logging.getLogger(__name__)


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
    decode_time_s: float = 0.0              # end of prefill to the last chosen token

    @property
    def events(self) -> list[InjectionEvent]:
        return [e for entry in self.log for e in entry.events] + self.closing_events


class _Generation:
    """One session's generator state; every method runs in the generator thread."""

    def __init__(self, backbone: MambaLM, prompt: list[int], max_length: int, sampling: SamplingParams,
                 eos_id: int | None, deliberator: SessionDeliberator | None):
        self.backbone, self.max_length, self.sampling, self.eos_id = backbone, max_length, sampling, eos_id
        self.deliberator = deliberator
        self.tokens = list(prompt)                 # by position, prompt included
        self.n_prompt = len(prompt)
        self.sampler = SamplingTable(1, backbone.device)
        self.sampler.set_row(0, sampling, sampling.resolved_seed())
        self.state = backbone.allocate_state(1)
        self.logits: torch.Tensor | None = None    # [1, V]: the distribution of the next token
        self.log: list[PositionLog] = []
        self.finish_reason: str | None = None
        self.started = self.finished = 0.0

    @torch.no_grad()
    def prefill(self) -> None:
        ids = torch.tensor([self.tokens], dtype=torch.long, device=self.backbone.device)
        self.logits = self.backbone.prefill(ids, self.state)
        self.started = time.perf_counter()

    @torch.no_grad()
    def advance(self) -> None:
        """Choose the token at the current position and, unless finished, consume it."""
        position = len(self.tokens)
        events, suggestion = [], None
        if self.deliberator is not None:
            events, suggestion = self.deliberator.apply_due(position, self.state, self.tokens)
            self.deliberator.observe(position, self.state, self.logits)
        token = suggestion if suggestion is not None else int(self.sampler.sample(self.logits)[0])
        self.tokens.append(token)
        self.log.append(PositionLog(position, token, suggestion is not None, events))
        if self.eos_id is not None and token == self.eos_id:
            self.finish_reason = "eos"
        elif len(self.tokens) - self.n_prompt >= self.max_length:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.finished = time.perf_counter()
            return
        self.logits = self.backbone.step(torch.tensor([token], device=self.backbone.device), self.state)


class CRSMModel:
    _generation_ids = itertools.count(1)

    def __init__(self, backbone: MambaLM, *, tokenizer: Tokenizer | None = None, dynamics: Stepper | None = None,
                 value_heads: ValueHeads | None = None, config: DeliberationConfig | None = None):
        self.backbone = backbone.eval()
        self.tokenizer = tokenizer
        self.dynamics = dynamics if dynamics is not None else \
            LatentDynamics(DynamicsConfig.for_model(backbone.config), backbone).to(backbone.device).eval()
        self.value_heads = value_heads if value_heads is not None else \
            ValueHeads(ValueHeadsConfig.for_model(backbone.config)).to(backbone.device).eval()
        self.config = config or DeliberationConfig()
        # One generator thread: steps never run on the event loop, and one session's steps stay ordered.
        self._generator = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crsm-generator")
        self._runtime: PlannerRuntime | None = None   # made on first use (on CUDA it captures graphs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu",
                        config: DeliberationConfig | None = None) -> "CRSMModel":
        """A checkpoint directory: backbone + tokenizer, and `dynamics` / `value_heads` when present
        (untrained ones are built otherwise, and a warning is logged). Deliberation defaults come from
        `config`, else the directory's crsm.json, else the built-in defaults."""
        backbone = load_pretrained(directory, device=device)
        dynamics = value_heads = None
        if has_component(directory, DYNAMICS):
            dynamics = LatentDynamics.load(directory, backbone).eval()
        else:
            logger.warning("%s has no %s; using an untrained dynamics model", directory, DYNAMICS)
        if has_component(directory, VALUE_HEADS):
            value_heads = ValueHeads.load(directory, device).eval()
        else:
            logger.warning("%s has no %s; using untrained value heads", directory, VALUE_HEADS)
        return cls(backbone, tokenizer=load_tokenizer(directory), dynamics=dynamics, value_heads=value_heads,
                   config=config or load_deliberation_config(directory))

    def planner_runtime(self, mode: PlannerMode = "stream", ride: RideStep | None = None,
                        ride_rows: int = 16) -> PlannerRuntime:
        """A new planner runtime over this model's parts ("ride" mode: steps go to `ride`, at most
        `ride_rows` rows at a time)."""
        runtime = PlannerRuntime(self.backbone, self.dynamics, self.value_heads, mode=mode, ride=ride,
                                 ride_rows=ride_rows)
        if self.config.enabled:
            runtime.prepare(self.config)
        return runtime

    @property
    def runtime(self) -> PlannerRuntime:
        """This model's own planner runtime (stream mode), for `think_and_generate`."""
        if self._runtime is None:
            self._runtime = self.planner_runtime()
        return self._runtime

    def new_deliberator(self, config: DeliberationConfig | None = None,
                        runtime: PlannerRuntime | None = None) -> SessionDeliberator:
        """A planner for one new session (its own generation id), on `runtime` (default: the model's)."""
        return SessionDeliberator(runtime or self.runtime, config or self.config, next(self._generation_ids))

    def save_pretrained(self, directory: str | Path) -> None:
        save_pretrained(self.backbone, directory, self.tokenizer)
        if isinstance(self.dynamics, LatentDynamics):
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

    async def think_and_generate(self, prompt: str | Sequence[int], max_length: int = 100,
                                 use_deliberation: bool = True, deliberation_lag: int = 3,
                                 sampling: SamplingParams = SamplingParams(), stop_at_eos: bool = True,
                                 config: DeliberationConfig | None = None) -> GenerationResult:
        """Generate up to `max_length` new tokens after `prompt` (text or token ids), with the
        asynchronous planner steering the state when `use_deliberation`. `config` overrides the
        model's deliberation settings for this call; `deliberation_lag` sets its lag."""
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        generation_id = next(self._generation_ids)
        settings = replace(config or self.config, lag=deliberation_lag, enabled=use_deliberation)
        loop = asyncio.get_running_loop()
        deliberator = SessionDeliberator(self.runtime, settings, generation_id) if use_deliberation else None
        eos = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer is not None) else None
        run = _Generation(self.backbone, ids, max_length, sampling, eos, deliberator)
        closing: list[InjectionEvent] = []
        try:
            await loop.run_in_executor(self._generator, run.prefill)
            while run.finish_reason is None:
                await loop.run_in_executor(self._generator, run.advance)
        finally:
            if deliberator is not None:
                closing = await deliberator.close()
        tokens = run.tokens[run.n_prompt:]
        return GenerationResult(
            generation_id=generation_id, prompt_tokens=ids, tokens=tokens,
            text=self.tokenizer.decode(tokens) if self.tokenizer is not None else None,
            finish_reason=run.finish_reason, log=run.log, closing_events=closing,
            counters=deliberator.counters() if deliberator is not None else {},
            decode_time_s=run.finished - run.started)

    def close(self) -> None:
        """Stop the model's threads (after every generation has returned)."""
        self._generator.shutdown(wait=True)
        if self._runtime is not None:
            self._runtime.close()
