"""Where a batched plan's time goes: the bench's "plans alone" (the planner worker, R sessions' roots in one
search, nothing else running) under torch.profiler, kernels grouped by class.

The bench measures plans alone at 16 sessions as 45 ms for 512 state-steps on an H200 (docs/benchmarks.md),
of which the backbone steps of its rounds are a fifth; this says what the rest is. On a GPU the classes
are the CUDA kernels of the plan (graph replays included), whichever thread launched them; with --quick
(tiny model, CPU) they are the calling thread's top-level CPU operators (the planner worker's own are
not recorded there), which checks that the script runs, nothing more.

    PYTHONPATH=. python scripts/profile_plan.py [--out DIR] [--roots 16] [--plans 3] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from crsm_core.bench.deliberation_bench import GREEDY
from crsm_core.bench.settings import BenchSettings
from crsm_core.bench.workload import Workload
from crsm_core.planner.runtime import PlanRequest, TokenLog
from crsm_core.streams import record_current
from scripts.profile_step import kernel_class

# (class, substrings of the kernel or operator name), first match wins
CLASSES = (
    ("backbone step (fused_step kernels)", ("_rms_proj_kernel", "_ssm_kernel", "_gated_proj_kernel")),
    ("backbone step (mamba_ssm / torch)", ("_layer_norm", "_selective_scan_update", "gemm", "gemv", "cutlass",
                                           "sm90_", "sm80_", "cublas", "aten::linear", "aten::addmm", "aten::mm")),
    ("tree kernels (select / backup)", ("_select_kernel", "_backup_kernel")),
    ("top-k / sort of candidates", ("topk", "sort", "radix")),
    ("state gather / scatter / copy", ("index", "gather", "scatter", "copy", "cat")),
    ("prefill (chunked scan)", ("chunk", "_state_passing", "_bmm", "conv")),
    ("fill / elementwise / reduce", ("fill", "elementwise", "reduce", "where", "aten::")),
)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/profile_plan")))
    parser.add_argument("--roots", type=int, default=16)
    parser.add_argument("--plans", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the bench's tiny model on the CPU")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    settings = BenchSettings(out=args.out, docs=None, quick=args.quick, device=device,
                             backbones=("reference",) if args.quick else ("fused_step",))
    workload = Workload(settings)
    model = workload.crsm_model()
    backbone = workload.backbone
    snapshots = []
    for prompt in workload.prompts(args.roots, salt=300):
        state = backbone.allocate_state(1)
        logits = backbone.prefill(torch.tensor([prompt], device=backbone.device), state)
        snapshots.append((state, logits, prompt))

    def plan_all() -> int:
        requests = [PlanRequest(i, model.config, state.clone(), logits.clone(), len(prompt), TokenLog(prompt),
                                GREEDY, 0, 0, 0, model.veto_threshold)
                    for i, (state, logits, prompt) in enumerate(snapshots)]
        for request in requests:
            request.ready = record_current(backbone.device)
        return sum(f.result().entry.planner_stats["state_steps"] for f in model.runtime.submit(requests))

    plan_all()   # captures the search's graphs and compiles its kernels
    gpu = device == "cuda"
    activities = [ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        steps = sum(plan_all() for _ in range(args.plans))
        if gpu:
            torch.cuda.synchronize()
    counts: dict[str, int] = defaultdict(int)
    times: dict[str, float] = defaultdict(float)
    for event in prof.events():
        on_gpu = event.device_type == torch.autograd.DeviceType.CUDA
        if on_gpu != gpu or (not gpu and event.cpu_parent is not None):   # on the CPU: top-level operators
            continue
        label = kernel_class(event.name, CLASSES)
        counts[label] += 1
        times[label] += event.time_range.elapsed_us()
    total = sum(times.values())
    rows = sorted(times, key=lambda k: -times[k])
    lines = [f"{args.roots} roots, {args.plans} plans, {steps / args.plans:.0f} state-steps per plan; "
             f"{'GPU kernel' if gpu else 'CPU operator'} time per plan {total / args.plans / 1e3:.2f} ms", "",
             "| class | count per plan | ms per plan | share |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {counts[k] / args.plans:.0f} | {times[k] / args.plans / 1e3:.3f} | {times[k] / total:.0%} |"
              for k in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_plan.md").write_text("\n".join(lines) + "\n")
    (args.out / "profile_plan.json").write_text(json.dumps(
        {"roots": args.roots, "plans": args.plans, "state_steps": steps, "device": device,
         "classes": {k: {"count": counts[k], "us": times[k]} for k in rows}}, indent=2) + "\n")
    print("\n".join(lines))
    model.close()


if __name__ == "__main__":
    main()
