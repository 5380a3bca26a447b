"""The GPU backbones (`fused`: mamba_ssm's Triton kernels; `fused_step`: its prefill and this project's
decode-step kernels), eager and graph-captured, against the reference backbone on the GPU.

Same weights in all; the same prompt is prefilled and the same tokens are then fed for the decode
steps (teacher forcing, so a near-tie in the logits cannot make the two runs read different tokens).
Reported: relative errors ||a - b|| / ||b|| of the prefill logits, of the states after the prefill,
of the decode logits (all steps together, and the worst single step), of the final states, and the
top-1 agreement of the decode logits. In bf16 the reference itself is measured against an fp32 run
of the same (bf16-rounded) weights, which shows the size of bf16 noise the fused errors compare to.

Step cases (`STEP_CASES`): the decode step alone from a state the reference prefilled (the same start
for both): in place (`step`) at batch 1, 16 and 64 (the kernels' tile sizes; bf16 at 1, 16), captured
(`CapturedDecoder`, the engine's path) at 1 and 16, and by row index (`step_rows` over a pool of
2B + 1 rows, eager and captured, the planner's path) at 16, the rows the batch does not use checked
untouched; fp32 over 256 steps, bf16 over 128 (see `StepCase`).

    python scripts/gpu_parity.py [--out DIR]     # writes parity.json and parity.md (default: $OUT)
    python scripts/gpu_parity.py --timing-only   # the step timings alone (the tests make the rest)

tests/gpu/test_fused.py and tests/gpu/test_step_kernels_gpu.py run the same measurements and assert on them.
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from crsm_core.backbone import GPU_IMPLS, MambaLM, build_backbone
from crsm_core.backbone.graphs import CapturedDecoder, _warm_up
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


def like(reference: MambaLM, impl: str) -> MambaLM:
    """A backbone of `impl` holding the reference's weights."""
    model = build_backbone(reference.config, reference.device, reference.dtype, impl=impl)
    model.load_state_dict(reference.state_dict())
    return model


def measure(case: ParityCase, device: str = "cuda", impls: tuple[str, ...] = GPU_IMPLS) -> dict[str, dict[str, float]]:
    """{comparison name: errors} for one case, `<impl>_...` for each GPU impl."""
    torch.manual_seed(case.seed)
    reference = build_backbone(case.config, device, case.dtype, impl="reference")
    gen = torch.Generator().manual_seed(case.seed + 1)
    vocab = case.config.vocab_size
    prompt = torch.randint(0, vocab, (case.batch, case.prefill_len), generator=gen).to(device)
    decode = torch.randint(0, vocab, (case.batch, case.decode_steps), generator=gen).to(device)
    want = run(reference, prompt, decode)
    results = {}
    if case.dtype != torch.float32:
        # The same bf16-rounded weights run in fp32: how far bf16 arithmetic itself moves the outputs.
        truth = run(copy.deepcopy(reference).float(), prompt, decode)
        results["reference_vs_fp32"] = compare(want, truth)
    for impl in impls:
        model = like(reference, impl)
        # A max_batch above the case's batch makes the graph run a padded bucket (batch 3 -> bucket 4).
        decoder = CapturedDecoder(model, max_batch=max(4, case.batch + 1))
        results[f"{impl}_eager_vs_reference"] = compare(run(model, prompt, decode, case.split), want)
        graphed = run(model, prompt, decode, case.split, decoder)
        results[f"{impl}_graph_vs_reference"] = compare(graphed, want)
        if case.dtype == torch.float32:
            results[f"{impl}_graph_steps_only_vs_reference"] = compare_steps(model, reference, decode, decoder)
        else:
            results[f"{impl}_graph_vs_fp32"] = compare(graphed, truth)
        del model, decoder
        torch.cuda.empty_cache()
    return results


# ---- the decode step alone --------------------------------------------------------------------------

