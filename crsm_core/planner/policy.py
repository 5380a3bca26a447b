"""Selection at a node: PUCT over the node's candidate slots, on values as they are.

Q is the consensus score of a child's mean per-head value, a probability in [0, 1]. It is used
without rescaling: a per-node min-max normalisation (mctx's `qtransform_by_min_max` without a
minimum scale, which this planner first had) turns value differences of a few thousandths into a
full 0-1 swing that outweighs the prior, and the search then overrode the model's right tokens on
noise (deliberation-forensics B1). On an absolute scale a value must differ by about
c_puct * prior / (1 + N) before it beats the prior's preference, and with a value that carries no
information (equal everywhere) the search keeps the prior's order: the most visited root child is
the model's own argmax.

  Q(child) = score(child)                 once it has a completed visit
           = score(node)                  before (a child is assumed as good as its parent)
  pending (virtual) visits count as value 0:  Q * N / (N + V)
  U(child) = c_puct * prior * sqrt(N_node + V_node) / (1 + N + V)
The selected slot maximises Q + U; ties go to the lower slot, i.e. the higher prior. A child created
earlier in the same round and not evaluated yet is not selectable (its slot scores -inf).

The fused selection kernel (kernels.py) computes the same expression in the same order.

The action a search returns is not its most visited child: with J selections a round under virtual
loss and a peaked prior, the prior's favourite keeps collecting visits after its value is known to be
bad (measured on the default model with a prefix checker: the right digit valued 1.0 got 5 visits,
the wrong favourite valued 0.0 got 9). As Gumbel MuZero's final choice does (mctx, without the noise),
the action maximises log prior + sigma(Q) over the children the search valued, with
sigma(q) = (c_visit + max visits) * c_scale * q: values count more the more the search looked, and with
a value that carries no information (equal everywhere) the choice is the prior's argmax exactly.
"""
from __future__ import annotations

import math

import torch

from .tree import Tree

EPS = 1e-8


def child_q(child_score: torch.Tensor, node_score: torch.Tensor, n_child: torch.Tensor,
            v_child: torch.Tensor) -> torch.Tensor:
    """child_score, n_child, v_child: [R, K]; node_score: [R] -> Q [R, K] (see the module docstring)."""
    q = torch.where(n_child > 0, child_score, node_score.unsqueeze(1))
    seen = n_child + v_child
    return torch.where(seen > 0, q * n_child / seen.clamp(min=EPS), q)


def puct_slot(tree: Tree, node: torch.Tensor, c_puct: float) -> torch.Tensor:
    """node: [R] -> the candidate slot [R] maximising Q + U at each root's current node."""
    rows = tree.rows
    children = tree.children[rows, node]                       # [R, K]
    expanded = children >= 0
    child = children.clamp(min=0)
    row = rows.unsqueeze(1)
    n_child = tree.visit_count[row, child].to(torch.float32) * expanded
    v_child = tree.virtual_visits[row, child] * expanded
    q = child_q(tree.score[row, child], tree.score[rows, node], n_child, v_child)
    n_node = tree.visit_count[rows, node].to(torch.float32) + tree.virtual_visits[rows, node]
    u = c_puct * tree.child_prior[rows, node] * n_node.sqrt().unsqueeze(1) / (1 + n_child + v_child)
    # A child created earlier this round is not evaluated yet: pick another slot while there is one
    # (when every slot is taken, slot 0 is returned and the selection collides).
    waiting = expanded & (n_child == 0)
    return torch.where(waiting, -math.inf, q + u).argmax(dim=1)   # first maximum: the higher prior


def final_slot(prior: torch.Tensor, q: torch.Tensor, visits: torch.Tensor, c_visit: float,
               c_scale: float) -> torch.Tensor:
    """prior, q: [R, K] float; visits: [R, K] long -> the chosen slot [R] (see the module docstring).
    Slots never visited are not eligible; slot 0 (the prior's argmax) always is."""
    valued = (visits > 0) | (torch.arange(q.shape[1], device=q.device) == 0)
    sigma = (c_visit + visits.amax(dim=1, keepdim=True).to(torch.float32)) * c_scale * q
    score = torch.log(prior.clamp(min=1e-30)) + sigma
    return torch.where(valued, score, -math.inf).argmax(dim=1)   # first maximum: the higher prior
