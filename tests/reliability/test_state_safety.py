"""State safety: a planner whose targets are huge (1e30, 1e38, -1e38) or not finite (NaN, inf) never
changes a session's state, so the state stays finite and the logits of the following steps too.

The planner is made to produce such targets by its latent dynamics: its steps (allowed by a claimed
fidelity) give the search's children, and the target of a plan is the state of its chosen child. A
checker that prefers anything but the model's own token makes every plan disagree with a greedy
generator, so that every target reaches the blend's checks (no veto, no suggestions): every one must be
REJECTED (by the norm bound or the finiteness checks of TargetBuffer), which leaves the state bit for
bit what it would have been without deliberation. Once through the engine with synchronous planning
(every plan on time), once through the server.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import httpx
import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.deliberation import DeliberationConfig
from crsm_core.dynamics import DynamicsConfig, LatentDynamics
from crsm_core.engine import Engine, EngineConfig, GenerationRequest
from crsm_core.injection import InjectionOutcome
from crsm_core.model import CRSMModel
from crsm_core.planner import PlannerConfig
from crsm_core.sampling import SamplingParams
from crsm_core.state import RecurrentState
from crsm_core.tokenizer import ByteTokenizer
from harness import InProcessServer, settings_for, stream_generate
from server.runtime import load_model

POISONS = [1e30, 1e38, -1e38, math.nan, math.inf, -math.inf]
STEPS = 40


class PoisonedDynamics:
    """A latent-dynamics stepper whose every resulting state is filled with `value` (logits are the
    real dynamics' own): the planner's children, and so its targets, are such states."""

    def __init__(self, inner, value: float):
        self.inner, self.value = inner, value

    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        logits = self.inner.step(tokens, state)
        state.conv.fill_(self.value)
        state.ssm.fill_(self.value)
        return logits


def avoiding_greedy(backbone):
    """A verifier valuing 1 every continuation but the one starting with the model's own argmax."""
    def for_batch(contexts):
        greedy = []
        for context in contexts:
            with torch.inference_mode():
                greedy.append(int(backbone.prefill(torch.tensor([context], device=backbone.device),
                                                   backbone.allocate_state(1)).argmax()))

        def value(states, roots, tokens):
            return torch.tensor([float(t >= 0 and t != greedy[r]) for r, t in zip(roots.tolist(), tokens[:, 0].tolist())],
                                device=states.ssm.device).unsqueeze(1)
        return value
    return for_batch


def poisoned(model: CRSMModel, value: float) -> PoisonedDynamics:
    """Make `model` plan with poisoned steps and the disagreeing checker, no veto, no suggestions."""
    model.dynamics = PoisonedDynamics(model.dynamics, value)
    model.dynamics_top1 = 1.0
    model.verifiers["avoid"] = avoiding_greedy(model.backbone)
    model.config = replace(model.config, steps="dynamics", verifier="avoid", veto_threshold=1e9,
                           use_suggestions=False, synchronous=True,
                           planner=PlannerConfig(n_simulations=4, top_k=3, max_depth=2, leaf_batch=2))
    return model.dynamics


REASONS = ("target ssm norm", "non-finite target", "non-finite gates")  # how TargetBuffer refuses one


def rejected_for_size_or_finiteness(event) -> bool:
    return event.outcome is InjectionOutcome.REJECTED and event.reason.startswith(REASONS)


@pytest.mark.parametrize("value", POISONS, ids=str)
async def test_poisoned_targets_never_touch_a_session_state(value, figures):
    torch.manual_seed(0)
    backbone = MambaLM(tiny_config()).eval()
    model = CRSMModel(backbone, tokenizer=ByteTokenizer(),
                      dynamics=LatentDynamics(DynamicsConfig.for_model(backbone.config, rank=8), backbone).eval())
    poisoned(model, value)
    engine = Engine.for_model(model, EngineConfig(max_sessions=2))
    engine.start()
    try:
        prompt = tuple(torch.randint(0, 256, (12,)).tolist())
        greedy = SamplingParams(temperature=0.0)
        plain, steered = await asyncio.gather(
            engine.submit(GenerationRequest(prompt, STEPS, greedy, ignore_eos=True)).collect(),
            engine.submit(GenerationRequest(prompt, STEPS, greedy, ignore_eos=True, deliberation=model.config)).collect())
    finally:
        await engine.shutdown()
    # the entries were refused: the session sampled what a session without deliberation sampled
    assert steered.token_ids == plain.token_ids
    counters, events = steered.done.deliberation, steered.injections
    assert counters["produced"] >= STEPS - 1 and counters["failed"] == 0      # a plan for every position
    blends = [e for e in events if e.outcome is not InjectionOutcome.PRUNED]
    assert blends and all(rejected_for_size_or_finiteness(e) for e in blends), {e.reason for e in blends}
    assert counters["applied"] + counters["applied_late"] == 0
    reasons = sorted({next(r for r in REASONS if e.reason.startswith(r)) for e in blends})
    if value == 1e30:  # finite, its gates too (the heads' features are RMS-normalised): the norm bound's case
        assert reasons == ["target ssm norm"], reasons
    figures.record("state_safety", **{f"reasons {value}": reasons, f"rejected {value}": len(blends)})


@pytest.mark.slow
def test_poisoned_targets_through_the_server(model_dir, figures):
    installed: list[PoisonedDynamics] = []

    def loader(settings):
        model = load_model(settings)
        installed.append(poisoned(model, POISONS[0]))
        return model

    server = InProcessServer(settings_for(model_dir), loader).start()
    try:
        [poison] = installed
        reasons: set[str] = set()
        rejected = 0
        for value in POISONS:
            poison.value = value
            body = {"prompt": f"poisoned by {value}", "max_tokens": 48, "temperature": 0.0, "ignore_eos": True}
            plain = httpx.post(server.url + "/v1/generate", json=body, timeout=60).json()
            events = stream_generate(server.url, {**body, "deliberation": {"enabled": True, "simulations": 4}})
            name, done = events[-1]
            assert name == "done" and done["usage"]["completion_tokens"] == 48
            # untouched states sample exactly what the session without deliberation sampled
            assert [d["token_id"] for e, d in events if e == "token"] == plain["token_ids"], value
            # every entry was refused, or never reached (pruned when the generation ended before it)
            injections = [d for e, d in events if e == "injection"]
            refused = [i for i in injections if i["outcome"] == "rejected"]
            assert refused, f"no entry for {value} was resolved before the end: nothing was tested"
            assert all(i["reason"].startswith(REASONS) for i in refused), {i["reason"] for i in refused}
            assert all(i["outcome"] == "pruned" for i in injections if i not in refused), injections
            assert len(injections) == done["deliberation"]["produced"]
            reasons |= {next(r for r in REASONS if i["reason"].startswith(r)) for i in refused}
            rejected += len(refused)
        figures.record("state_safety", poisons=[str(v) for v in POISONS], rejected_through_server=rejected,
                       reasons=sorted(reasons))
    finally:
        server.stop()