@dataclass(frozen=True)
class StepCase:
    """Each path at the batches where it runs code (a tile size, a kernel variant) the others do not:

    - `eager_batches`: `step` in place, one batch per tile size of proj_tiles (1: the GEMV; 16 and 64:
      tl.dot tiles of 16 and 64 rows), each a kernel variant of its own;
    - `graph_batches`: `CapturedDecoder` (the engine's path), one decoder of max(graph_batches) rows
      whose buckets all run the variants the eager batches compiled (no compilation of their own);
    - `rows_batch`: `step_rows` in place and into other rows, eager and captured (the planner's path,
      the kernels' HAS_ROWS variants), at one batch: row indexing does not depend on the tile.

    Every path at batch b starts from rows [0:b] of one state the reference prefilled and is checked
    against rows [0:b] of one reference run (rows of a batch do not interact), so the reference runs
    once per case, at the largest batch."""
    name: str
    config: MambaConfig
    dtype: torch.dtype
    eager_batches: tuple[int, ...]
    graph_batches: tuple[int, ...]
    rows_batch: int
    steps: int
    prefill_len: int = 32
    seed: int = 0

    @property
    def batch(self) -> int:
        return max(*self.eager_batches, *self.graph_batches, self.rows_batch)

    @property
    def paths(self) -> tuple[str, ...]:
        """The `b<B> <path>` names measure_steps reports (and the tests check)."""
        return (*(f"b{b} eager" for b in self.eager_batches), *(f"b{b} graph" for b in self.graph_batches),
                *(f"b{self.rows_batch} {path}" for path, _, _ in ROWS_PATHS))


# (name, captured, ping-pong: read from one set of rows and written to another)
ROWS_PATHS = (("rows", False, False), ("rows graph", True, False),
              ("rows to other rows", False, True), ("rows to other rows graph", True, True))
# fp32 over 256 steps: its bound is exactness. bf16 over 128 steps at batch 1 and 16: its bound is bf16
# noise, and its kernels differ from fp32's by their roundings, not by tile; fewer steps and kernel
# variants keep the test file within its time budget.
STEP_CASES = (StepCase("d768-L24-fp32-steps", BF16_CASE.config, torch.float32, eager_batches=(1, 16, 64),
                       graph_batches=(1, 16), rows_batch=16, steps=256),
              StepCase("d768-L24-bf16-steps", BF16_CASE.config, torch.bfloat16, eager_batches=(1, 16),
                       graph_batches=(1, 16), rows_batch=16, steps=128))


def decode_errors(logits: torch.Tensor, final: RecurrentState, want_logits: torch.Tensor,
                  want_final: RecurrentState) -> dict[str, float]:
    """logits [B, S, V] fp32 against the wanted ones; final states against the wanted final states."""
    per_step = [rel_err(logits[:, t], want_logits[:, t]) for t in range(want_logits.shape[1])]
    return {"decode_logits": rel_err(logits, want_logits), "decode_logits_worst_step": max(per_step),
            "final_conv": rel_err(final.conv, want_final.conv), "final_ssm": rel_err(final.ssm, want_final.ssm),
            "decode_top1_agreement": (logits.argmax(-1) == want_logits.argmax(-1)).float().mean().item()}


@torch.inference_mode()
def rows_steps(model: MambaLM, start: RecurrentState, decode: torch.Tensor, graphed: bool,
               ping_pong: bool) -> tuple[torch.Tensor, RecurrentState, float]:
    """The batch's B rows placed at a permutation of a pool of 2B + 1 random rows and stepped there by
    `step_rows`, eagerly or from one captured graph: in place, or (ping_pong, as the planner steps a
    parent's state into a child's row) read from one set of B rows and written to the other, the two
    sets swapping after every step. Returns logits [B, S, V] fp32, the final rows, and the largest
    change of the pool rows the batch never reads or writes (0 when untouched)."""
    batch = decode.shape[0]
    pool_rows = 2 * batch + 1
    perm = torch.randperm(pool_rows, generator=torch.Generator().manual_seed(batch)).to(decode.device)
    src, dst = perm[:batch].clone(), perm[batch:2 * batch].clone() if ping_pong else perm[:batch].clone()
    pool = model.allocate_state(pool_rows)
    pool.ssm.normal_()
    pool.conv.normal_()
    before = pool.clone()
    pool.scatter_(src, start)
    tokens = torch.zeros(batch, dtype=torch.long, device=decode.device)

    def step() -> torch.Tensor:
        return model.step_rows(tokens, pool, src, dst)

    if graphed:
        saved = pool.clone()
        _warm_up(step, 2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        pool.copy_(saved)
    logits = []
    for t in range(decode.shape[1]):
        tokens.copy_(decode[:, t])
        if graphed:
            graph.replay()
        else:
            out = step()
        logits.append(out.to(torch.float32, copy=True))
        if ping_pong:
            swap = src.clone()
            src.copy_(dst)
            dst.copy_(swap)
    idle = perm[2 * batch:] if ping_pong else perm[batch:]
    changed = max((pool.gather(idle).ssm.float() - before.gather(idle).ssm.float()).abs().max().item(),
                  (pool.gather(idle).conv.float() - before.gather(idle).conv.float()).abs().max().item())
    return torch.stack(logits, 1), pool.gather(src), changed   # after the last swap src holds the result


class CompileLog:
    """Counts and times Triton's compilations (misses of its in-process kernel cache: one per kernel
    variant, whether or not its disk cache has the binary) while active, through its JIT hooks."""

    def __init__(self):
        self.variants: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0
        self._started = 0.0

    def _before(self, **_) -> None:
        self._started = time.perf_counter()
        return None   # a true value would tell Triton to skip the compilation

    def _after(self, *, fn, **_) -> None:
        self.seconds += time.perf_counter() - self._started
        self.variants[fn.name] += 1

    def __enter__(self) -> "CompileLog":
        from triton import knobs
        self._saved = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *exc) -> None:
        from triton import knobs
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._saved


