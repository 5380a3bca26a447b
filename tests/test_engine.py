"""The engine without HTTP: batched decoding equals one-at-a-time decoding, chunked prefill interleaves
with decoding, stop/eos/length, cancellation, the bounded queue and shutdown."""
import asyncio
import time
import weakref
from dataclasses import replace

import pytest
import torch

from crsm_core import engine_core
from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.deliberation import DeliberationConfig
from crsm_core.engine import (DoneEvent, Engine, EngineClosed, EngineConfig, ErrorEvent, GenerationRequest,
                              QueueFull, RequestError, TokenEvent)
from crsm_core.sampling import SamplingParams, SamplingTable
from crsm_core.stopping import StopMatcher
from crsm_core.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
ENDLESS = 10**6  # max_tokens of sessions that run until cancelled


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny ops on a shared 2-core machine: a second intra-op thread only adds waiting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> MambaLM:
    torch.manual_seed(0)
    return MambaLM(tiny_config()).eval()


def reference_generate(model: MambaLM, prompt: list[int], max_tokens: int, params: SamplingParams) -> list[int]:
    """Prefill the whole prompt at once, then step one row: no engine involved."""
    with torch.no_grad():
        state = model.allocate_state(1)
        logits = model.prefill(torch.tensor([prompt]), state)
        sampler, tokens = SamplingTable(1, "cpu"), []
        sampler.set_row(0, params, params.resolved_seed())
        for _ in range(max_tokens):
            tokens.append(int(sampler.sample(logits)[0]))
            logits = model.step(torch.tensor([tokens[-1]]), state)
    return tokens


def request(prompt: str | list[int], max_tokens: int, seed: int | None = 0, temperature: float = 1.0,
            **kwargs) -> GenerationRequest:
    ids = TOKENIZER.encode(prompt) if isinstance(prompt, str) else prompt
    return GenerationRequest(tuple(ids), max_tokens, SamplingParams(temperature=temperature, seed=seed), **kwargs)


async def run_engine(model, config: EngineConfig):
    engine = Engine(model, TOKENIZER, config)
    engine.start()
    return engine


async def test_batched_generation_equals_reference(model):
    # 4 slots for 7 sessions of different lengths: sessions wait, join and leave at different steps, so rows
    # are moved around; prompts are prefilled in chunks of 8 (most take several chunks).
    engine = await run_engine(model, EngineConfig(max_sessions=4, prefill_chunk=8))
    try:
        specs = [(f"prompt {i} " * (i + 1), 5 + 3 * i, i, 0.0 if i % 3 == 0 else 1.0) for i in range(7)]
        sessions = engine.submit_all([request(p, n, seed, t, ignore_eos=True) for p, n, seed, t in specs])
        results = await asyncio.gather(*(s.collect() for s in sessions))
        for (prompt, n, seed, t), result in zip(specs, results):
            expected = reference_generate(model, TOKENIZER.encode(prompt), n,
                                          SamplingParams(temperature=t, seed=seed))
            assert result.token_ids == expected
            assert result.text == TOKENIZER.decode(expected)
            assert result.done.finish_reason == "length"
            assert result.done.usage.completion_tokens == n
        assert engine.num_active == 0 and engine.num_waiting == 0
    finally:
        await engine.shutdown()


async def test_token_events_carry_positions_and_text(model):
    engine = await run_engine(model, EngineConfig(max_sessions=2))
    try:
        session = engine.submit(request("abc", 6, ignore_eos=True))
        events = [e async for e in session.stream()]
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert [e.position for e in tokens] == [3, 4, 5, 6, 7, 8]
        assert isinstance(events[-1], DoneEvent) and len(events) == 7
        assert "".join(e.text for e in tokens) == TOKENIZER.decode([e.token_id for e in tokens])
        t = events[-1].timings
        assert 0 <= t.queue_s <= t.ttft_s <= t.total_s and t.mean_itl_s > 0 and t.tokens_per_s > 0
    finally:
        await engine.shutdown()


