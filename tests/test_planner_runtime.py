"""The planner runtime: plans of several sessions batched into one search give each session what it
would get alone (with its own gates); in "ride" mode the planner's steps ride in the engine's decode
step and give the plans of exact steps; a plan of closed sessions stops; the memory a plan needs is
checked before it is accepted."""
import asyncio
import threading
from dataclasses import replace

import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.deliberation import DeliberationConfig
from crsm_core.engine import Engine, EngineConfig, GenerationRequest, RequestError
from crsm_core.model import CRSMModel
from crsm_core.planner import PlannerConfig
from crsm_core.planner.runtime import LeadEstimator, PlanCancelled, PlannerRuntime, PlanRequest, TokenLog
from crsm_core.sampling import SamplingParams
from crsm_core.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

PLANNER = PlannerConfig(n_simulations=6, top_k=3, max_depth=2, leaf_batch=3)
CONFIG = DeliberationConfig(lag=2, planner=PLANNER, injection_rate=0.5)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def crsm():
    torch.manual_seed(0)
    model = CRSMModel(MambaLM(tiny_config()).eval(), tokenizer=ByteTokenizer())
    yield model
    model.close()


def snapshots(backbone, n, length=9, seed=0):
    """n prefilled 1-row states (different prompts), their logits and prompts."""
    torch.manual_seed(seed)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            prompt = torch.randint(0, 256, (length,)).tolist()
            state = backbone.allocate_state(1)
            logits = backbone.prefill(torch.tensor([prompt]), state)
            out.append((state, logits, prompt))
    return out


def requests_for(config, states, first_id=1):
    return [PlanRequest(first_id + i, config, s.clone(), l.clone(), len(p), TokenLog(p), GREEDY, 0, 0,
                        config.lag, float("inf")) for i, (s, l, p) in enumerate(states)]


def results(runtime, requests):
    return [f.result(timeout=120) for f in runtime.submit(requests)]


def test_batched_plans_equal_plans_made_alone(crsm):
    runtime = crsm.planner_runtime()
    try:
        states = snapshots(crsm.backbone, 3)
        together = results(runtime, requests_for(CONFIG, states))
        alone = [results(runtime, requests_for(CONFIG, [s]))[0] for s in states]
        assert runtime.batches == 4
        for a, b in zip(together, alone):
            a, b = a.entry, b.entry
            assert a.action == b.action and a.decision_position == b.decision_position == 11
            assert a.assumed_tokens == b.assumed_tokens
            torch.testing.assert_close(a.target_state.ssm, b.target_state.ssm, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.alpha, b.alpha, rtol=1e-5, atol=1e-6)
        # each session's own gates: a second session at another injection rate in the same batch
        mixed = requests_for(CONFIG, states[:1]) + requests_for(replace(CONFIG, injection_rate=0.25), states[:1], 9)
        a, b = (r.entry for r in results(runtime, mixed))
        torch.testing.assert_close(b.alpha, a.alpha / 2)
        assert (a.generation_id, b.generation_id) == (1, 9)
    finally:
        runtime.close()


async def test_ride_mode_gives_the_plans_of_exact_steps(crsm):
    """A plan whose steps rode in the engine's decode step (beside a running session) equals the plan of
    the stream runtime's steps, and the rows did not disturb the session."""
    engine = Engine(crsm.backbone, crsm.tokenizer, EngineConfig(max_sessions=2, planner_mode="ride", ride_rows=4))
    ride_runtime = crsm.planner_runtime("ride", ride=engine.ride_step)
    stream_runtime = crsm.planner_runtime()
    engine.start()
    try:
        busy = engine.submit(GenerationRequest((1, 2, 3), 200, GREEDY, ignore_eos=True))
        states = snapshots(crsm.backbone, 2, seed=3)
        ridden = [await asyncio.wrap_future(f) for f in ride_runtime.submit(requests_for(CONFIG, states))]
        expected = results(stream_runtime, requests_for(CONFIG, states))
        for a, b in zip(ridden, expected):
            assert a.entry.action == b.entry.action and a.entry.assumed_tokens == b.entry.assumed_tokens
            torch.testing.assert_close(a.entry.target_state.ssm, b.entry.target_state.ssm, rtol=1e-4, atol=1e-5)
        assert ride_runtime.rows_stepped > 0
        result = await busy.collect()
        alone = await engine.submit(GenerationRequest((1, 2, 3), 200, GREEDY, ignore_eos=True)).collect()
        assert result.token_ids == alone.token_ids
    finally:
        await engine.shutdown()
        stream_runtime.close()
        ride_runtime.close()


def test_auto_planner_mode_rides_on_a_gpu_only():
    from crsm_core.planner.runtime import resolve_planner_mode
    assert resolve_planner_mode("auto", torch.device("cpu")) == "stream"
    assert resolve_planner_mode("auto", torch.device("cuda")) == "ride"
    assert resolve_planner_mode("stream", torch.device("cuda")) == "stream"
    with pytest.raises(ValueError, match="planner mode"):
        resolve_planner_mode("fast", torch.device("cpu"))


