"""Deliberation through the engine and the planner runtime (issue: "Deliberation that reaches the
stream"): speculated prefixes are the generator's own and are checked, the target of a decision is the
state after its action, late plans are caught up exactly, the veto is calibrated, the synchronous mode
is reproducible and never holds other sessions, the generator never waits for an asynchronous planner,
every plan is accounted for. On the bundled model: a value that carries no information leaves the
output exactly as it is, and the arithmetic checker fixes greedy errors."""
import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import DEFAULT_MODEL_DIR, tiny_config
from crsm_core.deliberation import DeliberationConfig
from crsm_core.engine import Engine, EngineConfig, GenerationRequest, RequestError, SessionStatus
from crsm_core.injection import Effect, InjectionOutcome
from crsm_core.model import CRSMModel
from crsm_core.planner import PlannerConfig
from crsm_core.planner.runtime import GENERATOR_CATCH_UP, PlanRequest, TokenLog
from crsm_core.sampling import SamplingParams
from crsm_core.tokenizer import ByteTokenizer
from crsm_core.value import ValueHeads, ValueHeadsConfig

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

TOKENIZER = ByteTokenizer()
SMALL = PlannerConfig(n_simulations=8, top_k=4, max_depth=2, leaf_batch=4)
GREEDY = SamplingParams(temperature=0.0)


def constant(value: float):
    """A verifier whose value carries no information."""
    def for_batch(contexts):
        return lambda states, roots, tokens: torch.full((states.batch, 1), value)
    return for_batch


class Preferring:
    """A verifier that values 1 the continuations starting with a token `wanted` accepts, else 0; it can
    be held (`hold()`), which blocks the planner's worker inside the search until `go()`."""

    def __init__(self, wanted):
        self.wanted, self.release, self.searches = wanted, threading.Event(), 0
        self.release.set()

    def hold(self):
        self.release.clear()

    def go(self):
        self.release.set()

    def __call__(self, contexts):
        self.searches += 1
        assert self.release.wait(timeout=120), "the test never released the planner"

        def value(states, roots, tokens):
            return torch.tensor([float(t >= 0 and self.wanted(t)) for t in tokens[:, 0].tolist()]).unsqueeze(1)
        return value


class AvoidingEmitted(Preferring):
    """Values 1 every continuation that does not start with the token the generator emitted at the plan's
    decision position, 0 the one that does: every plan disagrees with the generator, so every plan that
    lands blends. It waits in the search until that token is out (so every plan is late, and caught up).
    Comparing with what the generator emitted, not with a fresh greedy pass over the context, keeps it
    exact when earlier blends moved the generator's state (or bf16 paths break near-ties differently)."""

    def __init__(self):
        super().__init__(None)
        self.session = None   # the session whose plans it values, set once submitted

    def __call__(self, contexts):
        self.searches += 1
        assert self.release.wait(timeout=120), "the test never released the planner"
        session, deadline = self.session, time.monotonic() + 120
        while any(len(session.sequence) <= len(c) for c in contexts) and session.status is not SessionStatus.FINISHED:
            assert time.monotonic() < deadline, "the generator never reached the plan's decision position"
            time.sleep(0.001)
        emitted = [session.sequence[len(c)] if len(session.sequence) > len(c) else -1 for c in contexts]

        def value(states, roots, tokens):
            return torch.tensor([float(t >= 0 and t != emitted[r])
                                 for r, t in zip(roots.tolist(), tokens[:, 0].tolist())]).unsqueeze(1)
        return value


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return MambaLM(tiny_config()).eval()


def model_with(backbone, **verifiers) -> CRSMModel:
    return CRSMModel(backbone, tokenizer=TOKENIZER, verifiers=verifiers,
                     config=DeliberationConfig(planner=SMALL))


def request(prompt, n, deliberation=None, sampling=GREEDY):
    return GenerationRequest(tuple(TOKENIZER.encode(prompt)), n, sampling, ignore_eos=True, deliberation=deliberation)


async def engine_for(crsm, **config) -> Engine:
    engine = Engine.for_model(crsm, EngineConfig(max_sessions=4, **config))
    engine.start()
    return engine


def counters(completion) -> dict[str, int]:
    return completion.done.deliberation


def accounted(c: dict[str, int]) -> None:
    """Every plan launched finished (its result resolved exactly once), was cancelled, or failed."""
    assert c["launched"] == c["produced"] + c["cancelled"] + c["failed"], c
    resolved = sum(c[k] for k in ("applied", "applied_late", "pruned", "vetoed", "diverged", "rejected"))
    assert c["produced"] == resolved, c


