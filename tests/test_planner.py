"""Latent PUCT planner: finds a known best action, counts visits, keeps the tree consistent, batches
roots independently, and runs on the real tiny backbone."""
import dataclasses

import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.planner import PlannerConfig, consensus_score, search
from crsm_core.state import RecurrentState

TOY_VOCAB = 8
# The same logits at every position: token 0 (the decoy) has the highest prior, then 1, 2, 3.
TOY_LOGITS = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0, 0.0])
DECOY = 0


class ToyProblem:
    """A sequence game played in a real RecurrentState: the tokens read so far are written into
    ssm[:, row, 0, 0, position], the position counter is ssm[:, row, 0, 1, 0] and the task id
    (which sequence is rewarded) is ssm[:, row, 0, 2, 0].

    Value of a state, the same for every head unless `disagree` says otherwise:
      the tokens so far are a prefix of the task's target -> 0, 0.3, 0.6, 1.0 for 0..3 tokens;
      else the decoy alone -> 0.5 (looks best one step ahead), anything after the decoy -> 0;
      else 0.1.
    """

    def __init__(self, targets: list[list[int]], disagree: dict[int, list[float]] | None = None):
        self.targets = targets
        self.disagree = disagree or {}
        self.config = tiny_config()
        self.step_calls: list[torch.Tensor] = []

    def roots(self, tasks: list[int]) -> tuple[RecurrentState, torch.Tensor]:
        states = RecurrentState.allocate(self.config, len(tasks))
        states.ssm[:, :, 0, 2, 0] = torch.tensor(tasks, dtype=torch.float32)
        return states, TOY_LOGITS.expand(len(tasks), TOY_VOCAB).clone()

    def step(self, tokens: torch.Tensor, states: RecurrentState) -> torch.Tensor:
        self.step_calls.append(tokens.clone())
        position = states.ssm[0, :, 0, 1, 0].long()
        rows = torch.arange(tokens.shape[0])
        states.ssm[:, rows, 0, 0, position] = tokens.float()
        states.ssm[:, :, 0, 1, 0] += 1
        return TOY_LOGITS.expand(tokens.shape[0], TOY_VOCAB).clone()

    def sequence(self, states: RecurrentState, row: int) -> list[int]:
        length = int(states.ssm[0, row, 0, 1, 0])
        return states.ssm[0, row, 0, 0, :length].long().tolist()

    def value(self, states: RecurrentState, roots=None, tokens=None) -> torch.Tensor:
        heads = states.n_layer
        out = torch.empty(states.batch, heads)
        for row in range(states.batch):
            seq = self.sequence(states, row)
            target = self.targets[int(states.ssm[0, row, 0, 2, 0])]
            if len(seq) == 1 and seq[0] in self.disagree:
                out[row] = torch.tensor(self.disagree[seq[0]])
                continue
            if seq == target[:len(seq)]:
                v = (0.0, 0.3, 0.6, 1.0)[min(len(seq), 3)]
            elif seq[0] == DECOY:
                v = 0.5 if len(seq) == 1 else 0.0
            else:
                v = 0.1
            out[row] = v
        return out


def tree_tensors(tree) -> dict[str, torch.Tensor]:
    return {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)
            if isinstance(getattr(tree, f.name), torch.Tensor)}


def principal_variation(tree, root: int) -> list[int]:
    """Tokens along the most visited child at every level."""
    tokens, node = [], 0
    while True:
        children = tree.children[root, node]
        visits = torch.where(children >= 0, tree.visit_count[root, children.clamp(min=0)], -1)
        if visits.max() <= 0:
            return tokens
        node = int(children[visits.argmax()])
        tokens.append(int(tree.action[root, node]))


@pytest.mark.parametrize("leaf_batch", [1, 4])
def test_finds_the_best_action_against_misleading_priors_and_values(leaf_batch):
    toy = ToyProblem([[1, 3, 3]])
    states, logits = toy.roots([0])
    # The trap is real: the prior prefers the decoy, and so does a one-step look-ahead.
    assert int(logits.argmax()) == DECOY
    # Values are used on their absolute scale (policy.py), so c_puct sets how much value it takes to
    # override the prior: here the right path is the least likely candidate at two levels.
    config = PlannerConfig(n_simulations=64, leaf_batch=leaf_batch, c_puct=0.5)
    shallow = search(states, logits, toy.step, toy.value, dataclasses.replace(config, max_depth=1))
    assert int(shallow.action) == DECOY

    result = search(states, logits, toy.step, toy.value, dataclasses.replace(config, max_depth=3))
    assert int(result.action) == 1
    assert principal_variation(result.tree, 0)[:1] == [1]
    assert int(result.root_visits[0, 1]) == int(result.root_visits.max())
    # The chosen child's values are the mean over its subtree: above its own one-step value 0.3.
    assert float(result.layer_values.mean()) > 0.3
    assert toy.sequence(result.target_state, 0) == [1]


