"""What a plan delivers and how the generator resolves it (crsm_core/injection.py): the verdicts by the
emitted tokens (diverged, applied with no change, vetoed, pruned, rejected), suggestions, the blend of a
child state one position after its decision, the batched catch-up, and the bound on a target's norm."""
import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.injection import (Effect, InjectionOutcome, TargetBuffer, TargetEntry, Verdict, catch_up,
                                 default_layer_weights, gates, verdict)
from crsm_core.state import RecurrentState

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

TOKENS = list(range(20, 40))   # the tokens "emitted" at positions 0..19 in these tests


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLM(tiny_config()).eval()


def random_state(config, batch=1, scale=1.0):
    s = RecurrentState.allocate(config, batch)
    s.conv.normal_(0, scale)
    s.ssm.normal_(0, scale)
    return s


def entry(target, decision, alpha, *, captured=None, generation_id=1, vetoed=False, action=7, beats=(),
          confident=False, assumed=None, state_position=-1):
    """An entry deciding position `decision`, started at `captured` (3 before by default), whose assumed
    tokens are the TOKENS emitted there unless given."""
    captured = decision - 3 if captured is None else captured
    assumed = tuple(TOKENS[captured:decision]) if assumed is None else tuple(assumed)
    return TargetEntry(generation_id=generation_id, captured_position=captured, assumed_tokens=assumed,
                       action=action, candidates=(action, *beats), beats=frozenset(beats), confident=confident,
                       value=0.9, target_state=target, alpha=alpha, vetoed=vetoed, spread=0.3, veto_threshold=0.2,
                       state_position=state_position)


def alpha_of(config, value=0.05):
    return torch.full((config.n_layer,), value)


def test_default_layer_weights_and_gates():
    assert default_layer_weights(4).tolist() == [0, 0, 1, 1]
    assert default_layer_weights(5).tolist() == [0, 0, 1, 1, 1]
    values = torch.tensor([0.9, 0.9, 0.5, 1.0])   # the heads' probabilities
    g = gates(values, 0.05, default_layer_weights(4))
    assert torch.allclose(g, torch.tensor([0.0, 0.0, 0.025, 0.05]))
    with pytest.raises(ValueError):
        gates(values, 0.05, torch.ones(3))


def test_blend_properties():
    cfg = tiny_config()
    S, T = random_state(cfg, 3), random_state(cfg, 3, scale=2.0)
    x = S.clone()
    x.blend_(T, torch.zeros(cfg.n_layer))                     # alpha 0: bit-identical
    assert torch.equal(x.ssm, S.ssm) and torch.equal(x.conv, S.conv)
    x = S.clone()
    x.blend_(T, torch.ones(cfg.n_layer))                      # alpha 1: the target's ssm, conv untouched
    assert torch.allclose(x.ssm, T.ssm, atol=0, rtol=1e-6) and torch.equal(x.conv, S.conv)
    x = S.clone()
    x.blend_(T, torch.ones(cfg.n_layer), blend_conv=True)
    assert torch.allclose(x.conv, T.conv, atol=0, rtol=1e-6)
    alpha = torch.tensor([0.0, 0.3, 0.7, 0.05])
    x = S.clone()
    x.blend_(T, alpha)
    for layer, a in enumerate(alpha.tolist()):
        assert torch.allclose(x.ssm[layer], (1 - a) * S.ssm[layer] + a * T.ssm[layer], atol=1e-6)
    assert (x.layer_norms() <= torch.maximum(S.layer_norms(), T.layer_norms()) + 1e-5).all()


# ---- verdicts: what the emitted tokens decide ------------------------------------------------------------

def test_an_entry_whose_assumed_tokens_were_not_emitted_diverges():
    cfg = tiny_config()
    e = entry(random_state(cfg), 10, alpha_of(cfg), assumed=[27, 28, 99])   # assumed 99 at position 9
    assert verdict(e, TOKENS, 9, max_lag=8) is None                         # position 9 not emitted yet
    found = verdict(e, TOKENS, 10, max_lag=8)
    assert found.outcome is InjectionOutcome.DIVERGED
    assert found.reason == "assumed token 99 at position 9, the generator emitted 29"