def first_rows(run: tuple[torch.Tensor, RecurrentState], batch: int) -> tuple[torch.Tensor, RecurrentState]:
    """(logits [B, S, V], final state of B rows) -> the same of the first `batch` rows."""
    logits, final = run
    return logits[:batch], final.rows(slice(0, batch))


def measure_steps(case: StepCase, impl: str = "fused_step", device: str = "cuda") -> dict[str, dict[str, float]]:
    """{"b<B> <path>": errors and "seconds"} for each of `case.paths` of `impl` against the reference,
    and in bf16 also `b<B> reference vs fp32` and `b<B> graph vs fp32` for each graph batch.

    Where the time goes: a path's "seconds" include compiling the kernel variants it is the first to
    run; "reference" holds the reference runs' seconds, "compilation" the count and seconds of the
    Triton compilations of the whole case, "total" its wall time."""
    started = time.perf_counter()
    with CompileLog() as compiled:
        results = _measure_steps(case, impl, device)
    results["compilation"] = {"kernel_variants": float(sum(compiled.variants.values())), "seconds": compiled.seconds}
    results["total"] = {"seconds": time.perf_counter() - started}
    return results


def _measure_steps(case: StepCase, impl: str, device: str) -> dict[str, dict[str, float]]:
    torch.manual_seed(case.seed)
    reference = build_backbone(case.config, device, case.dtype, impl="reference")
    model = like(reference, impl)
    vocab = case.config.vocab_size
    gen = torch.Generator().manual_seed(case.seed + 1)
    prompt = torch.randint(0, vocab, (case.batch, case.prefill_len), generator=gen).to(device)
    decode = torch.randint(0, vocab, (case.batch, case.steps), generator=gen).to(device)
    results: dict[str, dict[str, float]] = {}

    clock = time.perf_counter()
    start = reference.allocate_state(case.batch)
    with torch.inference_mode():
        reference(prompt, start)
    want = decode_steps(reference, start, decode)
    if case.dtype != torch.float32:
        # the same bf16-rounded weights run in fp32, at the graph batches: the size of bf16 noise
        exact = copy.deepcopy(reference).float()
        rows = slice(0, max(case.graph_batches))
        truth = decode_steps(exact, RecurrentState(start.conv[:, rows].float(), start.ssm[:, rows].float()),
                             decode[rows])
        del exact
    want[0].sum().item()   # waits for the reference's kernels
    results["reference"] = {"seconds": time.perf_counter() - clock}

    def record(name: str, batch: int, run: tuple[torch.Tensor, RecurrentState], clock: float, **extra: float) -> None:
        results[name] = {**decode_errors(*run, *first_rows(want, batch)), **extra,   # .item(): waits for the GPU
                         "seconds": time.perf_counter() - clock}

    for batch in case.eager_batches:
        clock = time.perf_counter()
        record(f"b{batch} eager", batch, decode_steps(model, start.rows(slice(0, batch)), decode[:batch]), clock)

    clock = time.perf_counter()   # the first graph batch's seconds hold the capture of every bucket
    decoder = CapturedDecoder(model, max_batch=max(case.graph_batches))
    for batch in case.graph_batches:
        graphed = decode_steps(model, start.rows(slice(0, batch)), decode[:batch], decoder)
        record(f"b{batch} graph", batch, graphed, clock)
        if case.dtype != torch.float32:
            results[f"b{batch} reference vs fp32"] = decode_errors(*first_rows(want, batch), *first_rows(truth, batch))
            results[f"b{batch} graph vs fp32"] = decode_errors(*graphed, *first_rows(truth, batch))
        clock = time.perf_counter()
    del decoder

    batch = case.rows_batch
    for name, captured, ping_pong in ROWS_PATHS:
        clock = time.perf_counter()
        logits, final, changed = rows_steps(model, start.rows(slice(0, batch)), decode[:batch], captured, ping_pong)
        record(f"b{batch} {name}", batch, (logits, final), clock, unused_rows_changed=changed)
    torch.cuda.empty_cache()
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
    """ms per decode step (GPU time, back to back, no host sync per step) for each batch size: the
    reference eagerly, each GPU impl eagerly and from its captured graph."""
    torch.manual_seed(0)
    reference = build_backbone(config, device, dtype, impl="reference")
    models = {impl: like(reference, impl) for impl in GPU_IMPLS}
    decoders = {impl: CapturedDecoder(model, max_batch=max(batches)) for impl, model in models.items()}
    rows = []
    for batch in batches:
        tokens = torch.randint(0, config.vocab_size, (batch,), device=device)
        state = decoders["fused"].pool.rows(slice(0, batch))
        row = {"batch": batch, "reference_eager_ms": _ms_per_call(lambda: reference.step(tokens, state), iters=20)}
        for impl, model in models.items():
            row[f"{impl}_eager_ms"] = _ms_per_call(lambda: model.step(tokens, state), iters=20)
            row[f"{impl}_graph_ms"] = _ms_per_call(lambda: decoders[impl].step(tokens), iters=200)
            row[f"{impl}_graph_tokens_per_s"] = batch * 1000.0 / row[f"{impl}_graph_ms"]
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


