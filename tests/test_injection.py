"""Gated per-layer injection: the blend, exact positions, late entries, pruning, isolation, accounting,
and the bound on a target's norm."""
import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.injection import (InjectionOutcome, TargetBuffer, TargetEntry, catch_up, default_layer_weights,
                                 gates)
from crsm_core.state import RecurrentState

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLM(tiny_config()).eval()


# Entries of a live state a few tokens into a random tiny model are of this order (layer norms near
# 0.3); a target made at scale 1 would stand ~100x above it and be rejected by the norm bound.
LIVE_SCALE = 0.01


def random_state(config, batch=1, scale=1.0):
    s = RecurrentState.allocate(config, batch)
    s.conv.normal_(0, scale)
    s.ssm.normal_(0, scale)
    return s


def entry(target, p, alpha, generation_id=1, captured=None, vetoed=False, action=7):
    return TargetEntry(generation_id=generation_id, target_position=p,
                       captured_position=p - 3 if captured is None else captured, action=action,
                       target_state=target, alpha=alpha, vetoed=vetoed, spread=0.0)


def test_default_layer_weights_and_gates():
    assert default_layer_weights(4).tolist() == [0, 0, 1, 1]
    assert default_layer_weights(5).tolist() == [0, 0, 1, 1, 1]
    v = torch.tensor([0.0, 2.0, -1.0, 3.0])
    alpha = gates(v, 0.05, default_layer_weights(4))
    expected = [0.0, 0.0, 0.05 / (1 + torch.e ** 1.0), 0.05 / (1 + torch.e ** -3.0)]
    assert alpha.tolist() == pytest.approx(expected, rel=1e-6)


@torch.no_grad()
def test_blend_properties():
    cfg = tiny_config()
    S, T = random_state(cfg, 3), random_state(cfg, 3, scale=2.0)
    # alpha 0: bit-identical
    x = S.clone()
    x.blend_(T, torch.zeros(cfg.n_layer))
    assert torch.equal(x.ssm, S.ssm) and torch.equal(x.conv, S.conv)
    # alpha 1: the target (ssm); conv untouched without blend_conv, the target's with it
    x = S.clone()
    x.blend_(T, torch.ones(cfg.n_layer))
    assert torch.allclose(x.ssm, T.ssm, atol=0, rtol=1e-6) and torch.equal(x.conv, S.conv)
    x = S.clone()
    x.blend_(T, torch.ones(cfg.n_layer), blend_conv=True)
    assert torch.allclose(x.conv, T.conv, atol=0, rtol=1e-6)
    # a convex combination per layer, and each layer's norm never above the larger of the two
    alpha = torch.tensor([0.0, 0.3, 0.7, 0.05])
    x = S.clone()
    x.blend_(T, alpha)
    for layer, a in enumerate(alpha.tolist()):
        expected = (1 - a) * S.ssm[layer] + a * T.ssm[layer]
        assert torch.allclose(x.ssm[layer], expected, atol=1e-6)
    assert (x.layer_norms() <= torch.maximum(S.layer_norms(), T.layer_norms()) + 1e-5).all()
    # gated by default weights: the lower half (weight 0) is untouched, bit for bit
    g = gates(torch.tensor([5.0, 5.0, 5.0, 5.0]), 0.5, default_layer_weights(cfg.n_layer))
    x = S.clone()
    x.blend_(T, g)
    assert torch.equal(x.ssm[:2], S.ssm[:2]) and not torch.equal(x.ssm[2:], S.ssm[2:])


@torch.no_grad()
def run_forced(model, tokens, buffer=None, from_position=0):
    """Teacher-forced generator loop; returns logits by position ([V] each) and the events."""
    state = model.allocate_state(1)
    logits, events = {}, []
    for q, token in enumerate(tokens):
        if buffer is not None and q >= from_position:
            events += buffer.apply_due(q, state, tokens, model.step)
        logits[q] = model.step(torch.tensor([token]), state)[0]
    return logits, events, state


def test_entry_changes_logits_at_and_after_its_position_only(model):
    cfg = model.config
    tokens = torch.randint(0, 256, (16,)).tolist()
    base, _, _ = run_forced(model, tokens)
    p = 9
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    buffer.put(entry(random_state(cfg, scale=LIVE_SCALE), p, torch.full((cfg.n_layer,), 0.5)))
    steered, events, _ = run_forced(model, tokens, buffer)
    assert [e.outcome for e in events] == [InjectionOutcome.APPLIED]
    assert events[0].position == p and events[0].lateness == 0
    for q in range(p):
        assert torch.equal(steered[q], base[q]), q
    for q in range(p, len(tokens)):
        assert (steered[q] - base[q]).abs().max() > 1e-4, q