async def test_long_prompt_is_prefilled_between_decode_steps(model):
    engine = await run_engine(model, EngineConfig(max_sessions=2, prefill_chunk=32, max_new_tokens=ENDLESS))
    try:
        streaming = engine.submit(request("a", 4000, ignore_eos=True))
        while len(streaming.tokens) < 3:
            await asyncio.sleep(0.001)
        long_prompt = list(range(256)) * 8  # 2048 tokens = 64 chunks
        late = engine.submit(request(long_prompt, 1))
        await late.collect()
        first = late.token_times[0]
        during = [t for t in streaming.token_times if late.submitted_at <= t <= first]
        # one chunk per iteration and one token per iteration: the stream kept going meanwhile
        assert len(during) >= 2048 // 32 - 2
        streaming.cancel()
        await streaming.collect()
    finally:
        await engine.shutdown()


async def test_stop_string_ends_generation_before_it(model):
    engine = await run_engine(model, EngineConfig(max_sessions=2))
    try:
        # find a seed whose output has two printable ASCII bytes in a row, and use them as the stop string
        for seed in range(200):
            tokens = reference_generate(model, TOKENIZER.encode("Q:"), 40, SamplingParams(seed=seed))
            pairs = [i for i in range(2, 39) if all(32 <= t < 127 for t in tokens[i:i + 2])]
            if pairs:
                break
        stop = bytes(tokens[pairs[0]:pairs[0] + 2]).decode()
        full = (await engine.submit(request("Q:", 40, seed, ignore_eos=True)).collect()).text
        result = await engine.submit(request("Q:", 40, seed, ignore_eos=True, stop=(stop, "never-there"))).collect()
        assert result.done.finish_reason == "stop"
        assert result.text == full[:full.index(stop)]
        assert stop not in result.text
    finally:
        await engine.shutdown()


async def test_eos_stops_unless_ignored():
    # A model whose every distribution is dominated by eos: the residual stream carries a large constant in
    # dimension 0 and only eos's output row reads it.
    torch.manual_seed(0)
    model = MambaLM(tiny_config(tie_embeddings=False)).eval()
    with torch.no_grad():
        model.backbone.embedding.weight[:, 0] = 1000.0
        model.lm_head.weight[TOKENIZER.eos_id] = 0.0
        model.lm_head.weight[TOKENIZER.eos_id, 0] = 100.0
    engine = await run_engine(model, EngineConfig(max_sessions=2))
    try:
        stopped = await engine.submit(request("hi", 5)).collect()
        assert stopped.token_ids == [TOKENIZER.eos_id] and stopped.text == ""
        assert stopped.done.finish_reason == "stop" and stopped.done.usage.completion_tokens == 1
        ignored = await engine.submit(request("hi", 5, ignore_eos=True)).collect()
        assert ignored.token_ids == [TOKENIZER.eos_id] * 5 and ignored.done.finish_reason == "length"
    finally:
        await engine.shutdown()


async def test_cancel_leaves_within_one_step_and_frees_the_slot(model):
    engine = await run_engine(model, EngineConfig(max_sessions=2, max_new_tokens=ENDLESS))
    try:
        other = engine.submit(request("keep going", ENDLESS, ignore_eos=True))
        doomed = engine.submit(request("stop me", ENDLESS, ignore_eos=True))
        while len(doomed.tokens) < 5:
            await asyncio.sleep(0.001)
        steps_at_cancel = len(doomed.tokens)
        doomed.cancel()
        done = (await doomed.collect()).done
        assert done.finish_reason == "cancelled"
        assert done.usage.completion_tokens <= steps_at_cancel + 1
        assert engine.num_active == 1
        # the freed slot is taken by the next session while the other keeps streaming
        joined = await engine.submit(request("next", 3, ignore_eos=True)).collect()
        assert joined.done.finish_reason == "length"
        other.cancel()
        await other.collect()
        assert engine.num_active == 0
    finally:
        await engine.shutdown()


