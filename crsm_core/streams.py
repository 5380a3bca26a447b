"""CUDA streams and events for the generator and the planner, as no-ops off the GPU.

The generator runs on a high-priority stream and the planners on a low-priority one, so that when
both have kernels ready the GPU's block scheduler serves the generator first. Work crosses between
them only through events (`Lane.record` on one side, `wait` on the other) and every tensor made on
one stream and used on the other is marked with `hand_over`, so the caching allocator does not reuse
its memory while the other stream may still read it. On the CPU there are no streams: every call here
does nothing, and the same code runs in order.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch

from .state import RecurrentState

Priority = Literal["high", "low"]


class Lane:
    """A stream of one priority on a CUDA device, or nothing on the CPU."""

    def __init__(self, device: torch.device | str, priority: Priority):
        device = torch.device(device)
        self.stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            low, high = torch.cuda.Stream.priority_range()   # (least, greatest): greatest is the most urgent
            self.stream = torch.cuda.Stream(device=device, priority=high if priority == "high" else low)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this lane the current stream of the calling thread (for everything run inside)."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def record(self) -> torch.cuda.Event | None:
        """An event after everything queued on this lane so far (None on the CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


def record_current(device: torch.device) -> torch.cuda.Event | None:
    """An event after the work queued so far on the calling thread's current stream (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def wait(event: torch.cuda.Event | None) -> None:
    """Make the current stream wait (on the GPU, not the host) for an event of another stream."""
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def hand_over(*tensors: torch.Tensor | RecurrentState) -> None:
    """Mark tensors made on another stream as used on the current one (no-op on the CPU)."""
    for t in tensors:
        if isinstance(t, RecurrentState):
            hand_over(t.conv, t.ssm)
        elif t.is_cuda:
            t.record_stream(torch.cuda.current_stream(t.device))
