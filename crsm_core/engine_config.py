"""The engine's settings. No torch here: the command line reads these declarations (names, types,
defaults, the docstrings under each field) to build `crsm serve`'s flags without loading the model code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# Where planner work runs (planner/runtime.py): "stream" = its own thread and, on a GPU, its own
# lower-priority CUDA stream and graphs; "ride" = planner rows ride inside the generator's own batched
# decode step.
PlannerMode = Literal["stream", "ride"]
PLANNER_MODES: tuple[PlannerMode, ...] = get_args(PlannerMode)
PlannerModeSetting = Literal["auto", "stream", "ride"]


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 64
    """sessions decoded together (slot pool rows)"""
    queue_size: int = 256
    """sessions allowed to wait for a slot (beyond them: queue full, 429)"""
    max_request_sessions: int = 16
    """sessions one request may start (n x prompts); a request asking for more, or for more than the
    queue holds, is refused (400): it could never be served whole"""
    queue_timeout_s: float = 30.0
    """a session that has not taken a slot this many seconds after it was submitted ends with an error
    (503 queue_timeout with Retry-After); inf: no deadline"""
    prefill_chunk: int = 256
    """prompt tokens prefilled per iteration, between two decode steps"""
    max_prompt_tokens: int = 4096
    """the longest prompt a request may send"""
    max_new_tokens: int = 1024
    """the largest max_tokens a request may ask for"""
    retry_after_s: int = 1
    """the Retry-After of a refusal for a full queue or while loading"""
    planner_mode: PlannerModeSetting = "auto"
    """planner work on its own (low-priority) stream, or riding in the decode step; auto: ride on a GPU,
    stream on the CPU (planner/runtime.py resolve_planner_mode says why)"""
    ride_rows: int = 16
    """ride mode: planner rows one decode step carries at most"""

    def __post_init__(self) -> None:
        if self.planner_mode not in get_args(PlannerModeSetting):
            raise ValueError(f"planner_mode must be one of {get_args(PlannerModeSetting)}, got {self.planner_mode!r}")
        for name in ("max_sessions", "prefill_chunk", "max_prompt_tokens", "max_new_tokens", "retry_after_s",
                     "ride_rows", "max_request_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if not self.queue_timeout_s > 0:
            raise ValueError(f"queue_timeout_s must be > 0, got {self.queue_timeout_s}")