def test_uncertainty_penalty_prefers_heads_that_agree():
    # Decoy: heads average 0.5 but disagree (std 0.4); token 1: heads agree on 0.4.
    toy = ToyProblem([[1, 1, 1]], disagree={DECOY: [0.9, 0.1, 0.9, 0.1], 1: [0.4] * 4})
    states, logits = toy.roots([0])
    base = PlannerConfig(max_depth=1, n_simulations=24, c_puct=0.5)
    greedy = search(states, logits, toy.step, toy.value, dataclasses.replace(base, uncertainty_lambda=0.0))
    careful = search(states, logits, toy.step, toy.value, dataclasses.replace(base, uncertainty_lambda=1.0))
    assert int(greedy.action) == DECOY
    assert torch.allclose(greedy.spread, torch.tensor([0.4]))
    assert int(careful.action) == 1
    assert torch.allclose(careful.spread, torch.tensor([0.0]))
    assert torch.allclose(careful.score, torch.tensor([0.4]))
    assert torch.allclose(consensus_score(torch.tensor([0.9, 0.1, 0.9, 0.1]), 1.0), torch.tensor(0.1))


@pytest.mark.parametrize("config", [
    PlannerConfig(),
    PlannerConfig(n_simulations=32, top_k=2, max_depth=2, leaf_batch=4),   # 6 nodes: capped leaves revisited
    PlannerConfig(n_simulations=13, top_k=3, max_depth=5, leaf_batch=3, virtual_loss=0.0),
], ids=["default", "small-tree", "no-virtual-loss"])
def test_visit_counts_add_up_to_the_simulations(config):
    toy = ToyProblem([[1, 3, 3], [2, 3, 1]])
    states, logits = toy.roots([0, 1])
    result = search(states, logits, toy.step, toy.value, config)
    n = config.n_simulations
    assert result.root_visits.sum(dim=1).tolist() == [n, n]
    assert result.tree.visit_count[:, 0].tolist() == [n + 1, n + 1]   # + the root's own evaluation
    assert result.stats.simulations == 2 * n
    assert result.stats.expansions == int(result.tree.num_nodes.sum()) - 2 == result.stats.nodes_used - 2
    assert sum(len(call) for call in toy.step_calls) == result.stats.expansions
    assert result.stats.max_depth <= config.max_depth
    if config.top_k == 2:
        assert result.tree.num_nodes.tolist() == [7, 7]   # the whole depth-2 binary tree, no more
        assert result.stats.collisions > 0


def test_a_round_selects_distinct_leaves_and_virtual_loss_spreads_them():
    def second_round_parents(virtual_loss: float) -> set[int]:
        toy = ToyProblem([[1, 3, 3]])
        states, logits = toy.roots([0])
        result = search(states, logits, toy.step, toy.value,
                        PlannerConfig(leaf_batch=4, virtual_loss=virtual_loss))
        # Round 1 takes the four root children, never one twice, whatever the priors.
        assert sorted(toy.step_calls[0].tolist()) == [0, 1, 2, 3]
        assert len(toy.step_calls[1]) == 4 and result.stats.collisions == 0
        assert result.stats.rounds == 8   # 32 simulations, 4 a round
        return set(result.tree.parent[0, 5:9].tolist())   # the leaves created in round 2

    # Without virtual loss the four selections of round 2 all descend to the same node; with it,
    # pending paths look worse and the round spreads over several subtrees.
    assert len(second_round_parents(0.0)) == 1
    assert len(second_round_parents(1.0)) >= 2


def test_a_round_with_more_selections_than_free_leaves_collides():
    toy = ToyProblem([[1, 3, 3]])
    states, logits = toy.roots([0])
    result = search(states, logits, toy.step, toy.value, PlannerConfig(top_k=2, leaf_batch=4))
    assert toy.step_calls[0].tolist() == [0, 1]   # two free slots at the root, two selections dropped
    assert result.stats.collisions >= 2
    assert result.root_visits.sum().item() == 32


