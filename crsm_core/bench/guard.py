"""The one place where a benchmark failure is caught: a section (or one baseline backend) that raises
is logged with its traceback and recorded as failed with its message; the run goes on."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Guarded(Generic[T]):
    value: T | None
    error: str | None      # "ExceptionType: message" when fn raised
    elapsed_s: float


def describe(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": ")


def run_guarded(label: str, fn: Callable[[], T]) -> Guarded[T]:
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as e:  # the per-section guard: one failing part must not lose the rest of the run
        log.exception("%s failed; recording the failure and going on", label)
        return Guarded(None, describe(e), time.perf_counter() - start)
    return Guarded(value, None, time.perf_counter() - start)