# ---- speculation and its check ------------------------------------------------------------------------

async def test_speculated_tokens_are_the_generators_own_at_any_temperature(backbone):
    """A plan speculates `lag` tokens drawn as its generator draws them (same sampler, seed and counter):
    none of its prefixes diverges, seeded sampling included."""
    crsm = model_with(backbone)
    engine = await engine_for(crsm)
    try:
        config = DeliberationConfig(lag=3, planner=SMALL, use_suggestions=False)
        sessions = engine.submit_all([request("speculate", 64, config, SamplingParams(temperature=1.0, seed=s))
                                      for s in (1, 2)] + [request("greedy", 64, config)])
        # how many plans finish within a session depends on how fast the planner thread runs beside the
        # generator (a loaded CI machine: one in 48 tokens); each session needs one to check
        for done in [await s.collect() for s in sessions]:
            c = counters(done)
            accounted(c)
            assert c["produced"] >= 1 and c["diverged"] == 0, c
            assert c["applied"] + c["applied_late"] >= 1, c
    finally:
        await engine.shutdown()
        crsm.close()


async def test_a_plan_whose_assumed_tokens_were_not_emitted_diverges(backbone):
    """An untrained latent dynamics model (allowed here by a claimed fidelity) speculates tokens the
    generator does not emit: those plans are resolved DIVERGED, naming the position, never applied."""
    crsm = CRSMModel(backbone, tokenizer=TOKENIZER, config=DeliberationConfig(planner=SMALL), dynamics_top1=1.0)
    engine = await engine_for(crsm)
    try:
        config = DeliberationConfig(lag=4, steps="dynamics", planner=SMALL, use_suggestions=False)
        done = await engine.submit(request("diverge", 64, config)).collect()
        c = counters(done)
        accounted(c)
        diverged = [e for e in done.injections if e.outcome is InjectionOutcome.DIVERGED]
        assert diverged and c["diverged"] == len(diverged)
        assert all(e.reason.startswith("assumed token") and "the generator emitted" in e.reason for e in diverged)
    finally:
        await engine.shutdown()
        crsm.close()


async def test_latent_dynamics_steps_need_a_measured_fidelity(backbone):
    crsm = model_with(backbone)   # no training report: fidelity not measured
    engine = await engine_for(crsm)
    try:
        with pytest.raises(RequestError, match="top-1 agreement") as e:
            engine.submit(request("x", 4, DeliberationConfig(steps="dynamics")))
        assert e.value.param == "deliberation"
        with pytest.raises(RequestError, match="unknown verifier 'nope'"):
            engine.submit(request("x", 4, DeliberationConfig(verifier="nope")))
    finally:
        await engine.shutdown()
        crsm.close()


# ---- what a plan holds, and late plans (the runtime) --------------------------------------------------

def exact_state(backbone, tokens):
    state = backbone.allocate_state(1)
    with torch.inference_mode():
        logits = backbone.prefill(torch.tensor([tokens]), state)
    return state, logits


def plan(runtime, crsm, prompt, log, lead, config):
    """One plan from the exact state after `prompt`, with the session's token log `log`."""
    state, logits = exact_state(crsm.backbone, prompt)
    request = PlanRequest(1, config, state, logits, len(prompt), TokenLog(log), GREEDY, 0, 0, lead,
                          crsm.veto_threshold)
    [future] = runtime.submit([request])
    return future.result(timeout=120)


def test_a_plan_decides_the_position_it_reached_and_holds_the_state_after_its_action(backbone):
    crsm = model_with(backbone, constant=constant(0.5))
    runtime = crsm.planner_runtime()
    try:
        prompt = TOKENIZER.encode("a plan from here")
        t, lead = len(prompt), 3
        result = plan(runtime, crsm, prompt, prompt, lead, DeliberationConfig(planner=SMALL, verifier="constant"))
        entry = result.entry
        assert result.outcome is None                     # the session is still at t: on time
        # speculated: the greedy continuation of exact steps
        greedy, ids = [], list(prompt)
        for _ in range(lead):
            _, logits = exact_state(backbone, ids)
            greedy.append(int(logits.argmax()))
            ids.append(greedy[-1])
        assert entry.assumed_tokens == tuple(greedy) and entry.decision_position == t + lead
        # the root's priors are the exact logits there
        _, root_logits = exact_state(backbone, ids)
        assert entry.candidates == tuple(torch.sort(root_logits[0], descending=True, stable=True)[1][:4].tolist())
        # no information in the value: the choice is the model's own argmax
        assert entry.action == int(root_logits.argmax())
        # the target is the state of position r + 1 after reading a*
        assert entry.state_position == t + lead + 1
        child, _ = exact_state(backbone, ids + [entry.action])
        assert torch.allclose(entry.target_state.ssm, child.ssm, atol=1e-5)
        assert torch.allclose(entry.target_state.conv, child.conv, atol=1e-5)
    finally:
        runtime.close()
        crsm.close()


