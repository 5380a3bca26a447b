"""Batched sampling on the device: every row its own temperature, top-k, top-p and seed.

A row's random numbers come from a counter-based hash of (its seed, how many tokens it has drawn,
the vocabulary index), not from a shared generator, so

- a seeded request draws the same tokens alone or beside any others in a batch (no cross-talk), and
- a whole batch is sampled by a fixed handful of tensor ops with no host synchronisation: the
  counters live on the device and advance there (Gumbel-max: argmax(logits / T + Gumbel noise)
  is an exact draw from softmax(logits / T)).

Before the draw, each row's logits are adjusted as vLLM's sampler adjusts them (`SamplingTable.adjust`),
greedy rows included: `logit_bias` added; the tokens that would end the session (eos, stop_token_ids)
masked while fewer than `min_tokens` are drawn; `repetition_penalty` (over the prompt's and the output's
tokens: a positive logit divided by it, a negative one multiplied), then `presence_penalty` and
`frequency_penalty` (over the output's tokens: minus the penalty once, minus it per occurrence). After
the temperature, `min_p` drops the tokens less likely than min_p times the most likely one.

`SamplingTable` holds the per-row parameters of a pool of rows, like the recurrent state pool.
"""
from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from typing import Sequence

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    seed: int | None = None    # None: a fresh random seed per request
    min_p: float = 0.0         # 0 = off
    repetition_penalty: float = 1.0   # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit)
    min_tokens: int = 0        # the tokens that end a session are not drawn before this many

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 <= self.top_k < 2 ** 63:    # an int64 on the device
            raise ValueError(f"top_k must be in [0, 2**63), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -2 ** 63 <= self.seed < 2 ** 64:   # what torch.Generator takes
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.min_tokens < 2 ** 63:
            raise ValueError(f"min_tokens must be in [0, 2**63), got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filters(self) -> bool:
        """Top-k, top-p or min-p is on (the first two need a sort of the row)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def penalized(self) -> bool:
        """A penalty is on (which needs the counts of the row's tokens)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def resolved_seed(self) -> int:
        return secrets.randbits(63) if self.seed is None else self.seed


# ---- counter-based random numbers ------------------------------------------------------------------

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without overflowing int64 on the way."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (Wellons' lowbias32) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def as_int64(seed: int) -> int:
    """A seed in [-2**63, 2**64) as the int64 with the same 64 bits."""
    return (seed + 2 ** 63) % 2 ** 64 - 2 ** 63


@functools.lru_cache(maxsize=8)
def _column_keys(width: int, device: torch.device) -> torch.Tensor:
    """[width] int64: a distinct 32-bit key per column (a Weyl sequence through hash32, a bijection of
    32-bit values), made once per vocabulary size and device."""
    with torch.inference_mode(False):   # a normal tensor: read by samplers inside and outside inference mode
        return hash32(_mul32(torch.arange(width, device=device, dtype=torch.int64), _GOLDEN))


def uniform(seeds: torch.Tensor, counters: torch.Tensor, width: int) -> torch.Tensor:
    """seeds, counters: [B] int64 -> [B, width] float32 uniforms in (0, 1), a pure function of
    (seed, counter, column): the same row gives the same numbers in any batch."""
    key = hash32(hash32(seeds & _M32) ^ ((seeds >> 32) & _M32))               # [B]
    row = hash32(key ^ hash32((counters & _M32) ^ 0x5BD1E995))                # [B]
    # One hash per entry of the [B, width] block, the costly part of a sampled step (some twenty int64
    # kernels over 64 x 50,277 entries on a GPU): each row's key against each column's, both mixed.
    bits = hash32(row[:, None] ^ _column_keys(width, seeds.device)[None, :])   # [B, width]
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


# ---- filtering and drawing -------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V] (temperature-scaled); top_k: [B] long (0 = off); top_p: [B] float (1 = off);
    min_p: [B] float (0 = off). Returns [B, V] with the filtered entries at -inf: top-k first, then the
    smallest prefix of the rest whose probability reaches top_p, and those less likely than min_p times
    the most likely token (the most likely token always stays)."""
    vocab = logits.shape[-1]
    ordered, _ = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)                # [B]
    kth = ordered.gather(1, (k - 1)[:, None])                                # [B, 1]
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(dim=-1) - probs                                    # mass strictly before each
    keep = (before < top_p[:, None]).sum(dim=-1).clamp(min=1)                # [B] kept prefix length
    threshold = torch.maximum(ordered.gather(1, (keep - 1)[:, None]), kth)
    if min_p is not None:
        # p >= min_p * p_max  <=>  logit >= logit_max + log(min_p); log(0) = -inf keeps every token
        threshold = torch.maximum(threshold, ordered[:, :1] + torch.log(min_p)[:, None])
    return logits.masked_fill(logits < threshold, float("-inf"))


def draw(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
         seeds: torch.Tensor, counters: torch.Tensor, *, filters: bool = True,
         min_p: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row. logits: [B, V]; temperature, top_p, min_p: [B] float; top_k, seeds, counters:
    [B] int64. Rows with temperature 0 take the argmax. `filters=False` skips the top-k / top-p / min-p
    filter (when no row uses them). Returns tokens [B] int64 on logits' device; nothing is synchronised."""
    greedy = temperature <= 0
    # The best logit shifted to 0 and T at least float32's smallest normal: a tiny temperature then
    # gives -inf to every other token (a greedy draw) instead of inf - inf = NaN.
    shifted = logits.float() - logits.float().amax(dim=-1, keepdim=True)
    scaled = shifted / torch.where(greedy, 1.0, temperature.clamp(min=torch.finfo(torch.float32).tiny))[:, None]
    if filters:
        scaled = filter_logits(scaled, top_k, top_p, min_p)
    gumbel = -torch.log(-torch.log(uniform(seeds, counters, logits.shape[-1])))
    sampled = torch.argmax(scaled + gumbel, dim=-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), sampled)


class SamplingTable:
    """Per-row sampling parameters and draw counters for `rows` pool rows, on `device`.

    The engine sets a row when a session takes it, moves rows with the state pool, samples rows
    [0, n) in one call, and records the tokens the rows took (`record`: the penalties count them); a
    host mirror of the parameters says (without a sync) whether any row needs the random numbers, the
    filters, the bias, the penalties or the min_tokens mask. The [rows, V] tables those need are made
    the first time a row uses them."""

    def __init__(self, rows: int, device: torch.device | str):
        self.rows, self.device = rows, torch.device(device)
        self.temperature = torch.zeros(rows, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.min_p = torch.zeros(rows, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.counters = torch.zeros(rows, dtype=torch.int64, device=device)
        self.repetition = torch.ones(rows, device=device)
        self.presence = torch.zeros(rows, device=device)
        self.frequency = torch.zeros(rows, device=device)
        self.min_tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self._params: list[SamplingParams] = [SamplingParams(temperature=0.0)] * rows
        self._vocab: dict[str, torch.Tensor] = {}   # [rows, V] tables, made on first use

    def _table(self, name: str, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """bias (float: added to the logits), counts (int32: output tokens), prompt (bool: prompt tokens),
        ending (bool: the tokens that end the row's session): [rows, V]."""
        table = self._vocab.get(name)
        if table is None:
            table = self._vocab[name] = torch.zeros(self.rows, vocab, dtype=dtype, device=self.device)
        return table

    def set_row(self, row: int, params: SamplingParams, seed: int, drawn: int = 0, *, vocab: int | None = None,
                prompt: Sequence[int] = (), output: Sequence[int] = (), ending: Sequence[int] = ()) -> None:
        """Give row `row` a session's parameters and seed, its counter at `drawn` (tokens already drawn).
        For the bias, the penalties and min_tokens: the vocabulary size, the prompt's tokens, the tokens
        generated so far (`output`) and the tokens that end the session (`ending`: eos, stop_token_ids)."""
        self._params[row] = params
        self.temperature[row] = params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k
        self.min_p[row] = params.min_p
        self.seeds[row] = as_int64(seed)
        self.counters[row] = drawn
        self.repetition[row] = params.repetition_penalty
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.min_tokens[row] = params.min_tokens
        if not (params.logit_bias or params.penalized or params.min_tokens):
            return
        if vocab is None:
            raise ValueError("the bias, the penalties and min_tokens need the vocabulary size")

        def ids(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.int64).to(self.device, non_blocking=True)

        if params.logit_bias:
            bias = self._table("bias", vocab, torch.float32)[row]
            bias.zero_()
            tokens, values = zip(*params.logit_bias)
            bias[ids(tokens)] = torch.tensor(values, dtype=torch.float32).to(self.device, non_blocking=True)
        if params.penalized:
            counts = self._table("counts", vocab, torch.int32)[row]
            counts.zero_()
            counts.index_add_(0, ids(output), torch.ones(len(output), dtype=torch.int32, device=self.device))
            seen = self._table("prompt", vocab, torch.bool)[row]
            seen.zero_()
            seen[ids(prompt)] = True
        if params.min_tokens:
            mask = self._table("ending", vocab, torch.bool)[row]
            mask.zero_()
            mask[ids(ending)] = True

    def move_row(self, source: int, dest: int) -> None:
        self._params[dest] = self._params[source]
        for t in (self.temperature, self.top_p, self.top_k, self.min_p, self.seeds, self.counters, self.repetition,
                  self.presence, self.frequency, self.min_tokens, *self._vocab.values()):
            t[dest] = t[source]

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [n, V] of rows [0, n) -> [n, V] with the bias, the min_tokens mask and the penalties
        applied (see the module docstring); `logits` itself is left as it is."""
        n = logits.shape[0]
        params = self._params[:n]
        if any(p.logit_bias for p in params):
            logits = logits + self._vocab["bias"][:n]
        if any(p.min_tokens for p in params):
            early = (self.counters[:n] < self.min_tokens[:n])[:, None] & self._vocab["ending"][:n]
            logits = logits.masked_fill(early, float("-inf"))
        if any(p.penalized for p in params):
            counts = self._vocab["counts"][:n]
            generated = counts > 0
            seen = generated | self._vocab["prompt"][:n]
            rep = self.repetition[:n, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
            logits = logits - self.presence[:n, None] * generated - self.frequency[:n, None] * counts
        return logits

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [n, V] for rows [0, n) -> tokens [n] on the device; those rows' counters advance."""
        n = logits.shape[0]
        params = self._params[:n]
        logits = self.adjust(logits)
        if all(p.greedy for p in params):
            tokens = torch.argmax(logits, dim=-1)
        else:
            filters = any(p.filters for p in params)
            tokens = draw(logits, self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seeds[:n],
                          self.counters[:n], filters=filters,
                          min_p=self.min_p[:n] if any(p.min_p for p in params) else None)
        self.counters[:n] += 1
        return tokens

    def record(self, tokens: torch.Tensor) -> None:
        """tokens: [n] the tokens rows [0, n) took (sampled, or a plan's suggestion): the penalties count them."""
        n = tokens.shape[0]
        if any(p.penalized for p in self._params[:n]):
            counts = self._vocab["counts"]
            rows = torch.arange(n, device=tokens.device)
            counts[rows, tokens] += 1