async def test_ride_engine_runs_deliberating_sessions_to_the_end(crsm):
    engine = Engine.for_model(crsm, EngineConfig(max_sessions=4, planner_mode="ride", ride_rows=3))
    engine.start()
    try:
        sessions = engine.submit_all([GenerationRequest(tuple(range(i + 1, i + 6)), 60, SamplingParams(seed=i),
                                                        ignore_eos=True, deliberation=CONFIG) for i in range(3)])
        for result in await asyncio.gather(*(s.collect() for s in sessions)):
            c = result.done.deliberation
            assert len(result.token_ids) == 60
            assert c["launched"] == c["produced"] + c["cancelled"] + c["failed"] and c["failed"] == 0
            assert c["produced"] == sum(c[k] for k in ("applied", "applied_late", "pruned", "vetoed", "diverged",
                                                      "rejected"))
            assert c["produced"] >= 1 and c["state_steps"] >= c["produced"] * CONFIG.lag
            assert len(result.injections) == c["produced"]
        assert engine.num_planners == 0
    finally:
        await engine.shutdown()
    assert not [t for t in threading.enumerate() if t.name == "crsm-planner" and t.is_alive()]


def test_a_plan_of_closed_sessions_stops_at_its_next_step(crsm):
    release, reached = threading.Event(), threading.Event()

    def held(tokens, state):   # the worker's first step waits until the sessions have closed
        reached.set()
        assert release.wait(timeout=60)
        return crsm.backbone.step(tokens, state)

    runtime = PlannerRuntime(crsm.backbone, crsm.dynamics.step, crsm.value_heads)
    runtime._steps["exact"] = held
    try:
        requests = requests_for(CONFIG, snapshots(crsm.backbone, 2))
        futures = runtime.submit(requests)
        assert reached.wait(timeout=60)
        for r in requests:
            r.cancelled.set()
        release.set()
        for f in futures:
            assert isinstance(f.exception(timeout=60), PlanCancelled)
        assert all(r.snapshot is None for r in requests)   # the plan let go of its snapshots
    finally:
        release.set()
        runtime.close()


async def test_rides_after_the_engine_stopped_are_cancelled_plans(crsm):
    engine = Engine(crsm.backbone, crsm.tokenizer, EngineConfig(max_sessions=2, planner_mode="ride", ride_rows=4))
    engine.start()
    await engine.shutdown()
    future = engine.ride(torch.zeros(1, dtype=torch.long), crsm.backbone.allocate_state(1))
    assert isinstance(future.exception(timeout=5), PlanCancelled)


async def test_a_plan_that_needs_more_memory_than_the_budget_is_refused(crsm):
    runtime = crsm.planner_runtime()
    engine = Engine.for_model(crsm, EngineConfig(max_sessions=2))
    engine.start()
    try:
        one_root = runtime.plan_bytes(PLANNER)
        assert one_root == (PLANNER.capacity + 2 * PLANNER.leaf_batch + 1) * runtime.row_bytes
        engine.planner_runtime.memory_budget_bytes = 3 * one_root
        assert engine.planner_runtime.roots_that_fit(PLANNER) == 3
        big = replace(CONFIG, planner=replace(PLANNER, n_simulations=200))
        with pytest.raises(RequestError, match="MiB of planner memory per plan") as e:
            engine.submit(GenerationRequest((1, 2, 3), 4, GREEDY, deliberation=big))
        assert e.value.param == "deliberation"
        # within the budget, a batch takes only as many roots as fit
        sessions = engine.submit_all([GenerationRequest((1, 2, 3 + i), 30, GREEDY, ignore_eos=True,
                                                        deliberation=CONFIG) for i in range(2)])
        for s in sessions:
            assert (await s.collect()).done.deliberation["failed"] == 0
    finally:
        await engine.shutdown()
        runtime.close()


def test_the_lead_follows_the_measured_speeds():
    lead = LeadEstimator(smoothing=1.0)
    assert lead.lead(32) == 0                        # nothing measured yet: plan for now
    # a generator at 100 positions/s, a planner at 5 ms a speculated token, 50 ms of search: on time from
    # L >= 100 * 0.05 / (1 - 0.5) = 10 tokens
    lead.observe(positions=20, elapsed_s=0.2, lead=4, speculate_s=0.02, rest_s=0.05)
    assert lead.lead(32) == 11 and lead.lead(8) == 8
    # a planner no faster than the generator can never get ahead: no speculation
    lead.observe(positions=20, elapsed_s=0.2, lead=4, speculate_s=0.04, rest_s=0.05)
    assert lead.lead(32) == 0