def test_the_decision_token_decides_what_an_entry_has_left_to_do():
    cfg = tiny_config()
    # the emitted token at 10 is 30
    agreed = verdict(entry(random_state(cfg), 10, alpha_of(cfg), action=30), TOKENS, 11, max_lag=8)
    assert agreed == Verdict(InjectionOutcome.APPLIED, "the emitted token is the plan's", Effect.NONE)
    suggested = entry(random_state(cfg), 10, alpha_of(cfg), action=30)
    suggested.suggested = True
    assert verdict(suggested, TOKENS, 11, max_lag=8).effect is Effect.SUGGESTED
    unjudged = verdict(entry(random_state(cfg), 10, alpha_of(cfg), action=7, beats=(5,)), TOKENS, 11, max_lag=8)
    assert (unjudged.outcome, unjudged.effect) == (InjectionOutcome.APPLIED, Effect.NONE)
    assert "no preference over the emitted token 30" in unjudged.reason
    # a* beats the emitted token: the state must be blended, nothing to decide yet
    assert verdict(entry(random_state(cfg), 10, alpha_of(cfg), beats=(30,)), TOKENS, 11, max_lag=8) is None
    # resolved later than its state position: late
    late = verdict(entry(random_state(cfg), 10, alpha_of(cfg), action=30), TOKENS, 14, max_lag=8)
    assert late.outcome is InjectionOutcome.APPLIED_LATE
    pruned = verdict(entry(random_state(cfg), 10, alpha_of(cfg), beats=(30,)), TOKENS, 20, max_lag=8)
    assert pruned == Verdict(InjectionOutcome.PRUNED, "lateness 9 > max_lag 8")


def test_vetoed_and_unsafe_entries():
    cfg = tiny_config()
    vetoed = verdict(entry(random_state(cfg), 10, alpha_of(cfg), vetoed=True), TOKENS, 5, max_lag=8)
    assert vetoed.outcome is InjectionOutcome.VETOED and "spread 0.3 > threshold 0.2" in vetoed.reason
    bad = random_state(cfg)
    bad.ssm[0, 0, 0, 0, 0] = float("nan")
    assert verdict(entry(bad, 10, alpha_of(cfg), beats=(30,)), TOKENS, 11, 8).reason == "non-finite target"
    # value heads reading a wild state can give NaN gates; blend_ would skip a NaN layer and report success
    nan_gates = torch.tensor([0.0, 0.0, float("nan"), 0.05])
    assert verdict(entry(random_state(cfg), 10, nan_gates, beats=(30,)), TOKENS, 11, 8).reason == "non-finite gates"


def test_due_suggests_confident_actions_and_hands_over_what_to_blend():
    cfg = tiny_config()
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    confident = entry(random_state(cfg), 10, alpha_of(cfg), action=7, beats=(30,), confident=True)
    timid = entry(random_state(cfg), 11, alpha_of(cfg), action=8, beats=(31,), captured=11)
    foreign = entry(random_state(cfg), 10, alpha_of(cfg), generation_id=2)
    for e in (confident, timid, foreign):
        buffer.put(e)
    due = buffer.due(10, TOKENS)
    assert due.suggestion == 7 and confident.suggested
    assert [(e.outcome, e.reason) for e in due.events] == [(InjectionOutcome.REJECTED, "generation 2 != 1")]
    assert buffer.pending() == 2
    # the generator emitted the suggestion at 10: the entry is applied with that effect
    emitted = TOKENS[:10] + [7] + TOKENS[11:]
    due = buffer.due(11, emitted)
    assert due.suggestion is None      # the other entry is not confident
    [event] = due.events
    assert (event.outcome, event.effect, event.target_position, event.state_position) == \
        (InjectionOutcome.APPLIED, Effect.SUGGESTED, 10, 11)
    # the timid entry, its action not taken at 11, beats the emitted token: its state stands at 12
    due = buffer.due(12, emitted)
    assert due.blends == [timid] and due.behind == [] and not due.events
    without = TargetBuffer(1, max_lag=8, delta_decay=0.9, use_suggestions=False)
    without.put(entry(random_state(cfg), 10, alpha_of(cfg), beats=(30,), confident=True))
    assert without.due(10, TOKENS).suggestion is None


