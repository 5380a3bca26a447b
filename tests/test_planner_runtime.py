"""The planner runtime: plans of several sessions batched into one search give each session what it
would get alone; in "ride" mode the planner's steps ride in the engine's decode step and give the plans
of exact steps; closing a session drops its plan."""
import asyncio
import threading
from dataclasses import replace

import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.deliberation import DeliberationConfig, SessionDeliberator
from crsm_core.engine import Engine, EngineConfig, GenerationRequest
from crsm_core.model import CRSMModel
from crsm_core.planner import PlannerConfig
from crsm_core.planner.runtime import PlanCancelled, PlanRequest
from crsm_core.sampling import SamplingParams
from crsm_core.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

PLANNER = PlannerConfig(n_simulations=6, top_k=3, max_depth=2, leaf_batch=3)
EXACT = DeliberationConfig(lag=2, fast_forward="exact", children="exact", planner=PLANNER, injection_rate=0.5,
                           veto_threshold=1e9, synchronous=True)


@pytest.fixture(scope="module")
def crsm():
    torch.manual_seed(0)
    model = CRSMModel(MambaLM(tiny_config()).eval(), tokenizer=ByteTokenizer())
    yield model
    model.close()


def snapshots(backbone, n, length=9, seed=0):
    """n prefilled 1-row states (different prompts) and their logits."""
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            state = backbone.allocate_state(1)
            logits = backbone.prefill(torch.randint(0, 256, (1, length)), state)
            out.append((state, logits))
    return out


def requests_for(runtime, config, states, first_id=1):
    return [PlanRequest(SessionDeliberator(runtime, config, first_id + i), s.clone(), l.clone(), 9)
            for i, (s, l) in enumerate(states)]


def test_batched_plans_equal_plans_made_alone(crsm):
    runtime = crsm.planner_runtime()
    states = snapshots(crsm.backbone, 3)
    together = runtime.plan_now(requests_for(runtime, EXACT, states))
    alone = [runtime.plan_now(requests_for(runtime, EXACT, [s]))[0] for s in states]
    assert len(together) == 3
    for a, b in zip(together, alone):
        assert a.action == b.action and a.target_position == b.target_position == 11
        torch.testing.assert_close(a.target_state.ssm, b.target_state.ssm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.alpha, b.alpha, rtol=1e-5, atol=1e-6)
    # each session's own gates: a second session at another injection rate in the same batch
    mixed = requests_for(runtime, EXACT, states[:1]) + requests_for(runtime, replace(EXACT, injection_rate=0.25),
                                                                     states[:1], first_id=9)
    a, b = runtime.plan_now(mixed)
    torch.testing.assert_close(b.alpha, a.alpha / 2)
    assert (a.generation_id, b.generation_id) == (1, 9)
    runtime.close()


