"""Verifiable tasks: multi-digit addition and subtraction with an exact checker.

An example is `prompt + answer`, e.g. prompt "12+345=" and answer "357"; in training text each example
is one document ending in the end-of-text token, so a completion ends where the model emits it.
Train and held-out prompts are split by a hash of the prompt text, so the two sets never share a prompt
whatever sampler produced them.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

OPS = ("+", "-")
_PROMPT = re.compile(r"^(\d+)([+\-])(\d+)=$")
_ANSWER = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class TaskSpec:
    max_digits: int = 3
    ops: tuple[str, ...] = OPS
    heldout_percent: int = 10  # share of all prompts reserved for evaluation (by hash)

    def __post_init__(self) -> None:
        if not 1 <= self.max_digits <= 9:
            raise ValueError(f"max_digits must be in [1, 9], got {self.max_digits}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")
        if not 1 <= self.heldout_percent <= 50:
            raise ValueError(f"heldout_percent must be in [1, 50], got {self.heldout_percent}")


def answer(prompt: str) -> str:
    """The exact answer to a prompt "a+b=" / "a-b=". Raises ValueError on anything else."""
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"not a task prompt: {prompt!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return str(a + b if op == "+" else a - b)


def check(prompt: str, completion: str) -> bool:
    """True iff the completion (up to its first newline, surrounding spaces ignored) is the exact answer."""
    got = completion.split("\n", 1)[0].strip()
    return _ANSWER.match(got) is not None and got == answer(prompt)


def is_heldout(prompt: str, spec: TaskSpec) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < spec.heldout_percent


def _draw(rng: np.random.Generator, spec: TaskSpec, n: int) -> list[str]:
    """n random prompts (either side of the split), drawn in one vectorised pass."""
    # Digit counts uniform in [1, max_digits] so short and long problems are equally common.
    digits = rng.integers(1, spec.max_digits + 1, size=(2, n))
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    operands = (low + np.floor(rng.random((2, n)) * (10 ** digits - low))).astype(np.int64)
    ops = rng.integers(len(spec.ops), size=n)
    out = []
    for a, b, k in zip(operands[0].tolist(), operands[1].tolist(), ops.tolist()):
        op = spec.ops[k]
        if op == "-" and b > a:  # answers stay non-negative
            a, b = b, a
        out.append(f"{a}{op}{b}=")
    return out


def sample_prompts(rng: np.random.Generator, spec: TaskSpec, n: int, heldout: bool) -> list[str]:
    """n prompts from one side of the split (repeats possible)."""
    out: list[str] = []
    while len(out) < n:
        out.extend(p for p in _draw(rng, spec, 2 * (n - len(out)) + 8) if is_heldout(p, spec) == heldout)
    return out[:n]


def heldout_prompts(spec: TaskSpec, n: int, seed: int) -> list[str]:
    """A fixed list of n distinct held-out prompts (the same on every machine for the same seed)."""
    rng = np.random.default_rng([seed, 0x7E57])
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 1000 * n:
            raise ValueError(f"cannot draw {n} distinct held-out prompts with {spec}")
        prompt = _draw(rng, spec, 1)[0]
        if is_heldout(prompt, spec):
            seen.setdefault(prompt)
    return list(seen)