def test_late_entry_is_fast_forwarded_and_decayed(model):
    cfg = model.config
    tokens = torch.randint(0, 256, (20,)).tolist()
    p, q, decay = 6, 9, 0.8
    target = random_state(cfg, scale=LIVE_SCALE)
    alpha = torch.tensor([0.0, 0.1, 0.4, 0.9])
    buffer = TargetBuffer(1, max_lag=4, delta_decay=decay)
    buffer.put(entry(target.clone(), p, alpha.clone()))
    # generator reaches q before the entry is looked at
    with torch.no_grad():
        state = model.allocate_state(1)
        model.prefill(torch.tensor([tokens[:q]]), state)
        manual_target = target.clone()
        for token in tokens[p:q]:
            model.step(torch.tensor([token]), manual_target)
        manual = state.clone()
        manual.blend_(manual_target, alpha * decay ** (q - p))
        events = buffer.apply_due(q, state, tokens, model.step)
    assert [e.outcome for e in events] == [InjectionOutcome.APPLIED_LATE]
    assert events[0].lateness == 3
    assert events[0].alpha == pytest.approx((alpha * decay ** 3).tolist(), rel=1e-6)
    assert torch.equal(state.ssm, manual.ssm) and torch.equal(state.conv, manual.conv)
    assert buffer.counters.applied_late == 1 and buffer.pending() == 0


def test_partial_catch_up_gives_the_same_result(model):
    """A target the planner's worker already advanced through some tokens ends where a fresh one does."""
    cfg = model.config
    tokens = torch.randint(0, 256, (12,)).tolist()
    target, alpha = random_state(cfg, scale=LIVE_SCALE), torch.tensor([0.0, 0.0, 0.3, 0.6])
    results = []
    for worker_got_to in (None, 7, 9):
        e = entry(target.clone(), 5, alpha.clone())
        if worker_got_to is not None:
            with torch.no_grad():
                catch_up(e, tokens[:worker_got_to], worker_got_to, model.step)
            assert e.state_position == worker_got_to
        buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
        buffer.put(e)
        with torch.no_grad():
            state = model.allocate_state(1)
            model.prefill(torch.tensor([tokens[:10]]), state)
            [event] = buffer.apply_due(10, state, tokens, model.step)
        assert event.outcome is InjectionOutcome.APPLIED_LATE, event.reason
        results.append(state.ssm)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_entries_past_max_lag_are_pruned_and_counted(model):
    cfg = model.config
    tokens = torch.randint(0, 256, (30,)).tolist()
    buffer = TargetBuffer(1, max_lag=3, delta_decay=0.9)
    alpha = torch.full((cfg.n_layer,), 0.2)
    buffer.put(entry(random_state(cfg), 4, alpha))   # resolved at 8: lateness 4 > 3
    buffer.put(entry(random_state(cfg), 5, alpha))   # resolved at 8: lateness 3 == max_lag -> applied late
    state = random_state(cfg)
    before = state.clone()
    with torch.no_grad():
        events = buffer.apply_due(8, state, tokens, model.step)
    assert [(e.target_position, e.outcome) for e in events] == [
        (4, InjectionOutcome.PRUNED), (5, InjectionOutcome.APPLIED_LATE)]
    assert not torch.equal(state.ssm, before.ssm)
    assert buffer.counters.as_dict() == dict(produced=2, applied=0, applied_late=1, pruned=1, vetoed=0, rejected=0)
    # never applied twice: the next position finds nothing
    assert buffer.apply_due(9, state, tokens, model.step) == []


def test_other_generation_and_non_finite_targets_are_rejected(model):
    cfg = model.config
    tokens = torch.randint(0, 256, (10,)).tolist()
    buffer = TargetBuffer(2, max_lag=8, delta_decay=0.9)
    alpha = torch.full((cfg.n_layer,), 0.5)
    buffer.put(entry(random_state(cfg), 7, alpha, generation_id=1))   # the earlier generation's, aimed ahead
    bad = random_state(cfg)
    bad.ssm[3, 0, 0, 0, 0] = float("nan")
    buffer.put(entry(bad, 5, alpha, generation_id=2))
    state = random_state(cfg)
    before = state.clone()
    with torch.no_grad():
        events = buffer.apply_due(5, state, tokens, model.step)
    outcomes = {(e.generation_id, e.outcome) for e in events}
    assert outcomes == {(1, InjectionOutcome.REJECTED), (2, InjectionOutcome.REJECTED)}
    assert torch.equal(state.ssm, before.ssm) and torch.equal(state.conv, before.conv)
    assert buffer.counters.rejected == 2 and buffer.pending() == 0