STEP_COLUMNS = ("decode_logits", "decode_logits_worst_step", "final_conv", "final_ssm", "decode_top1_agreement",
                "unused_rows_changed", "kernel_variants", "seconds")


def to_markdown(env: dict[str, str], cases: dict[str, dict[str, dict[str, float]]],
                timings: list[dict[str, float]] | None = None,
                steps: dict[str, dict[str, dict[str, float]]] | None = None) -> str:
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
    if steps:
        lines += ["", "| case | batch, path | " + " | ".join(STEP_COLUMNS) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in STEP_COLUMNS) + " |"]
        for case, comparisons in steps.items():
            for name, errs in comparisons.items():
                cells = ["-" if c not in errs else f"{errs[c]:.4f}" if c == "decode_top1_agreement"
                         else f"{errs[c]:.0f}" if c == "kernel_variants" else f"{errs[c]:.1f}" if c == "seconds"
                         else f"{errs[c]:.2e}" for c in STEP_COLUMNS]
                lines.append(f"| {case} | {name} | " + " | ".join(cells) + " |")
    if timings:
        impls = [k.removesuffix("_graph_ms") for k in timings[0] if k.endswith("_graph_ms")]
        lines += ["", "| batch | reference eager ms/step | " +
                  " | ".join(f"{i} eager ms/step | {i} graph ms/step | {i} graph tokens/s" for i in impls) + " |",
                  "| --- | --- | " + " | ".join("--- | --- | ---" for _ in impls) + " |"]
        for row in timings:
            lines.append(f"| {row['batch']} | {row['reference_eager_ms']:.2f} | " + " | ".join(
                f"{row[f'{i}_eager_ms']:.2f} | {row[f'{i}_graph_ms']:.3f} | {row[f'{i}_graph_tokens_per_s']:,.0f}"
                for i in impls) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, name: str, payload: dict) -> None:
    """`<name>.json` (everything) and `<name>.md` (the tables) under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(to_markdown(payload["environment"], payload.get("cases", {}),
                                                 payload.get("timings"), payload.get("steps")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_parity")))
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--no-timing", action="store_true")
    timing.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    if args.timing_only:
        payload = {"environment": environment(), "timings": time_steps()}
        write_results(args.out, "timing", payload)
        print(to_markdown(payload["environment"], {}, payload["timings"]))
        return
    payload = {"environment": environment(),
               "cases": {case.name: measure(case) for case in (BF16_CASE, FP32_CASE)},
               "steps": {case.name: measure_steps(case) for case in STEP_CASES},
               "case_settings": {c.name: {k: str(v) for k, v in dataclasses.asdict(c).items() if k != "config"}
                                 for c in (BF16_CASE, FP32_CASE, *STEP_CASES)}}
    if not args.no_timing:
        payload["timings"] = time_steps()
    write_results(args.out, "parity", payload)
    print(to_markdown(payload["environment"], payload["cases"], payload.get("timings"), payload["steps"]))


if __name__ == "__main__":
    main()