async def test_full_queue_refuses_and_cancelled_waiters_leave(model):
    engine = await run_engine(model, EngineConfig(max_sessions=1, queue_size=1, retry_after_s=3, max_new_tokens=ENDLESS))
    try:
        running = engine.submit(request("x", ENDLESS, ignore_eos=True))
        while not running.tokens:
            await asyncio.sleep(0.001)
        waiting = engine.submit(request("y", 4))
        with pytest.raises(QueueFull) as refused:
            engine.submit(request("z", 4))
        assert refused.value.retry_after_s == 3
        assert engine.num_waiting == 1
        waiting.cancel()
        assert (await waiting.collect()).done.finish_reason == "cancelled"
        assert engine.num_waiting == 0
        running.cancel()
        await running.collect()
    finally:
        await engine.shutdown()


async def test_sessions_opened_together_are_admitted_in_one_iteration(model):
    # 16 clients' requests reaching `open` in one pass of the event loop (a burst through the server), each
    # after some blocking work of its own, as the front end's parsing and validation are, which lets the
    # generator run in between: all are queued with one wake-up at the pass's end, so none is prefilled
    # alone while the others wait. The first tokens of one decode round share its timestamp.
    engine = await run_engine(model, EngineConfig(max_sessions=16, prefill_chunk=256))

    async def arrive(i: int):
        time.sleep(0.002)
        return await engine.open([request(f"client {i:02d}", 3, seed=i, ignore_eos=True)])

    try:
        opened = await asyncio.gather(*(arrive(i) for i in range(16)))
        sessions = [s for [s] in opened]
        await asyncio.gather(*(s.collect() for s in sessions))
        assert len({s.token_times[0] for s in sessions}) == 1
    finally:
        await engine.shutdown()


async def test_opens_of_one_pass_are_refused_each_on_its_own(model):
    # queued together, but all or none per request: the one that does not fit is refused, the others run
    engine = await run_engine(model, EngineConfig(max_sessions=1, queue_size=2))
    try:
        results = await asyncio.gather(*(engine.open([request(f"r{i}", 2, ignore_eos=True)]) for i in range(3)),
                                       engine.open([request([1, 2, 999], 2)]), return_exceptions=True)
        assert isinstance(results[2], QueueFull) and isinstance(results[3], RequestError)
        for [session] in results[:2]:
            assert (await session.collect()).done.finish_reason == "length"
    finally:
        await engine.shutdown()


def test_an_open_message_of_the_engine_core_queues_its_requests_together(model):
    # the front end's requests of one pass of its loop, in one message: each all or none, answered per ticket
    engine = Engine(model, TOKENIZER, EngineConfig(max_sessions=1, queue_size=2))   # not started: all wait
    sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
    batch = [(0, ["a"], [request("a", 2)]), (1, ["b", "c"], [request("b", 2), request("c", 2)]),
             (2, ["d"], [request([1, 999], 2)]), (3, ["e"], [request("e", 2)])]
    try:
        replies = engine_core._open(engine, batch, sessions)
        assert [ticket for ticket, _ in replies] == [0, 1, 2, 3]
        refusals = [refusal for _, refusal in replies]
        assert refusals[0] is None and isinstance(refusals[1], QueueFull)
        assert isinstance(refusals[2], RequestError) and refusals[3] is None
        assert engine.num_waiting == 2 and set(sessions) == {"a", "e"}
    finally:
        engine.close()


@pytest.mark.parametrize("req, param", [
    (request([], 4), "prompt"),
    (request([1, 2, 260], 4), "token_ids"),
    (request("hi", 0), "max_tokens"),
    (request("hi", 65), "max_tokens"),
    (request("x" * 33, 4), "prompt"),
])
async def test_invalid_requests_are_refused(model, req, param):
    engine = Engine(model, TOKENIZER, EngineConfig(max_sessions=1, max_prompt_tokens=32, max_new_tokens=64))
    with pytest.raises(RequestError) as refused:
        engine.submit(req)
    assert refused.value.param == param
    assert engine.num_waiting == 0