def test_vetoed_entry_is_counted_not_applied(model):
    cfg = model.config
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    buffer.put(entry(random_state(cfg), 3, torch.zeros(cfg.n_layer), vetoed=True))
    state = random_state(cfg)
    before = state.clone()
    events = buffer.apply_due(3, state, [1, 2, 3], model.step)
    assert [e.outcome for e in events] == [InjectionOutcome.VETOED] and events[0].alpha == []
    assert torch.equal(state.ssm, before.ssm)
    assert buffer.counters.vetoed == 1


def test_finish_resolves_everything_left_and_refuses_more(model):
    cfg = model.config
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    alpha = torch.zeros(cfg.n_layer)
    buffer.put(entry(random_state(cfg), 12, alpha))
    buffer.put(entry(random_state(cfg), 13, alpha, generation_id=0))
    events = buffer.finish(10)
    assert sorted(e.outcome.value for e in events) == ["pruned", "rejected"]
    c = buffer.counters
    assert c.produced == c.resolved == 2
    with pytest.raises(RuntimeError):
        buffer.put(entry(random_state(cfg), 14, alpha))


# ---- bounded targets ------------------------------------------------------------------------------------

def live_state(model, length=9):
    """A real state after `length` tokens (the norms a planner's target is compared with)."""
    state = model.allocate_state(1)
    with torch.no_grad():
        model.prefill(torch.randint(0, 256, (1, length)), state)
    return state


def filled(config, value):
    target = RecurrentState.allocate(config, 1)
    target.conv.fill_(value)
    target.ssm.fill_(value)
    return target


# 1e6: a finite norm ~1e8 times the live one; the others: norms that overflow float32 (inf)
@pytest.mark.parametrize("value", [1e6, 1e30, 1e38, -1e38])
def test_huge_finite_targets_are_rejected_by_the_norm_bound(model, value):
    cfg = model.config
    state = live_state(model)
    before = state.clone()
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    buffer.put(entry(filled(cfg, value), 9, torch.full((cfg.n_layer,), 0.05)))
    events = buffer.apply_due(9, state, list(range(9)), model.step)
    assert [e.outcome for e in events] == [InjectionOutcome.REJECTED]
    assert "exceeds 10 x the live state's" in events[0].reason and events[0].alpha == []
    assert torch.equal(state.ssm, before.ssm) and torch.equal(state.conv, before.conv)
    assert buffer.counters.rejected == 1 and buffer.counters.applied == 0


def test_without_the_bound_a_huge_target_leaves_a_huge_state(model):
    """What the bound prevents: under a bound that never binds, a 1e15 target (its norm still finite in
    float32, unlike 1e30's) is blended and leaves entries ~5e13 in a state whose norm was 0.3."""
    cfg = model.config
    state = live_state(model)
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9, max_target_norm_ratio=1e300)
    buffer.put(entry(filled(cfg, 1e15), 9, torch.full((cfg.n_layer,), 0.05)))
    [event] = buffer.apply_due(9, state, list(range(9)), model.step)
    assert event.outcome is InjectionOutcome.APPLIED
    assert state.ssm.abs().max() > 1e13


def test_norm_bound_is_per_gated_layer_and_relative_to_the_live_state(model):
    alpha = torch.tensor([0.0, 0.0, 0.05, 0.05])   # layers 0 and 1 are not blended
    cases = [(9.0, 9.0, InjectionOutcome.APPLIED),      # 9x the live norm everywhere: within 10x
             (11.0, 1.0, InjectionOutcome.REJECTED),    # 11x in gated layer 2
             (1.0, 11.0, InjectionOutcome.REJECTED)]    # 11x in gated layer 3
    for scale_2, scale_3, outcome in cases:
        state = live_state(model)
        target = state.clone()
        target.ssm[0] *= 1e6                            # ungated: never looked at
        target.ssm[2] *= scale_2
        target.ssm[3] *= scale_3
        buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
        buffer.put(entry(target, 9, alpha))
        [event] = buffer.apply_due(9, state, list(range(9)), model.step)
        assert event.outcome is outcome, (scale_2, scale_3, event.reason)
        if outcome is InjectionOutcome.REJECTED:
            assert f"in layer {2 if scale_2 > 10 else 3}" in event.reason


