"""Fused (mamba_ssm Triton kernels, eager and graph-captured) against the reference backbone on the GPU.

Same weights in both; the same prompt is prefilled and the same tokens are then fed for the decode
steps (teacher forcing, so a near-tie in the logits cannot make the two runs read different tokens).
Reported: relative errors ||a - b|| / ||b|| of the prefill logits, of the states after the prefill,
of the decode logits (all steps together, and the worst single step), of the final states, and the
top-1 agreement of the decode logits. In bf16 the reference itself is measured against an fp32 run
of the same (bf16-rounded) weights, which shows the size of bf16 noise the fused errors compare to.

    python scripts/gpu_parity.py [--out DIR]     # writes parity.json and parity.md (default: $OUT)

tests/gpu/test_fused.py runs the same measurements and asserts on them.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from crsm_core.backbone import MambaLM, build_backbone
from crsm_core.backbone.graphs import CapturedDecoder
from crsm_core.config import MambaConfig, SSMConfig
from crsm_core.state import RecurrentState


@dataclass(frozen=True)
class ParityCase:
    name: str
    config: MambaConfig
    dtype: torch.dtype
    batch: int
    prefill_len: int
    decode_steps: int
    split: int | None = None   # fused prefill in two calls at this position (continuation from a state)
    seed: int = 0


# The 129M model of the benchmarks (vocab 50277, padded to 50280) and a small fp32 one.
BF16_CASE = ParityCase("d768-L24-bf16", MambaConfig(d_model=768, n_layer=24, vocab_size=50277),
                       torch.bfloat16, batch=3, prefill_len=512, decode_steps=256)
FP32_CASE = ParityCase("d128-L4-fp32", MambaConfig(d_model=128, n_layer=4, vocab_size=1000,
                                                    ssm_cfg=SSMConfig(d_state=64, headdim=32, chunk_size=64)),
                       torch.float32, batch=2, prefill_len=200, decode_steps=64, split=77)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all entries, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@dataclass
class Run:
    prefill_logits: torch.Tensor   # [B, T, V] fp32
    prefill_state: RecurrentState
    decode_logits: torch.Tensor    # [B, S, V] fp32
    final_state: RecurrentState


@torch.inference_mode()
def decode_steps(model: MambaLM, state: RecurrentState, decode: torch.Tensor,
                 decoder: CapturedDecoder | None = None) -> tuple[torch.Tensor, RecurrentState]:
    """Feeds decode: [B, S] one token per step from state (left as it was). With a decoder, the steps
    are its (graph-replayed) steps over its pool's rows [0:B]. Returns logits [B, S, V] fp32 and the
    final state."""
    if decoder is not None:
        rows = decoder.pool.rows(slice(0, decode.shape[0]))
        rows.copy_(state)
    else:
        rows = state.clone()
    logits = []
    for t in range(decode.shape[1]):
        out = decoder.step(decode[:, t]) if decoder is not None else model.step(decode[:, t], rows)
        logits.append(out.to(torch.float32, copy=True))   # a decoder's output buffer is reused
    return torch.stack(logits, 1), rows.clone()


@torch.inference_mode()
def run(model: MambaLM, prompt: torch.Tensor, decode: torch.Tensor, split: int | None = None,
        decoder: CapturedDecoder | None = None) -> Run:
    """Prefill prompt: [B, T] (in two calls when split is given), then the decode steps."""
    state = model.allocate_state(prompt.shape[0])
    if split is None:
        prefill_logits = model(prompt, state).float()
    else:
        prefill_logits = torch.cat([model(prompt[:, :split], state), model(prompt[:, split:], state)], 1).float()
    decode_logits, final_state = decode_steps(model, state, decode, decoder)
    return Run(prefill_logits, state, decode_logits, final_state)


def compare(a: Run, b: Run) -> dict[str, float]:
    """Errors of run a against run b."""
    per_step = [rel_err(a.decode_logits[:, t], b.decode_logits[:, t]) for t in range(b.decode_logits.shape[1])]
    top1 = (a.decode_logits.argmax(-1) == b.decode_logits.argmax(-1)).float().mean().item()
    return {
        "prefill_logits": rel_err(a.prefill_logits, b.prefill_logits),
        "prefill_conv": rel_err(a.prefill_state.conv, b.prefill_state.conv),
        "prefill_ssm": rel_err(a.prefill_state.ssm, b.prefill_state.ssm),
        "decode_logits": rel_err(a.decode_logits, b.decode_logits),
        "decode_logits_worst_step": max(per_step),
        "final_conv": rel_err(a.final_state.conv, b.final_state.conv),
        "final_ssm": rel_err(a.final_state.ssm, b.final_state.ssm),
        "decode_top1_agreement": top1,
    }


def compare_steps(model: MambaLM, reference: MambaLM, decode: torch.Tensor,
                  decoder: CapturedDecoder | None = None) -> dict[str, float]:
    """Decode steps alone, from zero states (no chunked scan involved)."""
    logits, final = decode_steps(model, model.allocate_state(decode.shape[0]), decode, decoder)
    want_logits, want_final = decode_steps(reference, reference.allocate_state(decode.shape[0]), decode)
    return {"decode_logits": rel_err(logits, want_logits),
            "final_conv": rel_err(final.conv, want_final.conv),
            "final_ssm": rel_err(final.ssm, want_final.ssm)}


def measure(case: ParityCase, device: str = "cuda") -> dict[str, dict[str, float]]:
    """{comparison name: errors} for one case."""
    torch.manual_seed(case.seed)
    reference = build_backbone(case.config, device, case.dtype, impl="reference")
    fused = build_backbone(case.config, device, case.dtype, impl="fused")
    fused.load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(case.seed + 1)
    vocab = case.config.vocab_size
    prompt = torch.randint(0, vocab, (case.batch, case.prefill_len), generator=gen).to(device)
    decode = torch.randint(0, vocab, (case.batch, case.decode_steps), generator=gen).to(device)
    # A max_batch above the case's batch makes the graph run a padded bucket (batch 3 -> bucket 4).
    decoder = CapturedDecoder(fused, max_batch=max(4, case.batch + 1))

    want = run(reference, prompt, decode)
    results = {
        "fused_eager_vs_reference": compare(run(fused, prompt, decode, case.split), want),
        "fused_graph_vs_reference": compare(run(fused, prompt, decode, case.split, decoder), want),
    }
    if case.dtype == torch.float32:
        results["fused_graph_steps_only_vs_reference"] = compare_steps(fused, reference, decode, decoder)
    else:
        # The same bf16-rounded weights run in fp32: how far bf16 arithmetic itself moves the outputs.
        exact = copy.deepcopy(reference).float()
        truth = run(exact, prompt, decode)
        results["reference_vs_fp32"] = compare(want, truth)
        results["fused_graph_vs_fp32"] = compare(run(fused, prompt, decode, case.split, decoder), truth)
    return results


def _ms_per_call(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@torch.inference_mode()
def time_steps(config: MambaConfig = BF16_CASE.config, batches: tuple[int, ...] = (1, 16, 64),
               dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> list[dict[str, float]]:
    """ms per decode step (GPU time, back to back, no host sync per step) for each batch size."""
    torch.manual_seed(0)
    reference = build_backbone(config, device, dtype, impl="reference")
    fused = build_backbone(config, device, dtype, impl="fused")
    fused.load_state_dict(reference.state_dict())
    decoder = CapturedDecoder(fused, max_batch=max(batches))
    rows = []
    for batch in batches:
        tokens = torch.randint(0, config.vocab_size, (batch,), device=device)
        state = decoder.pool.rows(slice(0, batch))
        row = {"batch": batch,
               "reference_eager_ms": _ms_per_call(lambda: reference.step(tokens, state), iters=20),
               "fused_eager_ms": _ms_per_call(lambda: fused.step(tokens, state), iters=20),
               "fused_graph_ms": _ms_per_call(lambda: decoder.step(tokens), iters=200)}
        row["graph_tokens_per_s"] = batch * 1000.0 / row["fused_graph_ms"]
        rows.append(row)
    return rows


def environment() -> dict[str, str]:
    """Device, versions and commit, for the record."""
    from crsm_core.backbone import fused

    commit = os.environ.get("CRSM_COMMIT")
    if commit is None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": importlib.metadata.version("triton"),
        "mamba_ssm": importlib.metadata.version("mamba-ssm"),
        "causal_conv1d": "yes" if fused.HAVE_CAUSAL_CONV1D else "no (torch conv)",
        "python": platform.python_version(),
        "commit": commit or "unknown",
    }


def to_markdown(env: dict[str, str], cases: dict[str, dict[str, dict[str, float]]],
                timings: list[dict[str, float]] | None = None) -> str:
    lines = ["Device: " + env["device"] + "; " +
             ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"), ""]
    cols = ["prefill_logits", "prefill_conv", "prefill_ssm", "decode_logits", "decode_logits_worst_step",
            "final_conv", "final_ssm", "decode_top1_agreement"]
    lines.append("| case | comparison | " + " | ".join(cols) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in cols) + " |")
    for case, comparisons in cases.items():
        for name, errs in comparisons.items():
            cells = ["-" if c not in errs else f"{errs[c]:.4f}" if c == "decode_top1_agreement"
                     else f"{errs[c]:.2e}" for c in cols]
            lines.append(f"| {case} | {name} | " + " | ".join(cells) + " |")
    if timings:
        lines += ["", "| batch | reference eager ms/step | fused eager ms/step | fused graph ms/step | graph tokens/s |",
                  "| --- | --- | --- | --- | --- |"]
        for row in timings:
            lines.append(f"| {row['batch']} | {row['reference_eager_ms']:.2f} | {row['fused_eager_ms']:.2f} | "
                         f"{row['fused_graph_ms']:.3f} | {row['graph_tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, name: str, payload: dict) -> None:
    """`<name>.json` (everything) and `<name>.md` (the tables) under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(to_markdown(payload["environment"], payload["cases"], payload.get("timings")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_parity")))
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    payload = {"environment": environment(),
               "cases": {case.name: measure(case) for case in (BF16_CASE, FP32_CASE)},
               "case_settings": {c.name: {k: str(v) for k, v in dataclasses.asdict(c).items() if k != "config"}
                                 for c in (BF16_CASE, FP32_CASE)}}
    if not args.no_timing:
        payload["timings"] = time_steps()
    write_results(args.out, "parity", payload)
    print(to_markdown(payload["environment"], payload["cases"], payload.get("timings")))


if __name__ == "__main__":
    main()
