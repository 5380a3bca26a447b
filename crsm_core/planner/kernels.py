"""Fused tree kernels (Triton) for a search round: all J selections of a root in one program, and all
J backups (with the new leaves' candidates) in another; one program per root.

Why: in plain tensor operations a round's J selections of depth D are J * D dependent steps of ~60
tiny kernels each (~1,000 per round at J = D = 4), and even replayed from a CUDA graph each costs a
few microseconds, so the tree work, not the state step, set a round's time (48 ms for a 1-root
plan on an H200). A root's walk is a short sequential loop over a few dozen bytes: one program
does it in registers. The tensor version in search.py is the reference and runs everywhere else;
tests/test_captured_search.py checks that both build the same trees.

Arithmetic follows the reference's order (policy.py) with round-to-nearest division and square root,
so that PUCT scores match bit for bit; the consensus score's mean and std over heads are reduced in another
order than torch's and may differ in the last bit.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU installs: the reference tensor path is used
    triton = None

if triton is not None:

    @triton.jit
    def _select_kernel(children, child_action, child_prior, parent, action, prior, depth, visits, virtual, score,
                       num_nodes, done, paths, leaf, created, collisions,
                       R, N, n_simulations, c_puct, virtual_loss, eps, terminal_token,
                       J: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        base = r * N
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ds = tl.arange(0, BLOCK_D)
        selections = tl.minimum(tl.maximum(n_simulations - tl.load(done + r), 0), J)
        n_done = selections * 0
        n_collided = selections * 0
        for j in tl.static_range(J):
            run = (selections > j).to(tl.int32)
            active = run
            made = run * 0
            collided = run * 0
            node = r * 0
            path = tl.where(ds == 0, tl.where(run != 0, 0, -1), -1).to(tl.int64)
            for level in tl.static_range(D):
                row = base + node
                run = run * (tl.load(action + row) != terminal_token).to(tl.int32)   # end-of-text: a leaf
                ch = tl.load(children + row * K + ks, mask=k_ok, other=-1)
                expanded = ch >= 0
                chc = tl.where(expanded, ch, 0)
                n_child = tl.where(expanded, tl.load(visits + base + chc, mask=k_ok, other=0).to(tl.float32), 0.0)
                v_child = tl.where(expanded, tl.load(virtual + base + chc, mask=k_ok, other=0.0), 0.0)
                visited = n_child > 0
                child_score = tl.load(score + base + chc, mask=k_ok, other=0.0)
                node_score = tl.load(score + row)
                q = tl.where(visited, child_score, node_score)   # policy.child_q, in its order
                seen = n_child + v_child
                q = tl.where(seen > 0, tl.div_rn(q * n_child, tl.maximum(seen, eps)), q)
                n_node = tl.load(visits + row).to(tl.float32) + tl.load(virtual + row)
                priors = tl.load(child_prior + row * K + ks, mask=k_ok, other=0.0)
                u = tl.div_rn(c_puct * priors * tl.sqrt_rn(n_node), 1.0 + seen)
                waiting = expanded & (n_child == 0)
                slot = tl.argmax(tl.where(waiting | (ks >= K), -float("inf"), q + u), axis=0)
                pick = ks == slot
                child = tl.sum(tl.where(pick, ch, 0), axis=0)
                expand = (run != 0) & (child < 0)
                new = tl.minimum(tl.load(num_nodes + r), N - 1)
                actions = tl.load(child_action + row * K + ks, mask=k_ok, other=0)
                tl.store(parent + base + new, node, mask=expand)
                tl.store(action + base + new, tl.sum(tl.where(pick, actions, 0), axis=0), mask=expand)
                tl.store(prior + base + new, tl.sum(tl.where(pick, priors, 0.0), axis=0), mask=expand)
                tl.store(depth + base + new, tl.load(depth + row) + 1, mask=expand)
                tl.store(children + row * K + slot, new, mask=expand)
                tl.store(num_nodes + r, new + 1, mask=expand)
                child = tl.where(expand, new, child)
                pending = (run != 0) & (expand == 0) & (tl.load(visits + base + tl.maximum(child, 0)) == 0)
                made = made | expand.to(tl.int32)
                collided = collided | pending.to(tl.int32)
                advance = (run != 0) & (pending == 0)
                path = tl.where(ds == level + 1, tl.where(advance, child, -1), path)
                node = tl.where(advance, child, node)
                run = (advance & (expand == 0)).to(tl.int32)
            path = tl.where(collided != 0, -1, path)
            on_path = (path >= 0) & (ds < D + 1)
            tl.store(paths + (j * R + r) * (D + 1) + ds, path, mask=ds < D + 1)
            tl.store(leaf + j * R + r, node)
            tl.store(created + j * R + r, made.to(tl.int8))
            at = base + tl.where(on_path, path, 0)
            tl.store(virtual + at, tl.load(virtual + at, mask=on_path, other=0.0) + virtual_loss, mask=on_path)
            n_done += active * (1 - collided)
            n_collided += collided
            tl.debug_barrier()   # the next selection reads what this one wrote
        tl.store(done + r, tl.load(done + r) + n_done)
        tl.store(collisions + r, tl.load(collisions + r) + n_collided)

    @triton.jit
    def _backup_kernel(paths, leaf, created, leaf_values, new_actions, new_priors, child_action, child_prior,
                       visits, value_sum, score, R, N, lam,
                       J: tl.constexpr, D: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        base = r * N
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        hs = tl.arange(0, BLOCK_H)
        h_ok = hs < H
        for j in tl.static_range(J):
            jr = j * R + r
            made = tl.load(created + jr) != 0
            at = (base + tl.load(leaf + jr)) * K + ks
            tl.store(child_action + at, tl.load(new_actions + jr * K + ks, mask=k_ok, other=0), mask=k_ok & made)
            tl.store(child_prior + at, tl.load(new_priors + jr * K + ks, mask=k_ok, other=0.0), mask=k_ok & made)
            values = tl.load(leaf_values + jr * H + hs, mask=h_ok, other=0.0)
            for i in tl.static_range(D + 1):
                node = tl.load(paths + jr * (D + 1) + i)
                on = node >= 0
                slot = base + tl.maximum(node, 0)
                n = tl.load(visits + slot) + 1
                tl.store(visits + slot, n, mask=on)
                sums = tl.load(value_sum + slot * H + hs, mask=h_ok, other=0.0) + values
                tl.store(value_sum + slot * H + hs, sums, mask=h_ok & on)
                means = tl.where(h_ok, tl.div_rn(sums, n.to(tl.float32)), 0.0)
                mean = tl.sum(means, axis=0) / H
                spread = tl.where(h_ok, means - mean, 0.0)
                std = tl.sqrt_rn(tl.sum(spread * spread, axis=0) / H)
                tl.store(score + slot, mean - lam * std, mask=on)
            tl.debug_barrier()   # the next backup may pass the same nodes


def available(device: torch.device) -> bool:
    """The fused kernels run on CUDA devices where Triton is installed."""
    return triton is not None and device.type == "cuda"


def _block(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def select(buffers, eps: float) -> None:
    """The J selections of every root (search.select_round's loop), in one launch."""
    b, tree, c = buffers, buffers.tree, buffers.config
    _select_kernel[(b.roots,)](
        tree.children, tree.child_action, tree.child_prior, tree.parent, tree.action, tree.prior, tree.depth,
        tree.visit_count, tree.virtual_visits, tree.score, tree.num_nodes, b.done, b.paths, b.leaf,
        b.created.view(torch.int8), b.root_counters[1],
        b.roots, tree.capacity, c.n_simulations, float(c.c_puct), float(c.virtual_loss), eps,
        -2 if tree.terminal_token is None else tree.terminal_token,   # -2: no token (roots hold -1)
        J=c.leaf_batch, D=c.max_depth, K=c.top_k, BLOCK_K=_block(c.top_k), BLOCK_D=_block(c.max_depth + 1))


def backup(buffers, leaf_values: torch.Tensor, actions: torch.Tensor, priors: torch.Tensor) -> None:
    """The new leaves' candidates and the J backups of every root (search.finish_round's loop).
    leaf_values: [J, R, H]; actions, priors: [J * R, K]."""
    b, tree, c = buffers, buffers.tree, buffers.config
    _backup_kernel[(b.roots,)](
        b.paths, b.leaf, b.created.view(torch.int8), leaf_values.contiguous(), actions.contiguous(),
        priors.contiguous(), tree.child_action, tree.child_prior, tree.visit_count, tree.value_sum, tree.score,
        b.roots, tree.capacity, float(tree.uncertainty_lambda),
        J=c.leaf_batch, D=c.max_depth, K=c.top_k, H=b.heads, BLOCK_K=_block(c.top_k), BLOCK_H=_block(b.heads))