async def test_shutdown_drains_then_ends_open_sessions(model):
    engine = await run_engine(model, EngineConfig(max_sessions=2, max_new_tokens=ENDLESS))
    short = engine.submit(request("a", 5, ignore_eos=True))
    endless = engine.submit(request("b", ENDLESS, ignore_eos=True))
    await engine.shutdown(drain_timeout_s=0.5)
    assert (await short.collect()).done.finish_reason == "length"
    *events, final = [e async for e in endless.stream()]
    # the drain ended at its timeout: the endless session was stopped, not waited for
    assert isinstance(final, ErrorEvent) and final.code == "shutdown"
    assert sum(isinstance(e, TokenEvent) for e in events) < ENDLESS
    with pytest.raises(EngineClosed):
        engine.submit(request("c", 1))


POISON = 7  # a prompt token whose prefill fails (BEL; no other prompt here holds it)


class PoisonedPrefill(MambaLM):
    """A backbone whose prefill raises for any chunk holding POISON, as a kernel failing on one input."""

    def prefill(self, ids, state):
        if bool((ids == POISON).any()):
            raise RuntimeError("prefill failed on purpose")
        return super().prefill(ids, state)


async def check_only_the_failing_ended(model, running, running_events, prompts, sessions, failing):
    """The sessions at the indices `failing` ended with an internal error and no tokens; the others (and
    the one already decoding meanwhile) finished with exactly their solo tokens."""
    for i, (prompt, session) in enumerate(zip(prompts, sessions)):
        final = [e async for e in session.stream()][-1]
        if i in failing:
            assert isinstance(final, ErrorEvent) and final.code == "internal_error", final
            assert session.tokens == []
        else:
            assert isinstance(final, DoneEvent) and final.finish_reason == "length", final
            ids = prompt if isinstance(prompt, list) else TOKENIZER.encode(prompt)
            assert session.tokens == reference_generate(model, ids, 12, SamplingParams(seed=i))
    assert isinstance([e async for e in running_events][-1], DoneEvent)
    assert running.tokens == reference_generate(model, TOKENIZER.encode("already streaming"), 30,
                                                SamplingParams(seed=1))


async def test_a_failing_prefill_ends_only_its_session(model):
    poisoned = PoisonedPrefill(model.config).eval()
    poisoned.load_state_dict(model.state_dict())
    # chunks of 4: the last poisoned prompt fails in its second chunk, after a first one that worked
    engine = await run_engine(poisoned, EngineConfig(max_sessions=6, prefill_chunk=4))
    try:
        running = engine.submit(request("already streaming", 30, seed=1, ignore_eos=True))
        running_events = running.stream()
        assert isinstance(await anext(running_events), TokenEvent)  # decoding when the others arrive
        specs = [("before", False), ([POISON, 1, 2], True), ("after it", False), ([1, 2, 3, 4, POISON], True)]
        sessions = engine.submit_all([request(prompt, 12, seed=i, ignore_eos=True)
                                      for i, (prompt, _) in enumerate(specs)])
        # the session that was decoding meanwhile is untouched, and the engine goes on serving
        await check_only_the_failing_ended(model, running, running_events, [p for p, _ in specs], sessions,
                                           {i for i, (_, fails) in enumerate(specs) if fails})
        assert (await engine.submit(request("later", 5, ignore_eos=True)).collect()).done.usage.completion_tokens == 5
        assert engine.num_active == 0 and engine.num_waiting == 0
    finally:
        await engine.shutdown()


async def test_a_session_failing_as_it_starts_ends_alone(model):
    # A planner that cannot be made for one prompt: the failure comes after that session's prefill, as it
    # takes a row of the batch (where an overflowing sampling parameter failed too), beside sessions that
    # are decoding, prefilling and waiting.
    doomed = tuple(TOKENIZER.encode("no planner for me"))

    def planner_for(session):
        assert session.request.prompt_ids == doomed, "only the doomed session deliberates"
        raise RuntimeError("the planner failed on purpose")

    engine = Engine(model, TOKENIZER, EngineConfig(max_sessions=3, prefill_chunk=8), deliberator_factory=planner_for)
    engine.start()
    try:
        running = engine.submit(request("already streaming", 30, seed=1, ignore_eos=True))
        running_events = running.stream()
        assert isinstance(await anext(running_events), TokenEvent)
        specs = ["before it", "no planner for me", "after it, waiting for a slot"]
        sessions = engine.submit_all([request(p, 12, seed=i, ignore_eos=True,
                                              deliberation=DeliberationConfig() if i == 1 else None)
                                      for i, p in enumerate(specs)])
        await check_only_the_failing_ended(model, running, running_events, specs, sessions, {1})
        assert engine.num_active == engine.num_waiting == engine.num_planners == 0
    finally:
        await engine.shutdown()