def replay(toy: ToyProblem, root_states: RecurrentState, root: int, tree, node: int) -> RecurrentState:
    """The state of `node`, recomputed from the root through the actions on its path."""
    actions = []
    while node != 0:
        actions.append(int(tree.action[root, node]))
        node = int(tree.parent[root, node])
    state = root_states.gather([root])
    for token in reversed(actions):
        toy.step(torch.tensor([token]), state)
    return state


@pytest.mark.parametrize("config", [
    PlannerConfig(n_simulations=40, top_k=3, max_depth=3, leaf_batch=4),
    PlannerConfig(n_simulations=32, top_k=2, max_depth=2, leaf_batch=2),
], ids=["deep", "capped"])
def test_tree_tensors_stay_consistent(config):
    # Heads that differ from one another, a fixed random linear read of each layer's state.
    weights = torch.randn(4, 8 * 16 * 16)
    toy = ToyProblem([[1, 3, 3], [2, 3, 1], [3, 3, 3]])

    def value(states, roots=None, tokens=None):
        return torch.sin(torch.einsum("lkd,ld->kl", states.ssm.flatten(2), weights) + toy.value(states))

    states, logits = toy.roots([0, 1, 2])
    result = search(states, logits, toy.step, value, config)
    tree = result.tree
    assert torch.equal(tree.virtual_visits, torch.zeros_like(tree.virtual_visits))
    for root in range(3):
        used = int(tree.num_nodes[root])
        assert tree.parent[root, 0] == -1 and tree.depth[root, 0] == 0
        # slots past num_nodes were never written
        assert (tree.parent[root, used:] == -1).all() and (tree.visit_count[root, used:] == 0).all()
        assert (tree.children[root, used:] == -1).all()
        for node in range(used):
            children = tree.children[root, node]
            kids = children[children >= 0]
            parent = int(tree.parent[root, node])
            if node:
                slots = (tree.children[root, parent] == node).nonzero().flatten().tolist()
                assert len(slots) == 1 and parent < node
                assert tree.child_action[root, parent, slots[0]] == tree.action[root, node]
                assert tree.child_prior[root, parent, slots[0]] == tree.prior[root, node]
                assert tree.depth[root, node] == tree.depth[root, parent] + 1
            assert (tree.parent[root, kids] == node).all()
            assert len(set(tree.action[root, kids].tolist())) == len(kids)
            if tree.depth[root, node] == config.max_depth:
                assert len(kids) == 0
            own_evaluations = int(tree.visit_count[root, node] - tree.visit_count[root, kids].sum())
            if tree.depth[root, node] < config.max_depth:
                assert own_evaluations == 1
            else:
                assert own_evaluations >= 1   # a leaf at the cap counts every simulation ending on it
            mean = tree.value_sum[root, node] / tree.visit_count[root, node]
            assert torch.allclose(tree.score[root, node], consensus_score(mean, config.uncertainty_lambda))
            node_value = value(replay(toy, states, root, tree, node))[0]
            expected = own_evaluations * node_value + tree.value_sum[root, kids].sum(dim=0)
            assert torch.allclose(tree.value_sum[root, node], expected, atol=1e-5)
        assert result.stats.max_depth >= int(tree.depth[root, :used].max())
        best = int(tree.children[root, 0, int(result.root_visits[root].argmax())])
        assert torch.allclose(result.layer_values[root], tree.value_sum[root, best] / tree.visit_count[root, best])
        target = result.target_state.gather([root])
        exact = replay(toy, states, root, tree, best)
        assert torch.equal(target.ssm, exact.ssm) and torch.equal(target.conv, exact.conv)


def test_roots_searched_together_match_roots_searched_alone():
    toy = ToyProblem([[1, 3, 3], [2, 3, 1], [0, 2, 1]])
    # the toy's values differ by tenths: a larger value scale lets them decide the final choice
    config = PlannerConfig(n_simulations=24, top_k=3, max_depth=3, leaf_batch=4, c_scale=1.0)
    tasks = [0, 1, 2]
    states, logits = toy.roots(tasks)
    together = search(states, logits, toy.step, toy.value, config)
    assert len(set(together.action.tolist())) == 3   # the roots really differ
    for root, task in enumerate(tasks):
        alone_states, alone_logits = toy.roots([task])
        alone = search(alone_states, alone_logits, toy.step, toy.value, config)
        assert int(alone.action) == int(together.action[root])
        assert torch.equal(alone.root_visits[0], together.root_visits[root])
        assert torch.equal(alone.layer_values[0], together.layer_values[root])
        assert torch.equal(alone.target_state.ssm[:, 0], together.target_state.ssm[:, root])
        theirs = tree_tensors(alone.tree)
        for name, mine in tree_tensors(together.tree).items():
            assert torch.equal(mine[root], theirs[name][0]), name