def test_late_plans_are_resolved_or_caught_up_exactly_by_the_worker(backbone):
    prompt = TOKENIZER.encode("late by design")
    t = len(prompt)
    _, logits = exact_state(backbone, prompt)
    first, second = torch.sort(logits[0], descending=True, stable=True)[1][:2].tolist()
    prefer_second = Preferring(lambda token: token == second)
    crsm = model_with(backbone, second=prefer_second, constant=constant(0.5))
    runtime = crsm.planner_runtime()
    try:
        emitted = prompt + [first] + TOKENIZER.encode(" and on it went")   # the generator moved on
        config = DeliberationConfig(lag=0, planner=SMALL, verifier="second")
        late = plan(runtime, crsm, prompt, emitted, 0, config)
        entry = late.entry
        assert late.outcome is None and entry.action == second and first in entry.beats
        # caught up through the emitted tokens, to a token or so behind the generator
        assert len(emitted) - GENERATOR_CATCH_UP <= entry.state_position <= len(emitted) and entry.lateness > 0
        exact, _ = exact_state(backbone, prompt + [second] + emitted[t + 1:entry.state_position])
        assert torch.allclose(entry.target_state.ssm, exact.ssm, atol=1e-5)
        assert torch.allclose(entry.target_state.conv, exact.conv, atol=1e-5)
        # a late plan that chose the emitted token has nothing left to do
        agreed = plan(runtime, crsm, prompt, emitted, 0, dataclasses.replace(config, verifier="constant"))
        assert (agreed.outcome, agreed.effect) == (InjectionOutcome.APPLIED_LATE, Effect.NONE)
        assert agreed.entry.state_position == t + 1                   # never stepped
        # one whose speculated token was not emitted diverged
        other = [x for x in range(256) if x != first][0]
        diverged = plan(runtime, crsm, prompt, prompt + [other] + emitted[t + 1:], 1, config)
        assert diverged.outcome is InjectionOutcome.DIVERGED
    finally:
        runtime.close()
        crsm.close()


# ---- through the engine: late plans land, the generator never waits ----------------------------------

async def test_a_late_plan_lands_caught_up_and_the_generator_never_waited(backbone):
    odd = AvoidingEmitted()
    crsm = model_with(backbone, odd=odd)
    engine = await engine_for(crsm)
    try:
        config = DeliberationConfig(lag=0, planner=SMALL, verifier="odd", injection_rate=1.0, use_suggestions=False,
                                    layer_weights=(1.0,) * 4, blend_conv=True, max_target_norm_ratio=1e6)
        odd.hold()
        session = odd.session = engine.submit(request("wait for me", 200, config))
        while len(session.tokens) < 12:      # the planner is stuck in its first search meanwhile
            await asyncio.sleep(0.005)
        assert odd.searches == 1 and session.deliberator.busy
        odd.go()
        done = await session.collect()
        c = counters(done)
        accounted(c)
        assert c["waited"] == 0 and c["launched"] >= 1
        landed = [e for e in done.injections if e.outcome in (InjectionOutcome.APPLIED, InjectionOutcome.APPLIED_LATE)]
        first = done.injections[0]
        assert first.captured_position == len("wait for me") and first.lateness >= 12 - 1 - GENERATOR_CATCH_UP
        assert (first.outcome, first.effect) == (InjectionOutcome.APPLIED_LATE, Effect.BLENDED)
        assert first.reason.startswith("caught up through") and first.alpha   # every plan disagrees: all blend
        assert all(e.effect is Effect.BLENDED for e in landed), [e for e in landed if e.effect is not Effect.BLENDED]
        assert (c["applied"] + c["applied_late"]) / max(1, c["produced"] - c["vetoed"]) >= 0.5
    finally:
        odd.go()
        await engine.shutdown()
        crsm.close()