def test_a_target_non_finite_after_the_late_fast_forward_is_rejected(model):
    cfg = model.config
    state = live_state(model)
    before = state.clone()

    def overflowing_step(tokens, target):  # what a huge target does after a step or two
        target.ssm.fill_(float("inf"))
        return torch.zeros(tokens.shape[0], cfg.vocab_size)

    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    buffer.put(entry(state.clone(), 6, torch.full((cfg.n_layer,), 0.05)))   # 3 positions late at 9
    [event] = buffer.apply_due(9, state, list(range(9)), overflowing_step)
    assert (event.outcome, event.reason) == (InjectionOutcome.REJECTED, "non-finite target after fast-forward")
    assert torch.equal(state.ssm, before.ssm)


def test_non_finite_gates_are_rejected_not_counted_as_applied(model):
    # value heads reading a state of 1e38 give NaN values, and so NaN gates; blend_ skips a NaN layer, so
    # such an entry changed nothing yet was reported as applied
    state = live_state(model)
    before = state.clone()
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    buffer.put(entry(state.clone(), 9, torch.tensor([0.0, 0.0, float("nan"), 0.05])))
    [event] = buffer.apply_due(9, state, list(range(9)), model.step)
    assert (event.outcome, event.reason) == (InjectionOutcome.REJECTED, "non-finite gates")
    assert torch.equal(state.ssm, before.ssm) and buffer.counters.applied == 0


@pytest.mark.parametrize("ratio", [0.5, float("inf"), float("nan"), True])
def test_max_target_norm_ratio_must_be_a_finite_bound_of_at_least_one(ratio):
    from crsm_core.deliberation import DeliberationConfig
    with pytest.raises(ValueError, match="max_target_norm_ratio"):
        DeliberationConfig(max_target_norm_ratio=ratio)
    with pytest.raises(ValueError, match="max_target_norm_ratio"):
        TargetBuffer(1, max_lag=8, delta_decay=0.9, max_target_norm_ratio=ratio)


def test_the_bound_uses_the_norms_of_the_plans_snapshot_when_given(model):
    """The producer measures the live state it planned from (so the generator never waits on the device);
    its norms, not those of the state at hand, set the limit."""
    cfg = model.config
    state = live_state(model)
    alpha = torch.full((cfg.n_layer,), 0.05)
    for reference_scale, outcome in ((1.0, InjectionOutcome.APPLIED), (0.01, InjectionOutcome.REJECTED)):
        e = entry(state.clone(), 9, alpha)
        e.reference_norms = state.layer_norms()[:, 0] * reference_scale
        buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
        buffer.put(e)
        [event] = buffer.apply_due(9, state.clone(), list(range(9)), model.step)
        assert event.outcome is outcome, event.reason


def test_max_target_norm_ratio_reaches_the_session_buffer_and_plans_carry_their_snapshots_norms(model):
    from crsm_core.deliberation import DeliberationConfig, SessionDeliberator
    from crsm_core.injection import DEFAULT_MAX_TARGET_NORM_RATIO
    from crsm_core.planner.runtime import PlannerRuntime
    from crsm_core.value import ValueHeads, ValueHeadsConfig
    assert DeliberationConfig().max_target_norm_ratio == DEFAULT_MAX_TARGET_NORM_RATIO == 10.0
    config = DeliberationConfig.from_dict({"max_target_norm_ratio": 4, "synchronous": True, "fast_forward": "exact",
                                           "children": "exact", "planner": {"n_simulations": 4}})
    heads = ValueHeads(ValueHeadsConfig.for_model(model.config, hidden=8))
    deliberator = SessionDeliberator(PlannerRuntime(model, model, heads), config, generation_id=1)
    assert deliberator.buffer.max_target_norm_ratio == 4
    state = live_state(model)
    with torch.no_grad():
        planned = deliberator.plan(state.clone(), 9, model.step(torch.tensor([1]), state.clone()))
    assert torch.allclose(planned.reference_norms, state.layer_norms()[:, 0])
    assert torch.allclose(planned.norms, planned.target_state.layer_norms()[:, 0])