class FailingStopMatch(StopMatcher):
    def push(self, text):
        raise RuntimeError("stop matching failed on purpose")


async def test_a_session_failing_on_its_token_ends_alone(model):
    engine = await run_engine(model, EngineConfig(max_sessions=4))
    try:
        with engine._cond:   # the generator admits nothing before the matcher is in place
            sessions = engine.submit_all([request(f"stream {i}", 20, seed=i, ignore_eos=True) for i in range(3)])
            sessions[1]._stops = FailingStopMatch(())   # as a detokeniser raising on one session's token
        finals = [[e async for e in s.stream()][-1] for s in sessions]
        assert isinstance(finals[1], ErrorEvent) and finals[1].code == "internal_error"
        for i in (0, 2):
            assert isinstance(finals[i], DoneEvent) and finals[i].finish_reason == "length"
            assert sessions[i].tokens == reference_generate(model, TOKENIZER.encode(f"stream {i}"), 20,
                                                            SamplingParams(seed=i))
        assert engine.num_active == 0
    finally:
        await engine.shutdown()


class CountedPrefill(MambaLM):
    """A backbone that records the shape of every prefill call: [B, T] of ids."""

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[tuple[int, int]] = []

    def prefill(self, ids, state):
        self.calls.append(tuple(ids.shape))
        return super().prefill(ids, state)


def counted_copy(model: MambaLM) -> CountedPrefill:
    counted = CountedPrefill(model.config).eval()
    counted.load_state_dict(model.state_dict())
    return counted


async def test_prompts_arriving_together_are_prefilled_in_one_batch(model):
    counted = counted_copy(model)
    engine = await run_engine(counted, EngineConfig(max_sessions=16, prefill_chunk=256))
    try:
        prompts = [f"p{i:02d}" + "x" * (i + 5) for i in range(16)]   # 8 to 23 tokens: 248, within the budget
        assert sorted(len(p) for p in prompts) == list(range(8, 24))
        sessions = engine.submit_all([request(p, 6, seed=i, ignore_eos=True) for i, p in enumerate(prompts)])
        results = await asyncio.gather(*(s.collect() for s in sessions))
        for i, (prompt, result) in enumerate(zip(prompts, results)):
            assert result.token_ids == reference_generate(model, TOKENIZER.encode(prompt), 6, SamplingParams(seed=i))
        # one iteration: each prompt cut into powers of two, the pieces of one length of all the prompts one
        # call (16, 8, 4, 2, 1); one prompt at a time (or one call per distinct length) it took 16 calls
        assert [length for _, length in counted.calls] == [16, 8, 4, 2, 1]
        assert counted.calls[0] == (8, 16) and sum(rows * length for rows, length in counted.calls) == 248
        # and all 16 took their first token in the same decode round
        assert len({s.token_times[0] for s in sessions}) == 1
        # a prompt alone is one call (eagerly, as here), not one per power of two in its length
        counted.calls.clear()
        await engine.submit(request("x" * 23, 2, ignore_eos=True)).collect()
        assert counted.calls == [(1, 23)]
    finally:
        await engine.shutdown()


