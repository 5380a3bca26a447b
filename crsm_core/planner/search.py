"""Batched PUCT search in latent space.

A search runs for R roots at once. Each round selects up to `leaf_batch` leaves per root, one after
another, with virtual loss so that the selections of a round spread over different leaves. All new
leaves of all roots are then expanded by ONE batched `step_fn` call (the leaf's parent state advanced
by the leaf's token) and evaluated by ONE batched `value_fn` call; their per-head values are backed
up along their paths. A simulation ends either on a new leaf or on a leaf at the depth cap (whose
value is backed up again, as a terminal node would be). A leaf created earlier in the same round
is not selectable until evaluated; a selection that finds every candidate of a node taken that way
is a collision: it is dropped (counted) and retried in a later round.

Selection at a node picks the candidate slot maximising Q + U (AlphaZero's PUCT):
  Q = consensus score (mean over heads - lambda * std over heads of value_sum / visits), min-max
      normalised over the node and its visited children (mctx's qtransform_by_parent_and_siblings);
      an unvisited child takes the node's own score; pending (virtual) visits count as value 0.
  U = c_puct * prior * sqrt(N_node) / (1 + N_child), N including virtual visits.
Ties go to the lower slot, i.e. the higher prior. Nothing is random: same inputs, same tree.

The tree lives on the CPU (see tree.py); node states, step_fn and value_fn stay on the device of the
root states. A round moves the new leaves' indices there and their candidates and values back.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..state import RecurrentState
from .tree import Tree, consensus_score, top_k_candidates

logger = logging.getLogger(__name__)

# (tokens [K] long, states with K rows, advanced in place) -> logits [K, V]
StepFn = Callable[[torch.Tensor, RecurrentState], torch.Tensor]
# states with K rows -> per-layer values [K, L] (one value head per layer)
ValueFn = Callable[[RecurrentState], torch.Tensor]

_SCALE_EPS = 1e-8


@dataclass(frozen=True)
class PlannerConfig:
    n_simulations: int = 32      # simulations per root (each ends on one leaf)
    top_k: int = 4               # candidate actions per node (highest prior)
    c_puct: float = 1.5
    max_depth: int = 4           # depth of the deepest node below the root
    leaf_batch: int = 4          # selections per root and round, evaluated together
    virtual_loss: float = 1.0    # pseudo-visits of value 0 added along a pending path
    uncertainty_lambda: float = 1.0  # consensus score = mean over heads - lambda * std over heads

    def __post_init__(self) -> None:
        for name in ("n_simulations", "top_k", "max_depth", "leaf_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, positive in (("c_puct", True), ("virtual_loss", False), ("uncertainty_lambda", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


@dataclass(frozen=True)
class SearchStats:
    simulations: int      # simulations backed up, all roots (R * n_simulations)
    expansions: int       # new leaves: rows through step_fn and value_fn, all roots
    collisions: int       # selections dropped because a same-round selection had taken the leaf
    max_depth: int        # deepest node created
    nodes_used: int       # tree nodes, roots included, all roots
    rounds: int           # batched expansion rounds
    wall_time_s: float


@dataclass
class SearchResult:
    action: torch.Tensor          # [R] long; most visited root child (ties -> higher prior)
    target_state: RecurrentState  # R rows; the state of that child, on the root states' device
    layer_values: torch.Tensor    # [R, L] that child's mean per-layer value (value_sum / visits)
    score: torch.Tensor           # [R] its consensus score
    spread: torch.Tensor          # [R] std over heads of layer_values
    root_visits: torch.Tensor     # [R, top_k] long; visits of the root's candidates (0 = never expanded)
    root_actions: torch.Tensor    # [R, top_k] long; the root's candidate tokens, highest prior first
    stats: SearchStats
    tree: Tree                    # the whole search tree, for inspection
    # Every tensor but target_state is on the CPU, where the tree is.


@torch.no_grad()
def search(root_states: RecurrentState, root_logits: torch.Tensor, step_fn: StepFn, value_fn: ValueFn,
           config: PlannerConfig, generator: torch.Generator | None = None) -> SearchResult:
    """Search from R roots. root_states: R rows (not modified); root_logits: [R, V], the logits that
    came with them. value_fn also evaluates the roots once (their own visit). `generator` is accepted
    for interface stability: the search draws no random numbers. The node states live in one pool of
    R * (1 + n_simulations) rows of the root states' dtype and device, allocated here."""
    del generator
    start = time.perf_counter()
    n_roots = root_states.batch
    if root_logits.dim() != 2 or root_logits.shape[0] != n_roots:
        raise ValueError(f"root_logits must be [R={n_roots}, V], got {tuple(root_logits.shape)}")
    vocab = root_logits.shape[1]
    if config.top_k > vocab:
        raise ValueError(f"top_k={config.top_k} exceeds the vocabulary ({vocab})")
    capacity = 1 + config.n_simulations
    rows = torch.arange(n_roots)

    root_values = _evaluate(value_fn, root_states, n_roots, heads=None)
    tree = Tree.empty(n_roots, capacity, config.top_k, root_values.shape[1], config.uncertainty_lambda)
    pool = RecurrentState(
        root_states.conv.new_empty((root_states.n_layer, n_roots * capacity, *root_states.conv.shape[2:])),
        root_states.ssm.new_empty((root_states.n_layer, n_roots * capacity, *root_states.ssm.shape[2:])))
    pool.scatter_(rows * capacity, root_states)   # every row read later has been written first
    tree.num_nodes.fill_(1)
    tree.set_candidates(rows, torch.zeros_like(rows), *top_k_candidates(root_logits, config.top_k))
    root_path = torch.full((n_roots, config.max_depth + 1), -1, dtype=torch.long)
    root_path[:, 0] = 0
    tree.backup(root_path, root_values)

    done = torch.zeros(n_roots, dtype=torch.long)
    rounds = expansions = collisions = 0
    while True:
        selections = (config.n_simulations - done).clamp(max=config.leaf_batch)  # [R]
        if not bool((selections > 0).any()):
            break
        rounds += 1
        paths, leaves, created, dropped = [], [], [], []
        for j in range(config.leaf_batch):
            active = selections > j
            if not bool(active.any()):
                break
            path, leaf, new, collided = _select(tree, active, config)
            tree.add_virtual_visits(path, config.virtual_loss)
            paths.append(path)
            leaves.append(leaf)
            created.append(new)
            dropped.append(collided)
            done += (active & ~collided).long()
        leaf = torch.stack(leaves)           # [J, R]
        # Values of the depth-capped leaves, read before this round's backups change any sum.
        leaf_values = tree.mean_values(rows.expand_as(leaf), leaf)   # [J, R, H]
        sel, root = torch.nonzero(torch.stack(created), as_tuple=True)
        if sel.numel():
            node = leaf[sel, root]
            leaf_values[sel, root] = _expand(tree, pool, step_fn, value_fn, root, node, vocab)
            expansions += sel.numel()
        collisions += int(torch.stack(dropped).sum())
        for path, values in zip(paths, leaf_values):
            tree.backup(path, values)
        tree.virtual_visits.zero_()

    children = tree.children[:, 0]                             # [R, K]
    root_visits = tree.visit_count.gather(1, children.clamp(min=0)) * (children >= 0)
    slot = root_visits.argmax(dim=1)                           # first maximum: the higher prior
    best = children[rows, slot]
    layer_values = tree.mean_values(rows, best)
    target_state = pool.gather((rows * capacity + best).to(pool.ssm.device))
    stats = SearchStats(
        simulations=int(done.sum()), expansions=expansions, collisions=collisions,
        max_depth=int(tree.depth.max()), nodes_used=int(tree.num_nodes.sum()), rounds=rounds,
        wall_time_s=time.perf_counter() - start)
    logger.debug("search: %s", stats)
    return SearchResult(
        action=tree.child_action[rows, 0, slot], target_state=target_state, layer_values=layer_values,
        score=consensus_score(layer_values, config.uncertainty_lambda),
        spread=layer_values.std(dim=1, correction=0), root_visits=root_visits,
        root_actions=tree.child_action[:, 0], stats=stats, tree=tree)


