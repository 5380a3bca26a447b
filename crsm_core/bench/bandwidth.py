"""What a decode step must move through memory, and what the device can move: the engine table's
"bandwidth used" column.

A step of B rows reads every weight once (the tied embedding as the LM head; an untied embedding only
at the B tokens' rows) and reads and writes each row's recurrent state. Divided by the step time (the
ITL p50), that is the bandwidth the step uses; the device's own is measured in the same run as a large
device-to-device copy, counted the same way (bytes read + bytes written per second).
"""
from __future__ import annotations

import time

import torch

from ..backbone.graphs import default_buckets
from ..backbone.model import MambaLM
from ..state import RecurrentState

COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}   # 1 GiB on a GPU (well past its caches), 64 MiB on the CPU


def step_bytes(model: MambaLM, rows: int) -> int:
    """Bytes a decode step of `rows` state rows reads and writes at the least (activations left out)."""
    embedding = model.backbone.embedding.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_embeddings:   # the lookup reads only the tokens' rows
        weights -= (embedding.shape[0] - rows) * embedding.shape[1] * embedding.element_size()
    return weights + 2 * rows * RecurrentState.bytes_per_row(model.config, model.dtype)


def rows_stepped(streams: int, max_sessions: int, device: torch.device) -> int:
    """The rows a decode step of `streams` sessions steps: on CUDA the captured graph's bucket
    (graphs.CapturedDecoder), elsewhere exactly the running rows."""
    if device.type != "cuda":
        return streams
    return next(b for b in default_buckets(max_sessions) if b >= streams)


def copy_bandwidth_gbs(device: torch.device, repeats: int = 10) -> float:
    """GB/s (1e9 bytes) read + written by a device-to-device copy of COPY_BYTES[device.type] bytes."""
    size = COPY_BYTES[device.type]
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)   # first touch, allocation
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        began = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - began
    return 2 * size * repeats / seconds / 1e9