async def test_ride_mode_gives_the_plans_of_exact_steps(crsm):
    """A plan whose steps rode in the engine's decode step (beside a running session) equals the plan of
    the stream runtime's exact steps."""
    engine = Engine(crsm.backbone, crsm.tokenizer, EngineConfig(max_sessions=2, planner_mode="ride", ride_rows=4))
    ride_runtime = crsm.planner_runtime("ride", ride=engine.ride, ride_rows=4)
    stream_runtime = crsm.planner_runtime()
    engine.start()
    try:
        busy = engine.submit(GenerationRequest((1, 2, 3), 200, SamplingParams(temperature=0.0), ignore_eos=True))
        states = snapshots(crsm.backbone, 2, seed=3)
        config = replace(EXACT, synchronous=False)
        futures = ride_runtime.submit(requests_for(ride_runtime, config, states))
        ridden = [await asyncio.wrap_future(f) for f in futures]
        expected = stream_runtime.plan_now(requests_for(stream_runtime, EXACT, states))
        for a, b in zip(ridden, expected):
            assert a.action == b.action
            torch.testing.assert_close(a.target_state.ssm, b.target_state.ssm, rtol=1e-4, atol=1e-5)
        result = await busy.collect()
        assert len(result.token_ids) == 200
        # the rows the planner added did not disturb the session beside them
        alone = await engine.submit(GenerationRequest((1, 2, 3), 200, SamplingParams(temperature=0.0),
                                                      ignore_eos=True)).collect()
        assert result.token_ids == alone.token_ids
    finally:
        await engine.shutdown()
        stream_runtime.close()
    # a synchronous plan cannot ride (its caller is the generator): it steps inline, to the same plan
    inline = ride_runtime.plan_now(requests_for(ride_runtime, EXACT, states[:1]))[0]
    assert inline.action == expected[0].action
    torch.testing.assert_close(inline.target_state.ssm, expected[0].target_state.ssm, rtol=1e-5, atol=1e-6)
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
    config = DeliberationConfig(lag=2, planner=PLANNER, injection_rate=0.5, veto_threshold=1e9)
    try:
        sessions = engine.submit_all([GenerationRequest(tuple(range(i + 1, i + 6)), 60, SamplingParams(seed=i),
                                                        ignore_eos=True, deliberation=config) for i in range(3)])
        results = await asyncio.gather(*(s.collect() for s in sessions))
        for result in results:
            c = result.done.deliberation
            assert len(result.token_ids) == 60
            assert c["launched"] == c["produced"] + c["cancelled"] + c["failed"] and c["failed"] == 0
            assert c["produced"] == c["applied"] + c["applied_late"] + c["pruned"] + c["vetoed"] + c["rejected"]
            assert c["produced"] >= 1 and c["state_steps"] >= c["produced"] * config.lag
            assert len(result.injections) == c["produced"]
        assert engine.num_planners == 0
    finally:
        await engine.shutdown()
    assert not [t for t in threading.enumerate() if t.name == "crsm-planner" and t.is_alive()]


async def test_a_closed_sessions_plan_is_dropped(crsm):
    runtime = crsm.planner_runtime()
    release = threading.Event()

    class Held:   # the worker's first step waits until the session has closed
        def step(self, tokens, state):
            assert release.wait(timeout=30)
            return crsm.backbone.step(tokens, state)

    runtime._steppers["exact"] = Held()
    config = DeliberationConfig(lag=2, fast_forward="exact", children="exact", planner=PLANNER)
    delib = SessionDeliberator(runtime, config, 1)
    (state, logits), = snapshots(crsm.backbone, 1)
    delib.observe(9, state, logits)
    while runtime.idle:
        await asyncio.sleep(0.001)
    closing = asyncio.create_task(delib.close())
    await asyncio.sleep(0.01)
    release.set()
    assert await closing == []
    while not runtime.idle:
        await asyncio.sleep(0.001)
    c = delib.counters()
    assert (c["launched"], c["cancelled"], c["produced"]) == (1, 1, 0)
    runtime.close()


async def test_an_inline_plan_is_not_stopped_by_the_workers_closed_batch(crsm):
    """The worker holds a plan of a closed session; a synchronous plan of a live session meanwhile runs."""
    runtime = crsm.planner_runtime()
    release = threading.Event()

    class Held:
        def step(self, tokens, state):
            assert release.wait(timeout=30)
            return crsm.backbone.step(tokens, state)

    runtime._steppers["exact"] = Held()
    closed = SessionDeliberator(runtime, DeliberationConfig(lag=2, fast_forward="exact", planner=PLANNER), 1)
    (state, logits), = snapshots(crsm.backbone, 1)
    closed.observe(9, state, logits)
    while runtime.idle:
        await asyncio.sleep(0.001)
    await closed.close()
    live = SessionDeliberator(runtime, replace(EXACT, fast_forward="dynamics", children="dynamics"), 2)
    entry = live.plan(state.clone(), 9, logits.clone())
    assert entry.generation_id == 2 and entry.target_position == 11
    release.set()
    runtime.close()


async def test_rides_after_the_engine_stopped_are_cancelled_plans(crsm):
    """A planner whose rows can no longer ride sees its plan cancelled (counted), not failed."""
    engine = Engine(crsm.backbone, crsm.tokenizer, EngineConfig(max_sessions=2, planner_mode="ride", ride_rows=4))
    engine.start()
    await engine.shutdown()
    state = crsm.backbone.allocate_state(1)
    future = engine.ride(torch.zeros(1, dtype=torch.long), state)
    assert isinstance(future.exception(timeout=5), PlanCancelled)