@torch.no_grad()
def test_the_blend_moves_the_state_toward_the_planned_token_from_the_next_position_on(model):
    """An entry deciding position r carries the child state of a* (a state of position r + 1): blended
    fully into S_{r+1} (every layer, conv too), the generator holds what it would have held had it read a*,
    and nothing before r + 1 changed."""
    cfg, r, planned = model.config, 8, 99
    emitted = TOKENS[:12]
    state = model.allocate_state(1)
    logits = [model.step(torch.tensor([t]), state)[0] for t in emitted[:r + 1]]   # S_{r+1}, read 30 at r
    child = model.allocate_state(1)
    for t in emitted[:r] + [planned]:
        model.step(torch.tensor([t]), child)
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9, blend_conv=True, max_target_norm_ratio=1e6)
    e = entry(child.clone(), r, torch.ones(cfg.n_layer), action=planned, beats=(emitted[r],))
    buffer.put(e)
    due = buffer.due(r, emitted)
    assert not due.blends and due.suggestion is None and buffer.pending() == 1
    due = buffer.due(r + 1, emitted)
    assert due.blends == [e]
    event = buffer.blend(e, r + 1, state)
    assert (event.outcome, event.effect, event.lateness) == (InjectionOutcome.APPLIED, Effect.BLENDED, 0)
    assert event.alpha == [1.0] * cfg.n_layer
    assert torch.allclose(state.ssm, child.ssm, atol=1e-6) and torch.allclose(state.conv, child.conv, atol=1e-6)
    unblended = model.allocate_state(1)
    for t in emitted[:r + 1]:
        plain = model.step(torch.tensor([t]), unblended)[0]
    assert torch.equal(plain, logits[-1])              # the logits up to position r are the plain ones
    steered = model.step(torch.tensor([emitted[r + 1]]), state)[0]
    assert not torch.allclose(steered, model.step(torch.tensor([emitted[r + 1]]), unblended)[0])
    assert buffer.counters.blended == 1 and buffer.counters.applied == 1


@torch.no_grad()
def test_catch_up_is_exact_and_batched(model):
    """Entries standing at different positions are stepped together, one batched step per token, until
    each stands where it was asked to; each ends where exact steps through its tokens put it."""
    cfg = model.config
    starts, until = [4, 6, 7], [9, 9, 8]
    entries = []
    for start in starts:
        s = random_state(cfg, scale=0.1)
        entries.append(entry(s, start - 1, alpha_of(cfg)))
    expected = []
    for e, stop in zip(entries, until):
        s = e.target_state.clone()
        for p in range(e.state_position, stop):
            model.step(torch.tensor([TOKENS[p]]), s)
        expected.append(s)
    calls = []

    def counting(tokens, state):
        calls.append(tokens.tolist())
        return model.step(tokens, state)

    catch_up(entries, [TOKENS] * 3, until, counting)
    assert [len(c) for c in calls] == [3, 2, 2, 1, 1]          # one step for every entry still behind
    assert calls[0] == [TOKENS[4], TOKENS[6], TOKENS[7]]       # each through its own next token
    for e, stop, exact in zip(entries, until, expected):
        assert e.state_position == stop
        assert torch.allclose(e.target_state.ssm, exact.ssm, atol=1e-6)
        assert torch.allclose(e.target_state.conv, exact.conv, atol=1e-6)
    assert all(e.lateness == stop - e.decision_position - 1 for e, stop in zip(entries, until))
    with pytest.raises(ValueError, match="needs the tokens"):
        catch_up([entry(random_state(cfg), 3, alpha_of(cfg))], [TOKENS[:5]], [9], counting)


def test_late_entries_decay_and_what_finish_resolves():
    cfg = tiny_config()
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.5, max_target_norm_ratio=1e6)
    state = random_state(cfg)
    late = entry(state.clone(), 5, alpha_of(cfg, 0.4), beats=(TOKENS[5],), state_position=9)   # caught up to 9
    buffer.put(late)
    due = buffer.due(9, TOKENS)
    assert due.blends == [late]
    event = buffer.blend(late, 9, state)
    assert event.outcome is InjectionOutcome.APPLIED_LATE and event.lateness == 3
    assert event.alpha == pytest.approx([0.4 * 0.5 ** 3] * cfg.n_layer)
    # at the end: an entry the tokens decide is resolved by them, the others are pruned, foreign rejected
    buffer.put(entry(random_state(cfg), 12, alpha_of(cfg), action=TOKENS[12]))
    buffer.put(entry(random_state(cfg), 15, alpha_of(cfg)))
    buffer.put(entry(random_state(cfg), 15, alpha_of(cfg), generation_id=3))
    events = buffer.finish(14, TOKENS[:14])
    assert sorted((e.outcome.value, e.effect and e.effect.value) for e in events) == \
        [("applied_late", "none"), ("pruned", None), ("rejected", None)]
    c = buffer.counters
    assert c.produced == c.resolved == 4
    with pytest.raises(RuntimeError):
        buffer.put(entry(random_state(cfg), 16, alpha_of(cfg)))