async def test_a_failing_planner_fails_its_plans_not_the_session(backbone):
    def broken(contexts):
        raise RuntimeError("checker crashed")

    crsm = model_with(backbone, broken=broken)
    engine = await engine_for(crsm)
    try:
        failing, healthy = engine.submit_all([request("a", 24, DeliberationConfig(planner=SMALL, verifier="broken")),
                                              request("b", 24)])
        failed, fine = await failing.collect(), await healthy.collect()
        c = counters(failed)
        assert c["failed"] >= 1 and c["produced"] == 0 and failed.done.usage.completion_tokens == 24
        accounted(c)
        assert fine.done.usage.completion_tokens == 24
    finally:
        await engine.shutdown()
        crsm.close()


async def test_closing_a_session_cancels_its_plan(backbone):
    stuck = Preferring(lambda token: True)
    crsm = model_with(backbone, stuck=stuck)
    engine = await engine_for(crsm, max_new_tokens=10**6)
    try:
        stuck.hold()
        session = engine.submit(request("cancel me", 10**6, DeliberationConfig(planner=SMALL, verifier="stuck")))
        while stuck.searches == 0:
            await asyncio.sleep(0.005)
        session.cancel()
        done = await session.collect()
        assert done.done.finish_reason == "cancelled"
        c = counters(done)
        assert c["cancelled"] == 1 and c["produced"] == 0
        accounted(c)
        assert engine.num_planners == 0
        stuck.go()                            # the worker stops at its next step: nothing is delivered
        runtime = engine.planner_runtime
        while not runtime.idle:
            await asyncio.sleep(0.01)
        assert counters(done) == c
    finally:
        stuck.go()
        await engine.shutdown()
        crsm.close()


# ---- the synchronous mode ----------------------------------------------------------------------------

async def test_synchronous_deliberation_is_reproducible(backbone):
    """Identical requests give identical tokens and plan outcomes, together or alone, greedy or seeded,
    with plans that act (a checker that prefers odd tokens, suggestions on)."""
    crsm = model_with(backbone, odd=Preferring(lambda token: token % 2 == 1))
    engine = await engine_for(crsm)
    try:
        config = DeliberationConfig(synchronous=True, planner=SMALL, verifier="odd")
        for sampling in (GREEDY, SamplingParams(temperature=1.0, seed=7)):
            together = await asyncio.gather(*(s.collect() for s in engine.submit_all(
                [request("same", 16, config, sampling) for _ in range(3)])))
            alone = await engine.submit(request("same", 16, config, sampling)).collect()
            runs = together + [alone]
            outcomes = [[(e.position, e.target_position, e.outcome, e.effect, e.action) for e in r.injections]
                        for r in runs]
            assert all(r.token_ids == alone.token_ids for r in runs), ([r.token_ids for r in runs], outcomes)
            assert all(o == outcomes[-1] for o in outcomes), outcomes
            c = counters(alone)
            accounted(c)
            # a plan for every position; the session parks for those not in when it gets there (on a
            # loaded machine a plan can finish between its launch and that check: no park)
            assert c["launched"] >= 16 and 1 <= c["waited"] <= c["launched"] and c["suggested"] >= 1
    finally:
        await engine.shutdown()
        crsm.close()


async def test_a_parked_session_does_not_hold_the_others_and_its_wait_is_bounded(backbone):
    stuck = Preferring(lambda token: True)
    crsm = model_with(backbone, stuck=stuck)
    engine = await engine_for(crsm)
    try:
        stuck.hold()
        waiting = engine.submit(request("sync", 6, DeliberationConfig(synchronous=True, planner=SMALL,
                                                                       verifier="stuck", synchronous_timeout_s=600)))
        others = await engine.submit(request("free", 20)).collect()
        assert others.done.usage.completion_tokens == 20 and waiting.tokens == []   # parked all along
        stuck.go()
        done = await waiting.collect()
        assert done.done.usage.completion_tokens == 6 and counters(done)["timed_out"] == 0
        # a bounded wait: past synchronous_timeout_s the session goes on without its plan
        stuck.hold()
        bounded = engine.submit(request("sync", 4, DeliberationConfig(synchronous=True, planner=SMALL,
                                                                       verifier="stuck", synchronous_timeout_s=0.05)))
        while len(bounded.tokens) < 4:
            await asyncio.sleep(0.01)
        stuck.go()
        c = counters(await bounded.collect())
        assert c["timed_out"] >= 1
        accounted(c)
    finally:
        stuck.go()
        await engine.shutdown()
        crsm.close()


# ---- the veto ----------------------------------------------------------------------------------------