def test_search_is_deterministic():
    toy = ToyProblem([[2, 3, 1]])
    states, logits = toy.roots([0, 0])
    first = search(states, logits, toy.step, toy.value, PlannerConfig())
    second = search(states, logits, toy.step, toy.value, PlannerConfig())
    theirs = tree_tensors(second.tree)
    for name, mine in tree_tensors(first.tree).items():
        assert torch.equal(mine, theirs[name]), name


@pytest.mark.parametrize("bad", [
    dict(n_simulations=0), dict(top_k=0), dict(max_depth=0), dict(leaf_batch=-1), dict(n_simulations=2.5),
    dict(top_k=True), dict(c_puct=0.0), dict(c_puct=float("nan")), dict(virtual_loss=-1.0),
    dict(uncertainty_lambda=-0.5), dict(uncertainty_lambda=float("inf")), dict(c_puct="1.5"),
])
def test_invalid_config_is_rejected(bad):
    with pytest.raises(ValueError):
        PlannerConfig(**bad)


def test_invalid_inputs_are_rejected():
    toy = ToyProblem([[1, 3, 3]])
    states, logits = toy.roots([0, 0])
    with pytest.raises(ValueError, match="top_k"):
        search(states, logits, toy.step, toy.value, PlannerConfig(top_k=TOY_VOCAB + 1))
    with pytest.raises(ValueError, match="root_logits"):
        search(states, logits[:1], toy.step, toy.value, PlannerConfig())
    with pytest.raises(ValueError, match="value_fn"):
        search(states, logits, toy.step, lambda s, r, t: toy.value(s)[:, 0], PlannerConfig())
    with pytest.raises(ValueError, match="step_fn"):
        search(states, logits, lambda t, s: toy.step(t, s)[:, :4], toy.value, PlannerConfig())
    # -1 is the roots' own action: as an end-of-text token it would end every search at its root
    with pytest.raises(ValueError, match="terminal_token"):
        search(states, logits, toy.step, toy.value, PlannerConfig(), terminal_token=-1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@torch.no_grad()
def test_search_with_the_tiny_backbone(device):
    torch.manual_seed(0)
    config = tiny_config()
    model = MambaLM(config).to(device).eval()
    prompts = torch.randint(0, 256, (2, 7), device=device)
    root_states = model.allocate_state(2)
    root_logits = model.prefill(prompts, root_states)
    before = root_states.clone()
    heads = torch.randn(config.n_layer, config.nheads * config.ssm_cfg.headdim * config.ssm_cfg.d_state,
                        device=device)

    def value(states, roots=None, tokens=None):   # one random linear head per layer on that layer's ssm state
        return torch.tanh(torch.einsum("lkd,ld->kl", states.ssm.flatten(2), heads))

    planner = PlannerConfig(n_simulations=32)
    result = search(root_states, root_logits, model.step, value, planner)

    assert torch.equal(root_states.ssm, before.ssm) and torch.equal(root_states.conv, before.conv)
    assert result.target_state.ssm.shape == (config.n_layer, 2, config.nheads, 16, 16)
    assert result.target_state.conv.shape == (config.n_layer, 2, config.conv_dim, 4)
    assert result.target_state.ssm.device == root_states.ssm.device
    assert result.target_state.is_finite().all()
    assert result.layer_values.shape == (2, config.n_layer) and torch.isfinite(result.layer_values).all()
    assert torch.equal(result.root_actions.cpu(),
                       torch.sort(root_logits.cpu(), dim=1, descending=True, stable=True)[1][:, :4])
    assert all(int(a) in result.root_actions[r].tolist() for r, a in enumerate(result.action))
    assert result.root_visits.sum(dim=1).tolist() == [32, 32]
    assert torch.allclose(result.score, result.layer_values.mean(1))   # no uncertainty penalty by default
    assert result.stats.simulations == 64 and result.stats.wall_time_s > 0
    # The target state is what the backbone holds after reading the chosen token.
    exact = root_states.clone()
    model.step(result.action.to(device), exact)
    assert torch.allclose(result.target_state.ssm, exact.ssm, atol=1e-5, rtol=1e-4)
    assert torch.allclose(result.target_state.conv, exact.conv, atol=1e-5, rtol=1e-4)
