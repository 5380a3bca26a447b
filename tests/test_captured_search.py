"""Captured searches (planner/captured.py): on the CPU the same buffers run eagerly and must give the
search of search.py exactly, padded buckets included; on a GPU the graph replays must give what the
eager search gives, with the step inside the round graph or between two graphs (ride mode), and the
fused tree kernels must build the trees of the tensor reference."""
import dataclasses

import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.planner import PlannerConfig, search
from crsm_core.planner import kernels
from crsm_core.planner.captured import CapturedSearch
from crsm_core.state import RecurrentState

from test_planner import TOY_VOCAB, ToyProblem, tree_tensors

CONFIG = PlannerConfig(n_simulations=24, top_k=3, max_depth=3, leaf_batch=4)


class Ride:
    """Stands in for the generator in ride mode: steps the rows it is handed, and counts them."""

    def __init__(self, step):
        self.step_fn, self.rows = step, []

    def step(self, tokens, state):
        self.rows.append(tokens.shape[0])
        return self.step_fn(tokens, state)


def assert_same_roots(captured, eager, roots: int, exact: bool = True):
    same = torch.equal if exact else (lambda a, b: torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4))
    assert torch.equal(captured.action, eager.action)
    assert torch.equal(captured.root_visits, eager.root_visits)
    assert same(captured.layer_values, eager.layer_values)
    assert same(captured.target_state.ssm, eager.target_state.ssm)
    theirs = tree_tensors(eager.tree)
    for name, mine in tree_tensors(captured.tree).items():
        assert same(mine[:roots], theirs[name]), name
    for field in ("simulations", "expansions", "collisions", "max_depth", "nodes_used", "rounds"):
        assert getattr(captured.stats, field) == getattr(eager.stats, field), field


@pytest.mark.parametrize("ride", [False, True], ids=["step-inside", "ride"])
def test_on_the_cpu_a_padded_bucket_gives_the_eager_search(ride):
    toy = ToyProblem([[1, 3, 3], [2, 3, 1], [0, 2, 1]])
    states, logits = toy.roots([0, 1, 2])
    eager = search(states, logits, toy.step, toy.value, CONFIG)
    stepped = sum(len(c) for c in toy.step_calls)
    rider = Ride(toy.step)
    steps = dict(ride=rider.step) if ride else dict(step_fn=toy.step)
    captured = CapturedSearch(CONFIG, states.rows(slice(0, 1)), TOY_VOCAB, heads=states.n_layer,
                              value_fn=toy.value, max_roots=4, **steps)
    assert captured.buckets == (1, 2, 4)
    rounds = []
    result = captured.run(states, logits, on_round=rounds.append)   # 3 roots run in the bucket of 4
    assert_same_roots(result, eager, roots=3)
    assert len(rounds) == eager.stats.rounds and all(r == 4 * CONFIG.leaf_batch for r in rounds)
    # the padding root (a copy of root 0) made the same tree as root 0
    assert torch.equal(result.tree.visit_count[3], result.tree.visit_count[0])
    assert (sum(rider.rows) if ride else sum(len(c) for c in toy.step_calls) - stepped) == result.stats.rows_stepped


def test_a_round_hook_can_stop_the_search():
    toy = ToyProblem([[1, 3, 3]])
    states, logits = toy.roots([0])
    captured = CapturedSearch(CONFIG, states, TOY_VOCAB, heads=states.n_layer, value_fn=toy.value,
                              step_fn=toy.step, max_roots=1)

    class Stop(Exception):
        pass

    calls = []

    def stop_at_third(rows):
        calls.append(rows)
        if len(calls) == 3:
            raise Stop()

    with pytest.raises(Stop):
        captured.run(states, logits, on_round=stop_at_third)
    assert len(calls) == 3
    # the buffers are reset by the next search, which runs to the end
    again = captured.run(states, logits)
    assert again.stats.simulations == CONFIG.n_simulations


def test_too_many_roots_or_wrong_logits_are_rejected():
    toy = ToyProblem([[1, 3, 3]])
    states, logits = toy.roots([0, 0, 0])
    captured = CapturedSearch(CONFIG, states, TOY_VOCAB, heads=states.n_layer, value_fn=toy.value,
                              step_fn=toy.step, max_roots=2)
    with pytest.raises(ValueError, match="max_roots"):
        captured.run(states, logits)
    with pytest.raises(ValueError, match="root logits"):
        captured.run(states.rows(slice(0, 2)), logits[:2, :4])
    with pytest.raises(ValueError, match="exactly one"):
        CapturedSearch(CONFIG, states, TOY_VOCAB, heads=states.n_layer, value_fn=toy.value, max_roots=2)


