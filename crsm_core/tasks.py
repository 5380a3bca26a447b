"""Verifiable task families: prompts, their canonical answers, and exact checkers.

- "arithmetic": `12+345=` -> `357` (a+b and a-b, operands of 1 to max_digits digits, answers >= 0).
- "subset": `pick 3,8,5,11,23 sum 16:` -> `5+11`: some of the numbers (each at most once) whose sum is
  the target. Checking an answer is adding two or three numbers; finding one is a search over subsets,
  which a small model gets wrong often: the family the planner has room on. Any right subset passes the
  checker; training shows the one the prompt was made from, in ascending order.

An example is `prompt + answer`, one document ending in the end-of-text token in training text, so a
completion ends where the model emits it. Train and held-out prompts are split by a hash of the prompt
text, so the two sets never share a prompt whatever sampler produced them.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

import numpy as np

OPS = ("+", "-")
FAMILIES = ("arithmetic", "subset")
_ARITHMETIC = re.compile(r"^(\d+)([+\-])(\d+)=$")
_SUBSET = re.compile(r"^pick ([\d,]+) sum (\d+):$")
_NUMBER = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class TaskSpec:
    max_digits: int = 3
    ops: tuple[str, ...] = OPS
    heldout_percent: int = 10  # share of all prompts reserved for evaluation (by hash)
    families: tuple[str, ...] = ("arithmetic",)
    subset_numbers: int = 6    # numbers offered by a subset prompt
    subset_max: int = 40       # they are distinct, in [1, subset_max]
    subset_sizes: tuple[int, ...] = (2, 3)   # sizes of the subset a prompt is made from

    def __post_init__(self) -> None:
        if not 1 <= self.max_digits <= 9:
            raise ValueError(f"max_digits must be in [1, 9], got {self.max_digits}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")
        if not 1 <= self.heldout_percent <= 50:
            raise ValueError(f"heldout_percent must be in [1, 50], got {self.heldout_percent}")
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families}")
        if not 2 <= self.subset_numbers <= self.subset_max or self.subset_max > 999:
            raise ValueError("subset_numbers must be in [2, subset_max] and subset_max at most 999")
        if not self.subset_sizes or any(not 1 <= k <= self.subset_numbers for k in self.subset_sizes):
            raise ValueError(f"subset_sizes must be in [1, subset_numbers], got {self.subset_sizes}")


def family_of(prompt: str) -> str:
    if _ARITHMETIC.match(prompt):
        return "arithmetic"
    if _SUBSET.match(prompt):
        return "subset"
    raise ValueError(f"not a task prompt: {prompt!r}")


def subset_problem(prompt: str) -> tuple[list[int], int]:
    """The numbers and the target of a subset prompt."""
    match = _SUBSET.match(prompt)
    if match is None:
        raise ValueError(f"not a subset prompt: {prompt!r}")
    return [int(x) for x in match.group(1).split(",")], int(match.group(2))


def answer(prompt: str) -> str:
    """The canonical answer to a prompt. Raises ValueError on anything else. A subset prompt's canonical
    answer is its shortest right subset (the first in lexicographic order), in ascending order."""
    match = _ARITHMETIC.match(prompt)
    if match is not None:
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        return str(a + b if op == "+" else a - b)
    numbers, target = subset_problem(prompt)
    for size in range(1, len(numbers) + 1):
        for chosen in itertools.combinations(sorted(numbers), size):
            if sum(chosen) == target:
                return "+".join(map(str, chosen))
    raise ValueError(f"no subset of {numbers} sums to {target}")


def check_subset(numbers: list[int], target: int, text: str) -> bool:
    """text is "a+b+..." with each term one of the numbers (each used at most once) and the sum target."""
    terms = text.split("+")
    if not all(t.isdigit() and (t == "0" or not t.startswith("0")) for t in terms):
        return False
    left = list(numbers)
    for t in map(int, terms):
        if t not in left:
            return False
        left.remove(t)
    return sum(map(int, terms)) == target


def check(prompt: str, completion: str) -> bool:
    """True iff the completion (up to its first newline, surrounding spaces ignored) answers the prompt."""
    got = completion.split("\n", 1)[0].strip()
    if family_of(prompt) == "arithmetic":
        return _NUMBER.match(got) is not None and got == answer(prompt)
    numbers, target = subset_problem(prompt)
    return check_subset(numbers, target, got)


def is_heldout(prompt: str, spec: TaskSpec) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < spec.heldout_percent


def _draw_arithmetic(rng: np.random.Generator, spec: TaskSpec, n: int) -> list[str]:
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


def _draw_subset(rng: np.random.Generator, spec: TaskSpec, n: int) -> list[str]:
    out = []
    while len(out) < n:
        numbers = (rng.permutation(spec.subset_max)[:spec.subset_numbers] + 1).tolist()
        size = int(spec.subset_sizes[rng.integers(len(spec.subset_sizes))])
        target = sum(numbers[:size])   # the first `size` of a random order: a random subset
        if size > 1 and target in numbers:   # the answer would be the target itself
            continue
        out.append(f"pick {','.join(map(str, numbers))} sum {target}:")
    return out


def subset_consistent(numbers: list[int], target: int, text: str) -> bool:
    """Whether `text`, the start of an answer to a subset prompt, can still be completed to a right one
    as far as its own terms go: terms from the numbers, each used once, a partial last term that begins
    one of the numbers left, and a sum not past the target. (Whether a completion exists is the task
    itself, which this does not decide.)"""
    if any(c not in "0123456789+" for c in text):
        return False
    *done, last = text.split("+")
    left = list(numbers)
    for term in done:
        if not term.isdigit() or (term.startswith("0") and term != "0") or int(term) not in left:
            return False
        left.remove(int(term))
    total = sum(map(int, done))
    if last == "":
        return total < target or not done
    return any(str(x).startswith(last) and total + x <= target for x in left)


_DRAW = {"arithmetic": _draw_arithmetic, "subset": _draw_subset}


def _draw(rng: np.random.Generator, spec: TaskSpec, n: int, family: str | None = None) -> list[str]:
    """n random prompts (either side of the split): of `family`, or of the spec's families in turn at
    random, drawn in one pass."""
    if family is not None:
        return _DRAW[family](rng, spec, n)
    choice = rng.integers(len(spec.families), size=n)
    per = {f: iter(_DRAW[f](rng, spec, int((choice == i).sum()))) for i, f in enumerate(spec.families)}
    return [next(per[spec.families[c]]) for c in choice.tolist()]


def sample_prompts(rng: np.random.Generator, spec: TaskSpec, n: int, heldout: bool,
                   family: str | None = None) -> list[str]:
    """n prompts from one side of the split (repeats possible)."""
    out: list[str] = []
    while len(out) < n:
        out.extend(p for p in _draw(rng, spec, 2 * (n - len(out)) + 8, family) if is_heldout(p, spec) == heldout)
    return out[:n]


def heldout_prompts(spec: TaskSpec, n: int, seed: int, family: str | None = None) -> list[str]:
    """A fixed list of n distinct held-out prompts (of `family`, or of the spec's first family) — the
    same on every machine for the same seed."""
    family = family or spec.families[0]
    rng = np.random.default_rng([seed, 0x7E57, FAMILIES.index(family)] if family != "arithmetic" else [seed, 0x7E57])
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 1000 * n:
            raise ValueError(f"cannot draw {n} distinct held-out prompts with {spec}")
        prompt = _draw(rng, spec, 1, family)[0]
        if is_heldout(prompt, spec):
            seen.setdefault(prompt)
    return list(seen)