async def test_the_veto_threshold_is_the_heads_calibrated_one(backbone):
    heads = ValueHeads(dataclasses.replace(ValueHeadsConfig.for_model(backbone.config, hidden=8),
                                           veto_threshold=0.0, beats_prior=True)).eval()
    strict = CRSMModel(backbone, tokenizer=TOKENIZER, value_heads=heads, config=DeliberationConfig(planner=SMALL))
    assert strict.veto_threshold == 0.0
    engine = await engine_for(strict)
    try:
        done = await engine.submit(request("vetoed", 32, DeliberationConfig(synchronous=True, planner=SMALL))).collect()
        c = counters(done)
        assert c["produced"] >= 1 and c["vetoed"] == c["produced"]
        assert all("> threshold 0" in e.reason for e in done.injections)
        # a request may set its own threshold
        lenient = await engine.submit(request("vetoed", 8, DeliberationConfig(synchronous=True, planner=SMALL,
                                                                               veto_threshold=1.0))).collect()
        assert counters(lenient)["vetoed"] == 0
    finally:
        await engine.shutdown()
        strict.close()
    # uncalibrated heads veto nothing; the bundled model's threshold is the one stage 3's calibration wrote
    assert model_with(backbone).veto_threshold == float("inf")
    bundled = CRSMModel.from_pretrained(DEFAULT_MODEL_DIR)
    try:
        assert bundled.veto_threshold == bundled.value_heads.config.veto_threshold
        assert 0 < bundled.veto_threshold < 1 and bundled.value_heads.config.veto_percentile == 99.0
    finally:
        bundled.close()


# ---- the bundled model: delivery does no harm, a checker helps ----------------------------------------

def held_out(n: int) -> list[str]:
    from crsm_core.training.config import load_config
    from crsm_core.tasks import heldout_prompts
    cfg = load_config("configs/small.yaml")
    return heldout_prompts(cfg.tasks, n, cfg.seed)


async def complete_all(crsm, prompts, deliberation):
    sessions = crsm.engine().submit_all([GenerationRequest(tuple(TOKENIZER.encode(p)), 8, GREEDY,
                                                           deliberation=deliberation) for p in prompts])
    return [await s.collect() for s in sessions]


@pytest.mark.slow
async def test_on_the_bundled_model_a_value_without_information_changes_nothing():
    """Synchronous deliberation with a constant value: every plan chooses the model's own token, and the
    output equals the output without deliberation, token for token."""
    crsm = CRSMModel.from_pretrained(DEFAULT_MODEL_DIR)
    crsm.verifiers["constant"] = constant(0.5)
    try:
        prompts = held_out(24)
        off = await complete_all(crsm, prompts, None)
        on = await complete_all(crsm, prompts, DeliberationConfig(synchronous=True, verifier="constant",
                                                                  planner=PlannerConfig(n_simulations=16)))
        for a, b in zip(off, on):
            assert b.token_ids == a.token_ids
            c = counters(b)
            accounted(c)
            assert c["applied"] == c["produced"] == c["launched"] and c["blended"] == 0
            sequence = list(TOKENIZER.encode(prompts[off.index(a)])) + b.token_ids
            assert all(sequence[e.target_position] == e.action for e in b.injections)
    finally:
        crsm.close()


@pytest.mark.slow
async def test_on_the_bundled_model_the_arithmetic_checker_fixes_greedy_errors():
    """With the arithmetic checker as value (the checker on the prefix), synchronous deliberation fixes
    greedy's errors whose right token is among the search's candidates, and breaks no right answer."""
    from crsm_core.tasks import check
    crsm = CRSMModel.from_pretrained(DEFAULT_MODEL_DIR)
    try:
        prompts = held_out(120)
        off = await complete_all(crsm, prompts, None)
        wrong = [p for p, c in zip(prompts, off) if not check(p, TOKENIZER.decode(c.token_ids))]
        right = [p for p, c in zip(prompts, off) if check(p, TOKENIZER.decode(c.token_ids))][:12]
        assert len(wrong) >= 4
        config = DeliberationConfig(synchronous=True, verifier="arithmetic", planner=PlannerConfig(n_simulations=16))
        fixed = await complete_all(crsm, wrong + right, config)
        answers = [check(p, TOKENIZER.decode(c.token_ids)) for p, c in zip(wrong + right, fixed)]
        assert sum(answers[:len(wrong)]) >= len(wrong) / 2
        assert all(answers[len(wrong):])
    finally:
        crsm.close()