def _evaluate(value_fn: ValueFn, states: RecurrentState, rows: int, heads: int | None) -> torch.Tensor:
    """-> [rows, H] float32 per-head values on the CPU, shape-checked."""
    values = value_fn(states)
    if values.dim() != 2 or values.shape[0] != rows or (heads is not None and values.shape[1] != heads):
        expected = f"[{rows}, {heads if heads is not None else 'L'}]"
        raise ValueError(f"value_fn must return {expected} values, got {tuple(values.shape)}")
    return values.to(device="cpu", dtype=torch.float32)


def _expand(tree: Tree, pool: RecurrentState, step_fn: StepFn, value_fn: ValueFn, root: torch.Tensor,
            node: torch.Tensor, vocab: int) -> torch.Tensor:
    """Compute the states of the new nodes (root, node: [K]) from their parents' in one step_fn call,
    store them, set their candidates, and return their values [K, H]."""
    device = pool.ssm.device
    states = pool.gather((root * tree.capacity + tree.parent[root, node]).to(device))
    logits = step_fn(tree.action[root, node].to(device), states)
    if logits.shape != (node.shape[0], vocab):
        raise ValueError(f"step_fn must return [{node.shape[0]}, {vocab}] logits, got {tuple(logits.shape)}")
    pool.scatter_((root * tree.capacity + node).to(device), states)
    tree.set_candidates(root, node, *top_k_candidates(logits, tree.top_k))
    return _evaluate(value_fn, states, node.shape[0], heads=tree.value_sum.shape[-1])