async def test_a_short_prompt_behind_long_ones_is_not_kept_waiting(model):
    counted = counted_copy(model)
    engine = await run_engine(counted, EngineConfig(max_sessions=4, prefill_chunk=16))
    try:
        longs = [list(range(i, 200 + i)) for i in range(3)]      # 13 iterations of prefill each, in turn
        sessions = engine.submit_all([request(p, 3, seed=i, ignore_eos=True) for i, p in enumerate(longs)]
                                     + [request("short", 5, seed=9, ignore_eos=True)])
        results = await asyncio.gather(*(s.collect() for s in sessions))
        *long_sessions, short = sessions
        # the short prompt, admitted last, was prefilled and had all its tokens before any long one's first
        first_long_token = min(s.token_times[0] for s in long_sessions)
        assert short.token_times[-1] < first_long_token
        for i, (prompt, result) in enumerate(zip(longs + [TOKENIZER.encode("short")], results)):
            assert result.token_ids == reference_generate(model, prompt, len(result.token_ids),
                                                          SamplingParams(seed=9 if i == 3 else i))
        # the long prompts were chunked (at most 16 tokens a call) and the oldest kept going meanwhile
        assert all(rows * length <= 16 for rows, length in counted.calls)
    finally:
        await engine.shutdown()


async def test_a_request_that_could_never_be_queued_whole_is_refused_as_invalid(model):
    engine = await run_engine(model, EngineConfig(max_sessions=1, queue_size=4, max_request_sessions=3,
                                                  max_new_tokens=ENDLESS))
    try:
        with pytest.raises(RequestError) as too_many:   # over the per-request cap
            engine.submit_all([request("x", 2) for _ in range(4)])
        assert too_many.value.param == "n" and "at most 3 sessions" in str(too_many.value)
        wide = Engine(model, TOKENIZER, EngineConfig(max_sessions=1, queue_size=4, max_request_sessions=8))
        with pytest.raises(RequestError) as never_fits:   # within the cap, but more than the whole queue
            wide.submit_all([request("x", 2) for _ in range(5)])
        assert never_fits.value.param == "n" and "the queue holds 4" in str(never_fits.value)
        # one that fits the queue but not now is the retryable refusal
        running = engine.submit(request("x", ENDLESS, ignore_eos=True))
        waiting = engine.submit_all([request("y", 2) for _ in range(2)])
        with pytest.raises(QueueFull):
            engine.submit_all([request("z", 2) for _ in range(3)])
        assert engine.num_waiting + engine.num_active == 3
        for session in [running, *waiting]:
            session.cancel()
            await session.collect()
    finally:
        await engine.shutdown()


async def test_a_session_that_finds_no_slot_in_time_ends_with_queue_timeout(model):
    engine = await run_engine(model, EngineConfig(max_sessions=1, queue_timeout_s=0.2, retry_after_s=4,
                                                  max_new_tokens=ENDLESS))
    try:
        running = engine.submit(request("holds the slot", ENDLESS, ignore_eos=True))
        while not running.tokens:
            await asyncio.sleep(0.001)
        late = engine.submit(request("waits too long", 4))
        events = [e async for e in late.stream()]
        assert len(events) == 1 and isinstance(events[0], ErrorEvent), events
        assert events[0].code == "queue_timeout" and events[0].retry_after_s == 4
        assert late.tokens == [] and engine.num_waiting == 0
        assert running.finish_reason is None          # the session holding the slot is untouched
        running.cancel()
        assert (await running.collect()).done.finish_reason == "cancelled"
        # a session that gets its slot in time is served
        assert (await engine.submit(request("on time", 4, ignore_eos=True)).collect()).done.finish_reason == "length"
    finally:
        await engine.shutdown()


def test_a_stream_hands_over_in_one_batch_what_arrived_together():
    """A front end that falls behind writes the backlog at once (SessionStream.batches), and a batch never
    reaches past the final event."""
    from crsm_core.engine import SessionStream

    async def scenario():
        stream = SessionStream("s")
        for i in range(3):
            stream.events.put_nowait(TokenEvent(i, f"t{i}", i))
        batches = stream.batches()
        first = await batches.__anext__()
        stream.events.put_nowait(TokenEvent(3, "t3", 3))
        stream.events.put_nowait(ErrorEvent("boom", "internal_error"))
        stream.events.put_nowait(TokenEvent(4, "late", 4))   # after the final event: never handed over
        rest = [batch async for batch in batches]
        return first, rest

    first, rest = asyncio.run(scenario())
    assert [e.token_id for e in first] == [0, 1, 2]
    assert len(rest) == 1 and rest[0][0].token_id == 3 and isinstance(rest[0][1], ErrorEvent) and len(rest[0]) == 2