@pytest.mark.cuda
@pytest.mark.parametrize("ride", [False, True], ids=["step-inside", "ride"])
@torch.no_grad()
def test_graph_replays_give_the_eager_search_on_a_gpu(ride):
    torch.manual_seed(0)
    config = tiny_config()
    model = MambaLM(config).to("cuda").eval()
    prompts = torch.randint(0, 256, (4, 9), device="cuda")
    states = model.allocate_state(4)
    logits = model.prefill(prompts, states)
    weights = torch.randn(config.n_layer, config.nheads * config.ssm_cfg.headdim * config.ssm_cfg.d_state,
                          device="cuda")

    def value(s, roots, tokens):
        return torch.sigmoid(torch.einsum("lkd,ld->kl", s.ssm.flatten(2).float(), weights))

    planner = dataclasses.replace(CONFIG, n_simulations=32)
    rider = Ride(model.step)
    steps = dict(ride=rider.step) if ride else dict(step_fn=model.step)
    captured = CapturedSearch(planner, states.rows(slice(0, 1)), config.vocab_size, config.n_layer, value,
                              max_roots=4, **steps)
    assert captured.graphed
    eager = search(states, logits, model.step, value, planner)   # the bucket's shapes: 4 roots
    for _ in range(2):   # replays reuse the buffers: the second search must not see the first
        result = captured.run(states, logits)
        assert_same_roots(result, eager, roots=4, exact=False)
        assert result.stats.rows_stepped == eager.stats.rows_stepped == eager.stats.rounds * 4 * planner.leaf_batch
    if ride:
        assert sum(rider.rows) == 2 * eager.stats.rows_stepped
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(not kernels.available(torch.device("cuda")), reason="needs CUDA and Triton")
@pytest.mark.parametrize("config", [
    PlannerConfig(),
    PlannerConfig(n_simulations=32, top_k=2, max_depth=2, leaf_batch=4),   # capped leaves, collisions
    PlannerConfig(n_simulations=13, top_k=3, max_depth=5, leaf_batch=3, virtual_loss=0.0, uncertainty_lambda=0.0),
], ids=["default", "small-tree", "odd-sizes"])
@torch.no_grad()
def test_fused_tree_kernels_build_the_reference_trees(config):
    """The Triton selections and backups against the tensor reference, on the toy game (exact values,
    many ties) and on the tiny backbone with random value heads."""
    toy = ToyProblem([[1, 3, 3], [2, 3, 1], [0, 2, 1]])
    states, logits = toy.roots([0, 1, 2])
    on_gpu = RecurrentState(states.conv.cuda(), states.ssm.cuda())

    def toy_step(tokens, s):
        host = RecurrentState(s.conv.cpu(), s.ssm.cpu())
        out = toy.step(tokens.cpu(), host)
        s.copy_(RecurrentState(host.conv.cuda(), host.ssm.cuda()))
        return out.cuda()

    def toy_value(s, roots, tokens):
        return toy.value(RecurrentState(s.conv.cpu(), s.ssm.cpu())).cuda()

    problems = [(on_gpu, logits.cuda(), toy_step, toy_value)]
    tiny = tiny_config()
    model = MambaLM(tiny).to("cuda").eval()
    root_states = model.allocate_state(3)
    root_logits = model.prefill(torch.randint(0, 256, (3, 7), device="cuda"), root_states)
    weights = torch.randn(tiny.n_layer, tiny.nheads * tiny.ssm_cfg.headdim * tiny.ssm_cfg.d_state, device="cuda")
    problems.append((root_states, root_logits, model.step,
                     lambda s, r, t: torch.sigmoid(torch.einsum("lkd,ld->kl", s.ssm.flatten(2), weights))))
    # a verifier: one value per node, read from the tokens (1 unless the path starts with the root's
    # favourite), as the engine's verifier searches give the kernels (heads = 1)
    favourite = torch.sort(root_logits, dim=1, descending=True, stable=True)[1][:, 0]

    def avoid_favourite(s, roots, tokens):
        return ((tokens[:, 0] >= 0) & (tokens[:, 0] != favourite[roots])).float().unsqueeze(1)

    problems.append((root_states, root_logits, model.step, avoid_favourite))
    for states, logits, step, value in problems:
        reference = search(states, logits, step, value, config, fused=False)
        fused = search(states, logits, step, value, config, fused=True)
        assert torch.equal(fused.action, reference.action)
        if value is avoid_favourite:   # the search looked past the favourite and chose a token valued 1
            assert (fused.action != favourite).all() and (fused.score == 1).all(), (fused.root_visits, fused.root_q)
        theirs = tree_tensors(reference.tree)
        for name, mine in tree_tensors(fused.tree).items():
            if mine.is_floating_point():   # the consensus std is reduced in another order
                torch.testing.assert_close(mine, theirs[name], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(mine, theirs[name]), name
