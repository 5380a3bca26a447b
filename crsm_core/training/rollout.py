"""Completions of many prompts through the serving engine, and teacher-forced replay of finished ones.

`generate` submits every prompt to an `Engine` (the server's generation loop, batched and
continuously refilled), so training rollouts, evaluation and serving share one loop. Each row draws
with its own seed (seed * 1_000_003 + row), so a call is reproducible.

Positions follow the project's convention: S_t is the state after t tokens; the step that consumes
token t gives the distribution of token t+1.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..backbone import MambaLM
from ..state import RecurrentState
from ..tasks import check

# (state after the step, rows [R] long) -> None
StateHook = Callable[[RecurrentState, torch.Tensor], None]


@dataclass
class Rollouts:
    completions: list[list[int]]  # generated ids per row, the end-of-text token excluded
    ended: list[bool]             # True: the row emitted end-of-text; False: it hit max_new_tokens


def generate(model: MambaLM, prompts: list[list[int]], max_new_tokens: int | Sequence[int], temperature: float,
             eos_id: int, seed: int = 0, max_sessions: int = 64) -> Rollouts:
    """Complete every prompt (temperature 0 = greedy) through an Engine of `max_sessions` slots, each in at
    most max_new_tokens tokens (one budget for all, or one per prompt)."""
    from ..engine import Engine, EngineConfig, GenerationRequest
    from ..sampling import SamplingParams
    from ..tokenizer import ByteTokenizer

    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(b < 0 for b in budgets):
        raise ValueError("one non-negative token budget per prompt")
    tokenizer = ByteTokenizer()
    if tokenizer.eos_id != eos_id:
        raise ValueError(f"rollouts use the byte tokenizer, whose end-of-text is {tokenizer.eos_id}, not {eos_id}")

    async def run() -> list[list[int]]:
        todo = [i for i, b in enumerate(budgets) if b > 0]
        engine = Engine(model, tokenizer, EngineConfig(max_sessions=max(1, min(max_sessions, len(todo))),
                                                       queue_size=max(1, len(todo)),
                                                       max_request_sessions=max(1, len(todo)),
                                                       queue_timeout_s=math.inf, max_prompt_tokens=1 << 20,
                                                       max_new_tokens=max([1, *budgets]), planner_mode="stream"))
        engine.start()
        try:
            sessions = engine.submit_all([
                GenerationRequest(tuple(prompts[i]), budgets[i], SamplingParams(temperature=temperature,
                                                                                 seed=seed * 1_000_003 + i))
                for i in todo])
            done = {i: (await s.collect()).token_ids for i, s in zip(todo, sessions)}
            return [done.get(i, []) for i in range(len(prompts))]
        finally:
            await engine.shutdown()

    outputs = asyncio.run(run())
    ended = [bool(o) and o[-1] == eos_id for o in outputs]
    return Rollouts([o[:-1] if e else o for o, e in zip(outputs, ended)], ended)


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
