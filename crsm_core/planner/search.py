"""Batched PUCT search in latent space, as a fixed sequence of tensor operations.

A search runs for R roots at once. Each round selects up to `leaf_batch` (J) leaves per root, one
after another, with virtual loss so that the selections of a round spread over different leaves.
All J * R selections are then stepped by ONE batched `step_fn` call (a leaf's parent state advanced
by the leaf's token) and evaluated by ONE batched `value_fn` call, and their per-head values are
backed up along their paths. A simulation ends either on a new leaf or on a leaf at the depth cap
(whose value is backed up again, as a terminal node would be). A leaf created earlier in the same
round is not selectable until evaluated; a selection that finds every candidate of a node taken
that way is a collision: it is dropped (counted) and retried in a later round.

Selection at a node picks the candidate slot maximising Q + U (AlphaZero's PUCT, policy.py), with Q
the consensus of the child's mean per-head values, probabilities in [0, 1], used as they are (no
per-node rescaling). A node reached by the end-of-text token is terminal: selection stops there and
backs its value up again, as at the depth cap. The chosen action maximises log prior + a value term
that grows with the visits (policy.final_slot), among the root children the search valued.
Ties go to the lower slot, i.e. the higher prior. Nothing is random: same inputs, same tree.

Fixed shapes. Every round steps all J * R rows, whether or not a selection created a leaf: a
selection that did not (a depth-capped leaf, a collision, a root already done) steps its root's state
into a scratch row that nothing reads. That wastes those rows' compute and buys a round whose
kernels and shapes never depend on the tree: `SearchBuffers` holds everything at fixed addresses, so
the round (and the set-up before and the read-out after it) can be captured once as CUDA graphs and
replayed (planner/captured.py), with no host synchronisation until the search is done; on a GPU the
selections and backups are fused Triton programs (planner/kernels.py). `search` below runs the same
functions eagerly; on the CPU, where looking at a mask costs nothing, it skips what a mask would discard
(levels no selection reaches, rows that made no node).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..state import RecurrentState, StepFn
from . import kernels, policy
from .tree import Tree, consensus_score, top_k_candidates

logger = logging.getLogger(__name__)

# (states with K rows, roots [K] long: whose tree each row is in, tokens [K, D] long: the tokens read
# from that root to the row, -1 past the last) -> per-head values [K, H], probabilities in [0, 1].
# Learned heads read the states; a verifier reads the tokens (with the root's own context).
ValueFn = Callable[[RecurrentState, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PlannerConfig:
    n_simulations: int = 32      # simulations per root (each ends on one leaf)
    top_k: int = 4               # candidate actions per node (highest prior)
    c_puct: float = 1.5
    max_depth: int = 4           # depth of the deepest node below the root
    leaf_batch: int = 4          # selections per root and round, evaluated together
    virtual_loss: float = 1.0    # pseudo-visits of value 0 added along a pending path
    uncertainty_lambda: float = 0.0  # consensus score = mean over heads - lambda * std (tree.py: why 0)
    c_visit: float = 50.0        # the final choice's value scale, (c_visit + max visits) * c_scale (policy.py)
    c_scale: float = 0.1

    def __post_init__(self) -> None:
        for name in ("n_simulations", "top_k", "max_depth", "leaf_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, positive in (("c_puct", True), ("virtual_loss", False), ("uncertainty_lambda", False),
                               ("c_visit", False), ("c_scale", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")

    @property
    def capacity(self) -> int:
        """Node slots per root: the root and at most one new node per simulation."""
        return 1 + self.n_simulations

    @property
    def base_rounds(self) -> int:
        """Rounds every root needs at least; collisions can add some (at most n_simulations in all,
        since a round's first selection never collides)."""
        return -(-self.n_simulations // self.leaf_batch)


@dataclass(frozen=True)
class SearchStats:
    simulations: int      # simulations backed up, all roots (R * n_simulations)
    expansions: int       # new leaves: rows of step_fn and value_fn that made a node, all roots
    collisions: int       # selections dropped because a same-round selection had taken the leaf
    max_depth: int        # deepest node created
    nodes_used: int       # tree nodes, roots included, all roots
    rounds: int           # batched expansion rounds
    rows_stepped: int     # rows through step_fn: on a GPU every round's J * R (scratch included)
    wall_time_s: float


@dataclass
class SearchResult:
    action: torch.Tensor          # [R] long; the chosen root child (policy.final_slot)
    target_state: RecurrentState  # R rows; the state of that child
    layer_values: torch.Tensor    # [R, L] that child's mean per-layer value (value_sum / visits)
    score: torch.Tensor           # [R] its consensus score
    spread: torch.Tensor          # [R] std over heads of layer_values
    root_visits: torch.Tensor     # [R, top_k] long; visits of the root's candidates (0 = never expanded)
    root_actions: torch.Tensor    # [R, top_k] long; the root's candidate tokens, highest prior first
    root_q: torch.Tensor          # [R, top_k] the candidates' scores (0 = never expanded)
    stats: SearchStats
    tree: Tree                    # the whole search tree, for inspection
    # Every tensor is on the root states' device.


class SearchBuffers:
    """Everything one search reads and writes, at fixed addresses, for R roots.

    pool rows: node n of root r at r * capacity + n; then J * R scratch rows, row R * capacity
    + j * R + r for selection j of root r (where a selection that made no node is stepped to)."""

    def __init__(self, config: PlannerConfig, roots: int, like: RecurrentState, vocab: int, heads: int,
                 fused: bool | None = None, terminal_token: int | None = None):
        if config.top_k > vocab:
            raise ValueError(f"top_k={config.top_k} exceeds the vocabulary ({vocab})")
        self.config, self.roots, self.vocab, self.heads = config, roots, vocab, heads
        device = like.ssm.device
        # the tree's selections and backups as fused kernels (planner/kernels.py) or tensor operations
        self.fused = kernels.available(device) if fused is None else fused
        J, R, N = config.leaf_batch, roots, config.capacity
        self.tree = Tree.empty(R, N, config.top_k, heads, config.uncertainty_lambda, device, terminal_token)
        self.pool = _state_like(like, R * N + J * R, filled=False)
        long = dict(dtype=torch.long, device=device)
        rows = torch.arange(R, **long)
        self.root_rows = rows * N                                          # [R]
        self.scratch_rows = R * N + torch.arange(J * R, **long).view(J, R)  # [J, R]
        self.root_path = torch.full((R, config.max_depth + 1), -1, **long)
        self.root_path[:, 0] = 0
        # the inputs of a search
        self.root_states = _state_like(like, R)
        self.root_logits = torch.zeros(R, vocab, dtype=torch.float32, device=device)
        # what a round's selections leave for its step and read-out
        self.paths = torch.full((J, R, config.max_depth + 1), -1, **long)
        self.leaf = torch.zeros(J, R, **long)
        self.created = torch.zeros(J, R, dtype=torch.bool, device=device)
        self.leaf_values = torch.zeros(J, R, heads, dtype=torch.float32, device=device)
        self.leaf_tokens = torch.full((J * R, config.max_depth), -1, **long)   # what the new leaves read
        self.step_roots = rows.repeat(J)                                        # [J * R]: row j * R + r -> r
        self.step_tokens = torch.zeros(J * R, **long)
        self.parent_rows = torch.zeros(J * R, **long)
        self.child_rows = torch.zeros(J * R, **long)
        self.step_states = _state_like(like, J * R, filled=False)
        self.step_logits = torch.zeros(J * R, vocab, dtype=torch.float32, device=device)
        # progress: simulations per root; per root expansions and collisions; rounds in which some root had work
        self.done = torch.zeros(R, **long)
        self.rows_stepped = 0   # host count, by `step_round`
        self.root_counters = torch.zeros(2, R, **long)
        self.rounds = torch.zeros(1, **long)

    @property
    def step_rows(self) -> int:
        return self.config.leaf_batch * self.roots

    def complete(self) -> bool:
        """Every root has its simulations (a host synchronisation on a GPU)."""
        return bool((self.done >= self.config.n_simulations).all())


def _state_like(like: RecurrentState, rows: int, filled: bool = True) -> RecurrentState:
    """Rows shaped like `like`'s: zeros, or (filled=False) uninitialised, for the node pool and the step
    rows, every row of which is written (a root copied in, a node by the step that creates it) before it
    is read (the planner tests pass with those rows filled with NaN); zeroing them cost a CPU plan a
    quarter of its time (R * (n_simulations + 1 + J) rows of the whole recurrent state)."""
    new = (lambda t, shape: t.new_zeros(shape)) if filled else (lambda t, shape: t.new_empty(shape))
    return RecurrentState(new(like.conv, (like.n_layer, rows, *like.conv.shape[2:])),
                          new(like.ssm, (like.n_layer, rows, *like.ssm.shape[2:])))


def _values(value_fn: ValueFn, states: RecurrentState, roots: torch.Tensor, tokens: torch.Tensor,
            heads: int) -> torch.Tensor:
    """-> [rows, H] float32 per-head values, shape-checked."""
    values = value_fn(states, roots, tokens)
    if values.shape != (states.batch, heads):
        raise ValueError(f"value_fn must return [{states.batch}, {heads}] values, got {tuple(values.shape)}")
    return values.to(torch.float32)


def begin(buffers: SearchBuffers, value_fn: ValueFn, root_values: torch.Tensor | None = None) -> None:
    """Start a search from `buffers.root_states` and `buffers.root_logits`: R fresh trees, the roots
    stored and evaluated once (their own visit; `root_values` [R, H] if the caller has them)."""
    b, tree = buffers, buffers.tree
    tree.reset_()
    for t in (b.done, b.root_counters, b.rounds):
        t.zero_()
    b.rows_stepped = 0
    b.pool.scatter_(b.root_rows, b.root_states)
    if root_values is None:
        root_values = _values(value_fn, b.root_states, tree.rows, b.leaf_tokens[:b.roots].clone().fill_(-1), b.heads)
    tree.num_nodes.fill_(1)
    tree.set_candidates(torch.zeros_like(tree.rows), *top_k_candidates(b.root_logits, tree.top_k))
    tree.backup(b.root_path, root_values)


def select_round(buffers: SearchBuffers) -> None:
    """A round's J selections per root, and the rows to step: `step_tokens` [J * R] and the parent
    states in `step_states` (row j * R + r: selection j of root r)."""
    b, tree, config = buffers, buffers.tree, buffers.config
    J, R = config.leaf_batch, b.roots
    selections = (config.n_simulations - b.done).clamp(min=0, max=J)     # [R]
    b.rounds += (selections > 0).any().long()
    if b.fused:
        kernels.select(b, policy.EPS)
    for j in range(0 if b.fused else J):
        active = selections > j
        if _cheap_to_inspect(active) and not bool(active.any()):
            b.paths[j:] = -1
            b.leaf[j:] = 0
            b.created[j:] = False
            break
        path, leaf, created, collided = _select(tree, active, config)
        tree.add_virtual_visits(path, config.virtual_loss)
        b.paths[j] = path
        b.leaf[j] = leaf
        b.created[j] = created
        b.done += (active & ~collided).long()
        b.root_counters[1] += collided.long()
    roots = tree.rows.expand(J, R)
    base = b.root_rows.expand(J, R)
    parent = tree.parent[roots, b.leaf].clamp(min=0)
    # Depth-capped leaves are valued by what they hold, read before this round's backups change it.
    b.leaf_values.copy_(tree.mean_values(roots, b.leaf))
    b.step_tokens.copy_(torch.where(b.created, tree.action[roots, b.leaf], 0).flatten())
    b.parent_rows.copy_(torch.where(b.created, base + parent, base).flatten())
    b.child_rows.copy_(torch.where(b.created, base + b.leaf, b.scratch_rows).flatten())
    b.leaf_tokens.copy_(tree.path_tokens(b.step_roots, b.paths.view(J * R, -1)))
    torch.index_select(b.pool.conv, 1, b.parent_rows, out=b.step_states.conv)
    torch.index_select(b.pool.ssm, 1, b.parent_rows, out=b.step_states.ssm)


def step_round(buffers: SearchBuffers, step_fn: StepFn) -> torch.Tensor:
    """Step the round's rows (eagerly) -> logits [J * R, V]. On the CPU only the rows that made a node
    are stepped (the others' logits are 0 and their states stay their parents', both unread): there the
    host can see which they are for free, and a CPU step costs in proportion to its rows."""
    b = buffers
    if not _cheap_to_inspect(b.created) or bool(b.created.all()):
        b.rows_stepped += b.step_rows
        return _checked(step_fn(b.step_tokens, b.step_states), b.step_rows, b.vocab)
    made = b.created.flatten().nonzero().flatten()
    b.step_logits.zero_()
    if made.numel():
        states = b.step_states.gather(made)
        b.step_logits[made] = _checked(step_fn(b.step_tokens[made], states), made.numel(), b.vocab).float()
        b.step_states.scatter_(made, states)
        b.rows_stepped += made.numel()
    return b.step_logits


def eager_round(buffers: SearchBuffers, step_fn: StepFn, value_fn: ValueFn) -> None:
    """One whole round, its step by `step_fn` (what a captured round graph holds)."""
    select_round(buffers)
    finish_round(buffers, step_round(buffers, step_fn), value_fn)


def _checked(logits: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    if logits.shape != (rows, vocab):
        raise ValueError(f"step_fn must return [{rows}, {vocab}] logits, got {tuple(logits.shape)}")
    return logits


def finish_round(buffers: SearchBuffers, logits: torch.Tensor, value_fn: ValueFn) -> None:
    """After `step_states` were stepped by `step_tokens` to `logits` [J * R, V]: store the new nodes'
    states, set their candidates, evaluate them and back every selection's value up."""
    b, tree, config = buffers, buffers.tree, buffers.config
    J, R = config.leaf_batch, b.roots
    _checked(logits, J * R, b.vocab)
    b.pool.scatter_(b.child_rows, b.step_states)
    actions, priors = top_k_candidates(logits, tree.top_k)
    values = _values(value_fn, b.step_states, b.step_roots, b.leaf_tokens, b.heads).view(J, R, b.heads)
    leaf_values = torch.where(b.created.unsqueeze(2), values, b.leaf_values)
    if b.fused:
        kernels.backup(b, leaf_values, actions, priors)
    for j in range(0 if b.fused else J):
        rows = slice(j * R, (j + 1) * R)
        tree.set_candidates(b.leaf[j], actions[rows], priors[rows], mask=b.created[j])
        tree.backup(b.paths[j], leaf_values[j])
    tree.virtual_visits.zero_()
    b.root_counters[0] += b.created.sum(dim=0)


@dataclass
class SearchOutputs:
    """The read-out of a finished search, on the device (no host synchronisation to make it)."""
    action: torch.Tensor          # [R]
    target_state: RecurrentState  # R rows
    layer_values: torch.Tensor    # [R, L]
    root_visits: torch.Tensor     # [R, K]
    root_actions: torch.Tensor    # [R, K]
    root_q: torch.Tensor          # [R, K]
    per_root: torch.Tensor        # [R, 5] long: simulations, expansions, collisions, max depth, nodes
    rounds: torch.Tensor          # [1] long: rounds in which some root had work

    def first(self, roots: int) -> "SearchOutputs":
        """Copies of the outputs of roots [0:roots] (and the round counts)."""
        cut = slice(0, roots)
        return SearchOutputs(
            action=self.action[cut].clone(), target_state=self.target_state.rows(cut).clone(),
            layer_values=self.layer_values[cut].clone(), root_visits=self.root_visits[cut].clone(),
            root_actions=self.root_actions[cut].clone(), root_q=self.root_q[cut].clone(),
            per_root=self.per_root[cut].clone(),
            rounds=self.rounds.clone())


def read_out(buffers: SearchBuffers) -> SearchOutputs:
    b, tree = buffers, buffers.tree
    rows = tree.rows
    children = tree.children[:, 0]                                        # [R, K]
    root_visits = tree.visit_count.gather(1, children.clamp(min=0)) * (children >= 0)
    root_q = tree.score.gather(1, children.clamp(min=0)) * (children >= 0)
    c = b.config
    slot = policy.final_slot(tree.child_prior[:, 0], root_q, root_visits, c.c_visit, c.c_scale)
    best = children[rows, slot].clamp(min=0)
    per_root = torch.stack([b.done, b.root_counters[0], b.root_counters[1], tree.depth.amax(dim=1),
                            tree.num_nodes], dim=1)
    return SearchOutputs(action=tree.child_action[rows, 0, slot], target_state=b.pool.gather(b.root_rows + best),
                         layer_values=tree.mean_values(rows, best), root_visits=root_visits,
                         root_actions=tree.child_action[:, 0], root_q=root_q, per_root=per_root,
                         rounds=b.rounds.clone())


def result_of(outputs: SearchOutputs, buffers: SearchBuffers, started: float) -> SearchResult:
    """The host's view of a search (one synchronisation, for the statistics). The search may have run
    more roots than `outputs` holds (padding); rows_stepped counts all of them."""
    per_root, (rounds,) = outputs.per_root.tolist(), outputs.rounds.tolist()
    simulations, expansions, collisions = (sum(r[i] for r in per_root) for i in range(3))
    stats = SearchStats(simulations=simulations, expansions=expansions, collisions=collisions,
                        max_depth=max(r[3] for r in per_root), nodes_used=sum(r[4] for r in per_root),
                        rounds=rounds, rows_stepped=buffers.rows_stepped,
                        wall_time_s=time.perf_counter() - started)
    logger.debug("search: %s", stats)
    lam = buffers.config.uncertainty_lambda
    return SearchResult(
        action=outputs.action, target_state=outputs.target_state, layer_values=outputs.layer_values,
        score=consensus_score(outputs.layer_values, lam), spread=outputs.layer_values.std(dim=1, correction=0),
        root_visits=outputs.root_visits, root_actions=outputs.root_actions, root_q=outputs.root_q, stats=stats,
        tree=buffers.tree)


@torch.no_grad()
def search(root_states: RecurrentState, root_logits: torch.Tensor, step_fn: StepFn, value_fn: ValueFn,
           config: PlannerConfig, fused: bool | None = None, terminal_token: int | None = None) -> SearchResult:
    """Search from R roots, eagerly. root_states: R rows (not modified); root_logits: [R, V], the
    logits that came with them. fused: the tree kernels of kernels.py (default: where they run);
    terminal_token: the end-of-text token (its nodes are terminal). The buffers (node states:
    R * (1 + n_simulations + J) rows) are allocated here."""
    started = time.perf_counter()
    n_roots = root_states.batch
    if root_logits.dim() != 2 or root_logits.shape[0] != n_roots:
        raise ValueError(f"root_logits must be [R={n_roots}, V], got {tuple(root_logits.shape)}")
    no_tokens = torch.full((n_roots, config.max_depth), -1, dtype=torch.long, device=root_logits.device)
    root_values = value_fn(root_states, torch.arange(n_roots, device=root_logits.device), no_tokens)
    if root_values.dim() != 2 or root_values.shape[0] != n_roots:
        raise ValueError(f"value_fn must return [{n_roots}, H] values, got {tuple(root_values.shape)}")
    buffers = SearchBuffers(config, n_roots, root_states, root_logits.shape[1], heads=root_values.shape[1],
                            fused=fused, terminal_token=terminal_token)
    buffers.root_states.copy_(root_states)
    buffers.root_logits.copy_(root_logits)
    begin(buffers, value_fn, root_values.to(torch.float32))

    run_rounds(buffers, lambda: eager_round(buffers, step_fn, value_fn))
    return result_of(read_out(buffers), buffers, started)


def run_rounds(buffers: SearchBuffers, one_round: Callable[[], None]) -> None:
    """The rounds every root needs, then more while collisions left some root short."""
    for _ in range(buffers.config.base_rounds):
        one_round()
    while not buffers.complete():
        one_round()


def _select(tree: Tree, active: torch.Tensor, config: PlannerConfig):
    """One selection per active root (active: [R] bool), descending from the root by PUCT.

    Returns path [R, D + 1] (nodes from the root, -1 past the leaf; all -1 for inactive or collided
    roots), leaf [R], created [R] bool (the leaf is new and must be expanded), collided [R] bool."""
    rows = tree.rows
    node = torch.zeros_like(rows)
    path = torch.full((tree.roots, config.max_depth + 1), -1, dtype=torch.long, device=rows.device)
    path[:, 0] = torch.where(active, 0, -1)
    running = active.clone()
    created = torch.zeros_like(active)
    collided = torch.zeros_like(active)
    skip_idle = _cheap_to_inspect(rows)
    for depth in range(config.max_depth):   # nodes at max_depth have no children: the descent stops there
        running = running & ~tree.is_terminal(rows, node)   # nor have end-of-text nodes
        if skip_idle and not bool(running.any()):
            break   # the remaining levels would change nothing
        slot = policy.puct_slot(tree, node, config.c_puct)
        child = tree.children[rows, node, slot]
        expand = running & (child < 0)
        if not skip_idle or bool(expand.any()):
            child = torch.where(expand, tree.add_children(node, slot, expand), child)
        # A child with no completed visit was created earlier this round and is not evaluated yet.
        pending = running & ~expand & (tree.visit_count[rows, child.clamp(min=0)] == 0)
        created |= expand
        collided |= pending
        advance = running & ~pending
        path[:, depth + 1] = torch.where(advance, child, -1)
        node = torch.where(advance, child, node)
        running = advance & ~expand
    path = torch.where(collided.unsqueeze(1), -1, path)
    return path, node, created, collided


def _cheap_to_inspect(t: torch.Tensor) -> bool:
    """Whether the host may look at the tree's masks mid-search to skip work that would change
    nothing: on the CPU that is free; on a GPU it is a synchronisation, and impossible in a capture."""
    return t.device.type == "cpu"