def _select(tree: Tree, active: torch.Tensor, config: PlannerConfig):
    """One selection per active root (active: [R] bool), descending from the root by PUCT.

    Returns path [R, D + 1] (nodes from the root, -1 past the leaf; all -1 for inactive or collided
    roots), leaf [R], created [R] bool (the leaf is new and must be expanded), collided [R] bool."""
    n_roots, depth_cap = tree.roots, config.max_depth
    rows = torch.arange(n_roots)
    node = torch.zeros(n_roots, dtype=torch.long)
    path = torch.full((n_roots, depth_cap + 1), -1, dtype=torch.long)
    path[:, 0] = torch.where(active, 0, -1)
    running = active.clone()
    created = torch.zeros_like(active)
    collided = torch.zeros_like(active)
    for depth in range(depth_cap):   # nodes at depth_cap have no children: the loop stops there
        if not bool(running.any()):
            break
        slot = _puct_slot(tree, rows, node, config)
        child = tree.children[rows, node, slot]
        expand = running & (child < 0)
        if bool(expand.any()):
            child[expand] = tree.add_children(rows[expand], node[expand], slot[expand])
        # A child with no completed visit was created earlier this round and is not evaluated yet.
        pending = running & ~expand & (tree.visit_count[rows, child.clamp(min=0)] == 0)
        created |= expand
        collided |= pending
        advance = running & ~pending
        path[:, depth + 1] = torch.where(advance, child, -1)
        node = torch.where(advance, child, node)
        running = advance & ~expand
    path[collided] = -1
    return path, node, created, collided


def _puct_slot(tree: Tree, rows: torch.Tensor, node: torch.Tensor, config: PlannerConfig) -> torch.Tensor:
    """rows, node: [R] -> the candidate slot [R] maximising Q + U at each root's current node."""
    children = tree.children[rows, node]                       # [R, K]
    expanded = children >= 0
    child = children.clamp(min=0)
    row = rows.unsqueeze(1)
    n_child = tree.visit_count[row, child].to(torch.float32) * expanded
    v_child = tree.virtual_visits[row, child] * expanded
    visited = n_child > 0
    child_score = tree.score[row, child]                       # [R, K]
    node_score = tree.score[rows, node]                        # [R]
    low = torch.minimum(node_score, torch.where(visited, child_score, math.inf).amin(dim=1))
    high = torch.maximum(node_score, torch.where(visited, child_score, -math.inf).amax(dim=1))
    scale = (high - low).clamp(min=_SCALE_EPS)
    q = torch.where(visited, (child_score - low.unsqueeze(1)) / scale.unsqueeze(1),
                    ((node_score - low) / scale).unsqueeze(1))
    # Virtual visits are pending simulations scored at the normalised minimum, 0.
    seen = n_child + v_child
    q = torch.where(seen > 0, q * n_child / seen.clamp(min=_SCALE_EPS), q)
    n_node = tree.visit_count[rows, node].to(torch.float32) + tree.virtual_visits[rows, node]
    u = config.c_puct * tree.child_prior[rows, node] * n_node.sqrt().unsqueeze(1) / (1 + seen)
    # A child created earlier this round is not evaluated yet: pick another slot while there is one
    # (when every slot is taken, slot 0 is returned and the selection collides).
    waiting = expanded & ~visited
    return torch.where(waiting, -math.inf, q + u).argmax(dim=1)   # first maximum: the higher prior
