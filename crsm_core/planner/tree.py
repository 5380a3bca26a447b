"""Search trees for a batch of roots, stored as tensors (no Python node objects).

Every root owns `capacity` node slots; node 0 is the root and nodes are numbered in creation order.
A node's children are its K candidate actions (the top-K tokens of the logits that came with the
node's state); a candidate becomes a child node the first time selection picks it. Values are
probabilities in [0, 1] (that the continuation through the node succeeds), summed per head (one value
head per layer, or a single verifier); a node's score is the consensus of its mean per-head values.
A node reached by the end-of-text token is terminal: it has no children, and selection stops there
as it does at the depth cap.

The tree lives on the device of the node states, and every update is a fixed-shape tensor operation
over all R roots with a mask saying which roots take part (mctx's batched style): no boolean
indexing, no data-dependent shapes, no host synchronisation, so a whole round of the search can be
captured as one CUDA graph. A masked-out root's write goes to an index it already holds, with the
value it already holds.

Visit counting: a node is evaluated once when it is created; `visit_count` counts the simulations
that went through it, so `visit_count[n] = evaluations(n) + sum of its children's visit_count`, where
evaluations(n) is 1, except for a leaf at the depth cap, which counts every simulation ending on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def consensus_score(values: torch.Tensor, uncertainty_lambda: float) -> torch.Tensor:
    """values: [..., H] per-head probabilities -> [...] mean over heads - lambda * std over heads.

    The std is the population std (correction 0), so a single head has spread 0. lambda is 0 by
    default: the penalty rewarded the children the heads happened to agree on, not the better ones
    (deliberation-forensics B3), and it is kept only as an option to measure."""
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
    terminal_token: int | None = None  # the end-of-text token: a node reached by it is terminal

    def __post_init__(self) -> None:
        # A root's action is -1: a negative end-of-text token would make every root terminal, and the
        # search would silently never expand (a tokenizer that marked "no eos" with -1 did exactly that).
        if self.terminal_token is not None and self.terminal_token < 0:
            raise ValueError(f"terminal_token must be a token id (>= 0) or None, got {self.terminal_token}")
        # [R] long, 0 .. R-1: the root of each row (not a field: it is derived, not tree data)
        self.rows = torch.arange(self.parent.shape[0], device=self.parent.device)

    @classmethod
    def empty(cls, roots: int, capacity: int, top_k: int, heads: int, uncertainty_lambda: float,
              device: torch.device | str = "cpu", terminal_token: int | None = None) -> "Tree":
        long = dict(dtype=torch.long, device=device)
        real = dict(dtype=torch.float32, device=device)
        tree = cls(
            parent=torch.empty(roots, capacity, **long),
            action=torch.empty(roots, capacity, **long),
            prior=torch.empty(roots, capacity, **real),
            depth=torch.empty(roots, capacity, **long),
            visit_count=torch.empty(roots, capacity, **long),
            value_sum=torch.empty(roots, capacity, heads, **real),
            children=torch.empty(roots, capacity, top_k, **long),
            child_action=torch.empty(roots, capacity, top_k, **long),
            child_prior=torch.empty(roots, capacity, top_k, **real),
            score=torch.empty(roots, capacity, **real),
            virtual_visits=torch.empty(roots, capacity, **real),
            num_nodes=torch.empty(roots, **long),
            uncertainty_lambda=uncertainty_lambda,
            terminal_token=terminal_token,
        )
        tree.reset_()
        return tree

    def reset_(self) -> None:
        """Back to R empty trees (no node in use), in place: the buffers keep their addresses."""
        for t in (self.parent, self.action, self.children, self.child_action):
            t.fill_(-1)
        for t in (self.prior, self.depth, self.visit_count, self.value_sum, self.child_prior, self.score,
                  self.virtual_visits, self.num_nodes):
            t.zero_()

    @property
    def roots(self) -> int:
        return self.parent.shape[0]

    @property
    def capacity(self) -> int:
        return self.parent.shape[1]

    @property
    def top_k(self) -> int:
        return self.children.shape[2]

    def is_terminal(self, root: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """root, node: [...] long -> [...] bool: the node was reached by the end-of-text token."""
        if self.terminal_token is None:
            return torch.zeros_like(node, dtype=torch.bool)
        return self.action[root, node] == self.terminal_token

    def path_tokens(self, root: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """root: [K] long; path: [K, D + 1] nodes from the root (-1 past the leaf) -> [K, D] the tokens
        read from the root to the leaf, -1 past it (what a verifier checks)."""
        below = path[:, 1:]
        tokens = self.action[root.unsqueeze(1), below.clamp(min=0)]
        return torch.where(below >= 0, tokens, -1)

    def mean_values(self, root: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """root, node: [...] long -> [..., H] value_sum / visit_count (0 for unvisited nodes)."""
        visits = self.visit_count[root, node].clamp(min=1).to(torch.float32)
        return self.value_sum[root, node] / visits.unsqueeze(-1)

    def set_candidates(self, node: torch.Tensor, actions: torch.Tensor, priors: torch.Tensor,
                       mask: torch.Tensor | None = None) -> None:
        """node: [R] long, one node per root; actions, priors: [R, K] from `top_k_candidates` of those
        nodes' logits; mask: [R] bool, the roots whose node takes them (None: all)."""
        if mask is not None:
            keep = mask.unsqueeze(1)
            actions = torch.where(keep, actions, self.child_action[self.rows, node])
            priors = torch.where(keep, priors, self.child_prior[self.rows, node])
        self.child_action[self.rows, node] = actions
        self.child_prior[self.rows, node] = priors

    def add_children(self, node: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Create, for each root where `mask` holds, the child of `node` at candidate `slot`.

        node, slot: [R] long; mask: [R] bool -> the new nodes' indices [R] (meaningful where mask).
        The child is not evaluated yet. A root's slots suffice (capacity 1 + n_simulations, and a
        simulation creates at most one node), so a masked root's index is always free."""
        rows = self.rows
        new = self.num_nodes.clamp(max=self.capacity - 1)

        def put(t: torch.Tensor, index: tuple, value: torch.Tensor) -> None:
            t[index] = torch.where(mask, value, t[index])

        put(self.parent, (rows, new), node)
        put(self.action, (rows, new), self.child_action[rows, node, slot])
        put(self.prior, (rows, new), self.child_prior[rows, node, slot])
        put(self.depth, (rows, new), self.depth[rows, node] + 1)
        put(self.children, (rows, node, slot), new)
        self.num_nodes += mask.long()
        return new

    def backup(self, path: torch.Tensor, values: torch.Tensor) -> None:
        """Add one visit and the leaf's per-head values to every node of each root's path, and
        refresh those nodes' scores.

        path: [R, D + 1] long, node per depth from the root, -1 past the leaf (a row of -1 backs up
        nothing); values: [R, H]. Entries past the leaf add exactly 0 to the root's slot, so every
        shape is fixed; the real entries of a path are distinct nodes, so the sums do not depend on an
        accumulation order."""
        on_path = path >= 0                                               # [R, D + 1]
        flat = self._flat(path).flatten()                                 # [R * (D + 1)]
        heads = self.value_sum.shape[-1]
        self.visit_count.view(-1).scatter_add_(0, flat, on_path.long().flatten())
        added = values.to(torch.float32).unsqueeze(1) * on_path.unsqueeze(2)   # [R, D + 1, H]
        value_sum = self.value_sum.view(-1, heads)
        value_sum.scatter_add_(0, flat.unsqueeze(1).expand(-1, heads), added.view(-1, heads))
        means = value_sum[flat] / self.visit_count.view(-1)[flat].clamp(min=1).unsqueeze(1).to(torch.float32)
        self.score.view(-1)[flat] = consensus_score(means, self.uncertainty_lambda)

    def add_virtual_visits(self, path: torch.Tensor, amount: float) -> None:
        """path: [R, D + 1] as in `backup`; pending selections discourage the same path this round."""
        added = (path >= 0).to(torch.float32).flatten() * amount
        self.virtual_visits.view(-1).scatter_add_(0, self._flat(path).flatten(), added)

    def _flat(self, path: torch.Tensor) -> torch.Tensor:
        """path: [R, D + 1] node indices -> indices into the flattened [R * N] node tensors."""
        return self.rows.unsqueeze(1) * self.capacity + path.clamp(min=0)
