"""Batched completion of many short prompts, and teacher-forced replay of finished rollouts.

Rows advance in lockstep from the zero state, one token per step: a row reads its prompt while it has
prompt left, then its own samples. Prompts of different lengths therefore need no padding and no
per-length prefill groups; task prompts are a dozen tokens, so stepping them costs little.

Positions follow the project's convention: S_t is the state after t tokens; the step that consumes
token t gives the distribution of token t+1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..backbone import MambaLM
from ..state import RecurrentState
from .tasks import check

# (state after the step, rows [R] long) -> None
StateHook = Callable[[RecurrentState, torch.Tensor], None]


@dataclass
class Rollouts:
    completions: list[list[int]]  # generated ids per row, the end-of-text token excluded
    ended: list[bool]             # True: the row emitted end-of-text; False: it hit max_new_tokens
    logprob: torch.Tensor         # [R] sum of the model's log-probabilities of the chosen tokens (eos included)
    steps: int                    # lockstep decode steps taken (each one batched backbone step)


@torch.no_grad()
def generate(model: MambaLM, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             eos_id: int, generator: torch.Generator | None = None, on_end: StateHook | None = None) -> Rollouts:
    """Complete every prompt. temperature 0 = greedy. on_end(state, rows) sees each row's state right
    after it has consumed its whole completion (before end-of-text), e.g. for a verifier score."""
    device = model.device
    n = len(prompts)
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    state = model.allocate_state(n)
    completions: list[list[int]] = [[] for _ in range(n)]
    ended = [False] * n
    done = [False] * n
    logprob = torch.zeros(n, dtype=torch.float64)
    steps = 0
    for t in range(max(lengths) + max_new_tokens):
        inputs = [prompts[i][t] if t < lengths[i] else (completions[i][-1] if completions[i] else eos_id)
                  for i in range(n)]
        logits = model.step(torch.tensor(inputs, device=device), state).float()  # [n, V]
        steps += 1
        deciding = [i for i in range(n) if not done[i] and t >= lengths[i] - 1]
        if not deciding:
            continue
        finished = [i for i in deciding if len(completions[i]) == max_new_tokens]
        choose = [i for i in deciding if len(completions[i]) < max_new_tokens]
        if choose:
            idx = torch.tensor(choose, device=device)
            row_logits = logits.index_select(0, idx)
            if temperature == 0:
                tokens = row_logits.argmax(dim=-1)
            else:
                probs = torch.softmax(row_logits / temperature, dim=-1)
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            logp = torch.log_softmax(row_logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
            for i, tok, lp in zip(choose, tokens.tolist(), logp.double().cpu().tolist()):
                logprob[i] += lp
                if tok == eos_id:
                    ended[i] = True
                    finished.append(i)
                else:
                    completions[i].append(tok)
        for i in finished:
            done[i] = True
        if finished and on_end is not None:
            on_end(state, torch.tensor(sorted(finished), device=device))
        if all(done):
            break
    return Rollouts(completions, ended, logprob, steps)


def replay(model: MambaLM, prompts: list[list[int]], completions: list[list[int]], on_state: StateHook,
           pad_id: int) -> None:
    """Teacher-forced lockstep replay of prompt + completion for every row; on_state(state, rows) is called
    with the states S_t for t = len(prompt) .. len(prompt) + len(completion), i.e. at the end of the prompt
    and after each completion token, the states a rollout's outcome is credited to. The backbone runs without
    gradients; on_state may build a graph (e.g. a value-head loss) on copies of the rows it reads."""
    device = model.device
    seqs = [p + c for p, c in zip(prompts, completions)]
    starts = [len(p) for p in prompts]
    ends = [len(s) for s in seqs]
    state = model.allocate_state(len(seqs))
    for t in range(max(ends)):
        inputs = [s[t] if t < len(s) else pad_id for s in seqs]
        with torch.no_grad():
            model.step(torch.tensor(inputs, device=device), state)
        # state is now S_{t+1}
        rows = [i for i in range(len(seqs)) if starts[i] <= t + 1 <= ends[i]]
        if rows:
            on_state(state, torch.tensor(rows, device=device))


def successes(prompts: list[str], rollouts: Rollouts, decode: Callable[[list[int]], str]) -> list[bool]:
    """The task checker applied to each row's completion."""
    return [check(p, decode(c)) for p, c in zip(prompts, rollouts.completions)]