def test_entries_resolved_by_their_producer_are_counted_and_reported_at_the_next_position():
    cfg = tiny_config()
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    buffer.put_resolved(entry(random_state(cfg), 5, alpha_of(cfg)),
                        Verdict(InjectionOutcome.DIVERGED, "assumed token 1 at position 3, the generator emitted 23"))
    assert buffer.counters.produced == 1 and buffer.counters.diverged == 0
    [event] = buffer.due(10, TOKENS).events
    assert event.outcome is InjectionOutcome.DIVERGED and event.position == 10   # streamed before token 10
    assert buffer.counters.diverged == 1


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


def blend_at(buffer, e, state):
    """Put an entry that must be blended at position 11 and resolve it there."""
    buffer.put(e)
    [due] = buffer.due(11, TOKENS).blends
    return buffer.blend(due, 11, state)


# 1e6: a finite norm ~1e8 times the live one; the others: norms that overflow float32 (inf)
@pytest.mark.parametrize("value", [1e6, 1e30, 1e38, -1e38])
def test_huge_finite_targets_are_rejected_by_the_norm_bound(model, value):
    cfg = model.config
    state = live_state(model)
    before = state.clone()
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9)
    event = blend_at(buffer, entry(filled(cfg, value), 10, alpha_of(cfg), beats=(TOKENS[10],)), state)
    assert event.outcome is InjectionOutcome.REJECTED
    assert "exceeds 10 x the live state's" in event.reason and event.alpha == []
    assert torch.equal(state.ssm, before.ssm) and torch.equal(state.conv, before.conv)
    assert buffer.counters.rejected == 1 and buffer.counters.applied == 0


def test_without_the_bound_a_huge_target_leaves_a_huge_state(model):
    """What the bound prevents: a 1e15 target blended at 0.05 leaves entries ~5e13 in a state of norm 0.3."""
    cfg = model.config
    state = live_state(model)
    buffer = TargetBuffer(1, max_lag=8, delta_decay=0.9, max_target_norm_ratio=1e300)
    event = blend_at(buffer, entry(filled(cfg, 1e15), 10, alpha_of(cfg), beats=(TOKENS[10],)), state)
    assert event.outcome is InjectionOutcome.APPLIED
    assert state.ssm.abs().max() > 1e13


def test_norm_bound_is_per_gated_layer_and_relative_to_the_live_state(model):
    alpha = torch.tensor([0.0, 0.0, 0.05, 0.05])   # layers 0 and 1 are not blended
    cases = [(9.0, 9.0, InjectionOutcome.APPLIED), (11.0, 1.0, InjectionOutcome.REJECTED),
             (1.0, 11.0, InjectionOutcome.REJECTED)]
    for scale_2, scale_3, outcome in cases:
        state = live_state(model)
        target = state.clone()
        target.ssm[0] *= 1e6                            # ungated: never looked at
        target.ssm[2] *= scale_2
        target.ssm[3] *= scale_3
        event = blend_at(TargetBuffer(1, max_lag=8, delta_decay=0.9), entry(target, 10, alpha, beats=(TOKENS[10],)),
                         state)
        assert event.outcome is outcome, (scale_2, scale_3, event.reason)
        if outcome is InjectionOutcome.REJECTED:
            assert f"in layer {2 if scale_2 > 10 else 3}" in event.reason


def test_the_bound_uses_the_norms_of_the_plans_snapshot_when_given(model):
    cfg = model.config
    state = live_state(model)
    for reference_scale, outcome in ((1.0, InjectionOutcome.APPLIED), (0.01, InjectionOutcome.REJECTED)):
        e = entry(state.clone(), 10, alpha_of(cfg), beats=(TOKENS[10],))
        e.reference_norms = state.layer_norms()[:, 0] * reference_scale
        assert blend_at(TargetBuffer(1, max_lag=8, delta_decay=0.9), e, state.clone()).outcome is outcome


@pytest.mark.parametrize("ratio", [0.5, float("inf"), float("nan"), True])
def test_max_target_norm_ratio_must_be_a_finite_bound_of_at_least_one(ratio):
    from crsm_core.deliberation import DeliberationConfig
    with pytest.raises(ValueError, match="max_target_norm_ratio"):
        DeliberationConfig(max_target_norm_ratio=ratio)
    with pytest.raises(ValueError, match="max_target_norm_ratio"):
        TargetBuffer(1, max_lag=8, delta_decay=0.9, max_target_norm_ratio=ratio)
