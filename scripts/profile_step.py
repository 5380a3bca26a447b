"""Where a decode step's GPU time goes: kernels per step and time per kernel class, per backbone and batch.

For each GPU backbone (`fused`: mamba_ssm's kernels and the torch convolution update, the "before";
`fused_step`: this project's step kernels, the "after") and batch size, the decode step is captured as
the engine captures it (`CapturedDecoder`), replayed back to back under torch.profiler, and the GPU
kernels of the trace are grouped into classes by name. Also the step time from CUDA events without
the profiler. The markdown it prints (and writes to --out) is meant for docs/benchmarks.md.

    python scripts/profile_step.py [--out DIR] [--batches 1 16 64] [--steps 50]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from crsm_core.backbone import GPU_IMPLS, build_backbone
from crsm_core.backbone.graphs import CapturedDecoder
from scripts.gpu_parity import BF16_CASE, _ms_per_call, environment, like

# (class, substrings of the kernel name), first match wins
KERNEL_CLASSES = (
    ("fused_step: norm + in_proj + conv (and norm_f + lm_head)", ("_rms_proj_kernel",)),
    ("fused_step: state update + gate", ("_ssm_kernel",)),
    ("fused_step: gated norm + out_proj + residual", ("_gated_proj_kernel",)),
    ("mamba_ssm: add + RMSNorm / gated RMSNorm", ("_layer_norm_fwd",)),
    ("mamba_ssm: selective_state_update", ("_selective_scan_update",)),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "gemv", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "splitk")),
    ("embedding / index", ("index", "embedding", "gather", "scatter")),
    ("torch copy / fill", ("copy", "fill", "cat")),
    ("torch elementwise / reduce", ("elementwise", "reduce", "roll", "where")),
)


def kernel_class(name: str, classes: tuple[tuple[str, tuple[str, ...]], ...] = KERNEL_CLASSES) -> str:
    """The label of the first class one of whose substrings the kernel's name holds."""
    lowered = name.lower()
    for label, needles in classes:
        if any(n.lower() in lowered for n in needles):
            return label
    return "other: " + name[:48]


@dataclass
class StepProfile:
    backbone: str
    batch: int
    step_ms: float                         # CUDA events over back-to-back replays, no profiler
    kernels_per_step: float
    gpu_us_per_step: float                 # sum of kernel durations
    classes: dict[str, tuple[float, float]]   # class -> (kernels per step, us per step)


@torch.inference_mode()
def profile_steps(decoder: CapturedDecoder, batch: int, steps: int) -> tuple[float, float, dict[str, tuple[float, float]]]:
    tokens = torch.randint(0, 1000, (batch,), device="cuda")
    for _ in range(3):
        decoder.step(tokens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(tokens)
        torch.cuda.synchronize()
    counts: dict[str, int] = defaultdict(int)
    times: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if "memcpy" in event.name.lower() or "memset" in event.name.lower():
            continue   # the tokens' copy into the static buffer, not the step
        label = kernel_class(event.name)
        counts[label] += 1
        times[label] += event.time_range.elapsed_us()
    total_kernels = sum(counts.values()) / steps
    total_us = sum(times.values()) / steps
    classes = {label: (counts[label] / steps, times[label] / steps)
               for label in sorted(times, key=lambda k: -times[k])}
    return total_kernels, total_us, classes


def measure(batches: tuple[int, ...], steps: int, impls: tuple[str, ...] = GPU_IMPLS) -> list[StepProfile]:
    torch.manual_seed(0)
    base = build_backbone(BF16_CASE.config, "cuda", torch.bfloat16, impl="fused")
    out = []
    for impl in impls:
        model = like(base, impl)
        decoder = CapturedDecoder(model, max_batch=max(batches))
        for batch in batches:
            tokens = torch.randint(0, 1000, (batch,), device="cuda")
            with torch.inference_mode():
                step_ms = _ms_per_call(lambda: decoder.step(tokens), iters=200)
            kernels, gpu_us, classes = profile_steps(decoder, batch, steps)
            if kernels == 0:
                raise RuntimeError("the profiler recorded no kernels of the graph replays (CUPTI graph tracing)")
            out.append(StepProfile(impl, batch, step_ms, kernels, gpu_us, classes))
        del model, decoder
        torch.cuda.empty_cache()
    return out


def to_markdown(env: dict[str, str], profiles: list[StepProfile]) -> str:
    lines = ["Device: " + env["device"] + "; " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"), "",
             "| backbone | batch | step (ms, graph replay) | kernels per step | kernel time per step (us) | "
             "between kernels (us) |", "| --- | --- | --- | --- | --- | --- |"]
    for p in profiles:
        lines.append(f"| {p.backbone} | {p.batch} | {p.step_ms:.3f} | {p.kernels_per_step:.0f} | {p.gpu_us_per_step:.1f} | "
                     f"{p.step_ms * 1e3 - p.gpu_us_per_step:.1f} |")
    for p in profiles:
        lines += ["", f"{p.backbone}, batch {p.batch}:", "", "| kernel class | kernels per step | us per step | share |",
                  "| --- | --- | --- | --- |"]
        for label, (count, us) in p.classes.items():
            lines.append(f"| {label} | {count:.0f} | {us:.1f} | {us / p.gpu_us_per_step:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/profile_step")))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    env = environment()
    profiles = measure(tuple(args.batches), args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_step.json").write_text(json.dumps({"environment": env, "profiles": [asdict(p) for p in profiles]},
                                                           indent=2) + "\n")
    markdown = to_markdown(env, profiles)
    (args.out / "profile_step.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
