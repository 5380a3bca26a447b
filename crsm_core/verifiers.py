"""Verifiers a request may name (`deliberation.verifier`): checkers of the task families the server
ships, as the planner's value function.

A verifier sees, for each root of a search, the tokens before it (prompt, generated, speculated) and,
for each node, the tokens read from the root to it; it returns the probability that the answer being
written is right: 1 or 0 for a checker. It computes differently from the model (it does not read the
state), which is why it can tell the model's right and wrong continuations apart where the model's own
value heads cannot (deliberation-forensics: "checking a digit is the same computation as producing
it").

- "arithmetic": the answer to the last `a+b=` / `a-b=` of the text, checked on the prefix: a node is
  1 while the digits written so far begin the right answer (and, at end-of-text, are all of it), else 0.
  This checker knows the answer: it is the ceiling of what search can do on this family (checking a
  sum is computing it), not a fair comparison.
- "subset": the answer to the last `pick ... sum N:`: at end-of-text (or a newline) the exact checker,
  1 or 0; before it, 0 for a prefix that cannot be right whatever follows (a term not among the numbers
  or used twice, a sum past the target), else 0.5: the checker checks, it does not search for a
  subset.
"""
from __future__ import annotations

import re

import torch

from . import tasks
from .planner.runtime import Verifier
from .planner.search import ValueFn
from .state import RecurrentState
from .tokenizer import Tokenizer

_LAST_PROBLEM = re.compile(r"(\d+)([+\-])(\d+)=([0-9\-]*)$")
_LAST_SUBSET = re.compile(r"pick ([\d,]+) sum (\d+):([0-9+]*)$")


def _answer_so_far(text: str) -> tuple[str, str] | None:
    """The right answer to the problem the text ends in, and what is written of it, or None."""
    found = _LAST_PROBLEM.search(text)
    if found is None:
        return None
    a, op, b, written = int(found.group(1)), found.group(2), int(found.group(3)), found.group(4)
    return str(a + b if op == "+" else a - b), written


def arithmetic(tokenizer: Tokenizer) -> Verifier:
    """The prefix checker of the arithmetic task family."""
    eos = tokenizer.eos_id

    def for_batch(contexts: list[list[int]]) -> ValueFn:
        roots = [_answer_so_far(tokenizer.decode(c)) for c in contexts]

        def value(states: RecurrentState, root: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            out = []
            for r, path in zip(root.tolist(), tokens.tolist()):
                problem = roots[r]
                if problem is None:          # not answering a problem: no opinion
                    out.append(0.5)
                    continue
                answer, written = problem
                read = [t for t in path if t >= 0]
                ended = eos in read
                text = written + tokenizer.decode(read[:read.index(eos)] if ended else read)
                right = text == answer if ended else answer.startswith(text)
                out.append(1.0 if right else 0.0)
            return torch.tensor(out, dtype=torch.float32, device=states.ssm.device).unsqueeze(1)

        return value

    return for_batch


def subset(tokenizer: Tokenizer) -> Verifier:
    """The checker of the subset family (exact at the end, consistency of the terms before it)."""
    eos = tokenizer.eos_id

    def for_batch(contexts: list[list[int]]) -> ValueFn:
        roots = []
        for c in contexts:
            found = _LAST_SUBSET.search(tokenizer.decode(c))
            roots.append(None if found is None else
                         ([int(x) for x in found.group(1).split(",")], int(found.group(2)), found.group(3)))

        def value(states: RecurrentState, root: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            out = []
            for r, path in zip(root.tolist(), tokens.tolist()):
                if roots[r] is None:
                    out.append(0.5)
                    continue
                numbers, target, written = roots[r]
                read = [t for t in path if t >= 0]
                ended = eos in read
                text = written + tokenizer.decode(read[:read.index(eos)] if ended else read)
                if "\n" in text:
                    text, ended = text.split("\n", 1)[0], True
                if ended:
                    out.append(1.0 if tasks.check_subset(numbers, target, text) else 0.0)
                else:
                    out.append(0.5 if tasks.subset_consistent(numbers, target, text) else 0.0)
            return torch.tensor(out, dtype=torch.float32, device=states.ssm.device).unsqueeze(1)

        return value

    return for_batch


def shipped(tokenizer: Tokenizer) -> dict[str, Verifier]:
    """The verifiers of the task families this project trains its models on."""
    return {"arithmetic": arithmetic(tokenizer), "subset": subset(tokenizer)}
