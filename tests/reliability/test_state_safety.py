"""State safety: a planner whose targets are huge (1e30, 1e38, -1e38) or not finite (NaN, inf) never
changes a session's state, so the state stays finite and the logits of the following steps too.

The planner is made to produce such targets by its latent dynamics: the search expands children with
it, and the target of a plan is the state of its best child. Every such entry must be REJECTED (by
the norm bound or the finiteness checks of TargetBuffer.apply_due), which leaves the state bit for bit
what it would have been without deliberation. Vetoes are switched off so that the rejection is what
is tested. Once driven step by step through a SessionDeliberator (synchronous planning, every plan on
time), once through the server with asynchronous planners (late entries, fast-forwarded first).
"""
from __future__ import annotations

import math
from dataclasses import replace

import httpx
import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.deliberation import DeliberationConfig, SessionDeliberator
from crsm_core.dynamics import DynamicsConfig, LatentDynamics
from crsm_core.injection import InjectionOutcome
from crsm_core.planner import PlannerConfig
from crsm_core.planner.runtime import PlannerRuntime
from crsm_core.state import RecurrentState
from crsm_core.value import ValueHeads, ValueHeadsConfig
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


REASONS = ("target ssm norm", "non-finite target", "non-finite gates")  # how TargetBuffer refuses one


def rejected_for_size_or_finiteness(event) -> bool:
    return event.outcome is InjectionOutcome.REJECTED and event.reason.startswith(REASONS)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    backbone = MambaLM(tiny_config()).eval()
    dynamics = LatentDynamics(DynamicsConfig.for_model(backbone.config, rank=8), backbone).eval()
    heads = ValueHeads(ValueHeadsConfig.for_model(backbone.config, hidden=8)).eval()
    return backbone, dynamics, heads


@pytest.mark.parametrize("value", POISONS, ids=str)
@torch.no_grad()
def test_poisoned_targets_never_touch_a_session_state(parts, value, figures):
    backbone, dynamics, heads = parts
    config = DeliberationConfig(lag=2, injection_rate=0.05, veto_threshold=1e9, fast_forward="exact",
                                children="dynamics", synchronous=True,
                                planner=PlannerConfig(n_simulations=4, top_k=3, max_depth=2, leaf_batch=2))
    runtime = PlannerRuntime(backbone, PoisonedDynamics(dynamics, value), heads)
    deliberator = SessionDeliberator(runtime, config, generation_id=1)
    prompt = torch.randint(0, 256, (1, 12))
    steered, plain = backbone.allocate_state(1), backbone.allocate_state(1)
    logits = backbone.prefill(prompt, steered)
    plain_logits = backbone.prefill(prompt, plain)
    tokens, events = prompt[0].tolist(), []
    for position in range(len(tokens), len(tokens) + STEPS):
        resolved, _ = deliberator.apply_due(position, steered, tokens)
        events += resolved
        deliberator.observe(position, steered, logits)
        # the entries were refused: the state is the one a session without deliberation has
        assert torch.equal(steered.ssm, plain.ssm) and torch.equal(steered.conv, plain.conv), position
        assert bool(steered.is_finite().all())
        token = int(logits.argmax())
        tokens.append(token)
        logits = backbone.step(torch.tensor([token]), steered)
        plain_logits = backbone.step(torch.tensor([token]), plain)
        assert bool(torch.isfinite(logits).all()) and torch.equal(logits, plain_logits), position
    counters = deliberator.counters()
    assert counters["produced"] >= STEPS - config.lag  # one plan per position, each due `lag` later
    assert events and all(rejected_for_size_or_finiteness(e) for e in events), {e.reason for e in events}
    assert counters["rejected"] == len(events) and counters["applied"] + counters["applied_late"] == 0
    reasons = sorted({next(r for r in REASONS if e.reason.startswith(r)) for e in events})
    if value == 1e30:  # finite, its gates too (the heads' features are RMS-normalised): the norm bound's case
        assert reasons == ["target ssm norm"], reasons
    figures.record("state_safety", **{f"reasons {value}": reasons, f"rejected {value}": len(events)})


@pytest.mark.slow
def test_poisoned_targets_through_the_server(model_dir, figures):
    installed: list[PoisonedDynamics] = []

    def loader(settings):
        model = load_model(settings)
        model.dynamics = PoisonedDynamics(model.dynamics, POISONS[0])
        # exact fast-forward: the snapshot is projected by the backbone, only the search's children are
        # poisoned; no veto, so every target reaches the checks
        model.config = replace(model.config, fast_forward="exact", children="dynamics", veto_threshold=1e9)
        installed.append(model.dynamics)
        return model

    server = InProcessServer(settings_for(model_dir), loader).start()
    try:
        [poisoned] = installed
        reasons: set[str] = set()
        rejected = 0
        for value in POISONS:
            poisoned.value = value
            body = {"prompt": f"poisoned by {value}", "max_tokens": 96, "seed": 9, "temperature": 0.8,
                    "ignore_eos": True}
            plain = httpx.post(server.url + "/v1/generate", json=body, timeout=60).json()
            events = stream_generate(server.url, {**body, "deliberation": {"enabled": True, "simulations": 4}})
            name, done = events[-1]
            assert name == "done" and done["usage"]["completion_tokens"] == 96
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
