"""Search trees for a batch of roots, stored as tensors (no Python node objects).

Every root owns `capacity` node slots; node 0 is the root and nodes are numbered in creation order.
A node's children are its K candidate actions (the top-K tokens of the logits that came with the
node's state); a candidate becomes a child node the first time selection picks it. Values are summed
per head (one value head per layer); a node's score is the consensus of its mean per-head values.

The tree is small and is updated by many tiny operations, so it lives on the CPU whatever device
the node states are on.

Visit counting: a node is evaluated once when it is created; `visit_count` counts the simulations
that went through it, so `visit_count[n] = evaluations(n) + sum of its children's visit_count`, where
evaluations(n) is 1, except for a leaf at the depth cap, which counts every simulation ending on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def consensus_score(values: torch.Tensor, uncertainty_lambda: float) -> torch.Tensor:
    """values: [..., H] per-head values -> [...] mean over heads - lambda * std over heads.

    The std is the population std (correction 0), so a single head has spread 0."""
    mean = values.mean(dim=-1)
    if uncertainty_lambda == 0.0:
        return mean
    return mean - uncertainty_lambda * values.std(dim=-1, correction=0)


def top_k_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [B, V] -> (actions [B, k] long, priors [B, k] float32).

    Actions by descending prior; equal logits keep the lower token first (stable sort), so the
    order is deterministic. Priors are the softmax over the vocabulary, renormalised over the k."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    priors = sorted_probs[:, :k]
    return order[:, :k], priors / priors.sum(dim=-1, keepdim=True)


@dataclass
class Tree:
    parent: torch.Tensor          # [R, N] long; -1 for roots and unused slots
    action: torch.Tensor          # [R, N] long; the token that leads from the parent here, -1 for roots
    prior: torch.Tensor           # [R, N] float32; the parent's prior of that token
    depth: torch.Tensor           # [R, N] long; 0 at the root
    visit_count: torch.Tensor     # [R, N] long; completed simulations through the node
    value_sum: torch.Tensor       # [R, N, H] float32; per-head sum of the backed-up leaf values
    children: torch.Tensor        # [R, N, K] long; node index per candidate slot, -1 = not expanded
    child_action: torch.Tensor    # [R, N, K] long; the node's candidate tokens, highest prior first
    child_prior: torch.Tensor     # [R, N, K] float32; their priors
    score: torch.Tensor           # [R, N] float32; consensus score of value_sum / visit_count (backup keeps it)
    virtual_visits: torch.Tensor  # [R, N] float32; pending selections of the current round
    num_nodes: torch.Tensor       # [R] long; slots in use
    uncertainty_lambda: float     # the lambda of `score`

    @classmethod
    def empty(cls, roots: int, capacity: int, top_k: int, heads: int, uncertainty_lambda: float) -> "Tree":
        long = dict(dtype=torch.long)
        real = dict(dtype=torch.float32)
        return cls(
            parent=torch.full((roots, capacity), -1, **long),
            action=torch.full((roots, capacity), -1, **long),
            prior=torch.zeros(roots, capacity, **real),
            depth=torch.zeros(roots, capacity, **long),
            visit_count=torch.zeros(roots, capacity, **long),
            value_sum=torch.zeros(roots, capacity, heads, **real),
            children=torch.full((roots, capacity, top_k), -1, **long),
            child_action=torch.full((roots, capacity, top_k), -1, **long),
            child_prior=torch.zeros(roots, capacity, top_k, **real),
            score=torch.zeros(roots, capacity, **real),
            virtual_visits=torch.zeros(roots, capacity, **real),
            num_nodes=torch.zeros(roots, **long),
            uncertainty_lambda=uncertainty_lambda,
        )

    @property
    def roots(self) -> int:
        return self.parent.shape[0]

    @property
    def capacity(self) -> int:
        return self.parent.shape[1]

    @property
    def top_k(self) -> int:
        return self.children.shape[2]

    def mean_values(self, root: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """root, node: [...] long -> [..., H] value_sum / visit_count (0 for unvisited nodes)."""
        visits = self.visit_count[root, node].clamp(min=1).to(torch.float32)
        return self.value_sum[root, node] / visits.unsqueeze(-1)

    def set_candidates(self, root: torch.Tensor, node: torch.Tensor, actions: torch.Tensor,
                       priors: torch.Tensor) -> None:
        """root, node: [B] long; actions, priors: [B, K] from `top_k_candidates` of those nodes' logits."""
        self.child_action[root, node] = actions.cpu()
        self.child_prior[root, node] = priors.cpu()

    def add_children(self, root: torch.Tensor, node: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Create the child of `node` at candidate `slot`, one per listed root (roots distinct).

        root, node, slot: [B] long -> new node indices [B]. The child is not evaluated yet."""
        new = self.num_nodes[root]   # capacity 1 + n_simulations: a simulation creates at most one node
        self.num_nodes[root] = new + 1
        self.parent[root, new] = node
        self.action[root, new] = self.child_action[root, node, slot]
        self.prior[root, new] = self.child_prior[root, node, slot]
        self.depth[root, new] = self.depth[root, node] + 1
        self.children[root, node, slot] = new
        return new

    def backup(self, path: torch.Tensor, values: torch.Tensor) -> None:
        """Add one visit and the leaf's per-head values to every node of each root's path, and
        refresh those nodes' scores.

        path: [R, D + 1] long, node per depth from the root, -1 past the leaf (a row of -1 backs up
        nothing); values: [R, H]. A path holds distinct nodes of distinct roots, so the scattered
        indices never repeat and the sums do not depend on an accumulation order."""
        on_path = path >= 0
        flat = self._flat(path)[on_path]
        if flat.numel() == 0:
            return
        visits = self.visit_count.view(-1)
        value_sum = self.value_sum.view(-1, self.value_sum.shape[-1])
        visits.index_put_((flat,), torch.ones_like(flat), accumulate=True)
        added = values.to(torch.float32).unsqueeze(1).expand(-1, path.shape[1], -1)[on_path]
        value_sum.index_put_((flat,), added, accumulate=True)
        means = value_sum[flat] / visits[flat].unsqueeze(1).to(torch.float32)
        self.score.view(-1)[flat] = consensus_score(means, self.uncertainty_lambda)

    def add_virtual_visits(self, path: torch.Tensor, amount: float) -> None:
        """path: [R, D + 1] as in `backup`; pending selections discourage the same path this round."""
        flat = self._flat(path)[path >= 0]
        self.virtual_visits.view(-1).index_put_(
            (flat,), torch.full_like(flat, amount, dtype=torch.float32), accumulate=True)

    def _flat(self, path: torch.Tensor) -> torch.Tensor:
        """path: [R, D + 1] node indices -> indices into the flattened [R * N] node tensors."""
        rows = torch.arange(self.roots).unsqueeze(1)
        return rows * self.capacity + path.clamp(min=0)
