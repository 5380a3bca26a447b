"""Section "baselines": the same model in mamba_ssm's and in transformers' own generate loops.

- mamba_ssm `MambaLMHeadModel.generate(input_ids, max_length, cg=True, streamer=...)`: its decode loop
  with the single-token step replayed from a CUDA graph (mamba_ssm/utils/generation.py). Parameter
  names are ours (MambaLM keeps mamba_ssm's layout), so the engine's weights load as they are.
- transformers `Mamba2ForCausalLM.generate(...)`: eager decode. Its names differ from ours only in
  `backbone.embeddings` (ours: `backbone.embedding`), so the same weights load after that rename; it
  uses mamba_ssm's Triton kernels for the scan and the state update when mamba_ssm imports (the
  selective_scan_cuda stub is registered first) and torch for the convolution (no causal-conv1d).

Both at batch 1, 16 and 64, greedy (mamba_ssm: top_k=1; transformers: do_sample=False), `tokens`
new tokens per row after the same random prompts. Per-token timing: a streamer whose `put` runs
`torch.cuda.synchronize()` and reads `time.perf_counter()`; both loops call `put` once with the prompt
before the first step and then once per step with the new tokens ([B, 1] in mamba_ssm, [B] in
transformers), so the gaps between the puts after the first are the inter-token latencies of every
row of the batch (a server must also have each token on the host to stream it, so the sync is fair).
Skipped, with the reason, without CUDA or without the package.
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .guard import run_guarded
from .results import BaselineResult, BaselinesResult, StreamRun
from .stats import LatencyStats, gaps, steady_tokens_per_s
from .workload import Workload

log = logging.getLogger(__name__)

BACKENDS = ("mamba_ssm", "transformers")


@dataclass
class TimingStreamer:
    """The `streamer` of both generate loops: timestamps of each step's tokens on the host."""
    sync: Callable[[], None]
    prompt_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    rows: int | None = None
    ended: bool = False

    def put(self, value: torch.Tensor) -> None:
        """value: the prompt [B, P] on the first call; then one step's tokens, [B, 1] or [B]."""
        self.sync()
        now = time.perf_counter()
        if self.prompt_at is None:
            self.prompt_at = now
            self.rows = int(value.shape[0])
            return
        if int(value.shape[0]) != self.rows:
            raise RuntimeError(f"the streamer got {value.shape[0]} rows, the prompt had {self.rows}")
        self.token_times.append(now)

    def end(self) -> None:
        self.ended = True


def cuda_sync() -> None:
    torch.cuda.synchronize()


def no_sync() -> None:
    """On the CPU every op has finished when it returns."""


def streamer_for(device: torch.device) -> TimingStreamer:
    return TimingStreamer(cuda_sync if device.type == "cuda" else no_sync)


def baseline_run(streamer: TimingStreamer, batch: int, tokens: int, warmup: int, wall_s: float) -> StreamRun:
    if len(streamer.token_times) != tokens or not streamer.ended:
        raise RuntimeError(f"the streamer saw {len(streamer.token_times)} steps, expected {tokens}")
    times = streamer.token_times
    return StreamRun(label="greedy", streams=batch, tokens_per_stream=tokens, total_tokens=batch * tokens,
                     itl=LatencyStats.of(gaps(times, warmup)),
                     tokens_per_s=batch * steady_tokens_per_s([times], warmup), wall_s=wall_s,
                     ttft=LatencyStats.of([times[0] - streamer.prompt_at]))


def timed_runs(name: str, workload: Workload, device: torch.device, batches: tuple[int, ...], tokens: int,
               warm_up: Callable[[torch.Tensor], object],
               generate: Callable[[torch.Tensor, TimingStreamer], torch.Tensor]) -> list[StreamRun]:
    """Per batch size: `warm_up(ids)`, then one timed `generate(ids, streamer)` of `tokens` new tokens
    after prompts ids [B, P]; its per-token timestamps become the run's ITL and throughput."""
    runs = []
    for batch in batches:
        ids = torch.tensor(workload.prompts(batch, salt=510 + batch), device=device)     # [B, P]
        warm_up(ids)
        streamer = streamer_for(device)
        start = time.perf_counter()
        out = generate(ids, streamer)
        wall = time.perf_counter() - start
        if tuple(out.shape) != (batch, ids.shape[1] + tokens):
            raise RuntimeError(f"{name} generate returned {tuple(out.shape)}")
        runs.append(baseline_run(streamer, batch, tokens, workload.settings.warmup_gaps, wall))
        log.info("%s batch %d: ITL p50 %.3f ms, p99 %.3f ms, %.0f tokens/s", name, batch, runs[-1].itl.p50_ms,
                 runs[-1].itl.p99_ms, runs[-1].tokens_per_s)
    return runs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ---- mamba_ssm ----------------------------------------------------------------------------------------

def mamba_ssm_model(workload: Workload, device: torch.device) -> torch.nn.Module:
    """mamba_ssm's MambaLMHeadModel of the same config, holding the engine's weights."""
    from ..backbone.fused import register_selective_scan_stub

    register_selective_scan_stub()
    from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    c, s = workload.config, workload.config.ssm_cfg
    config = SSMConfig(d_model=c.d_model, d_intermediate=c.d_intermediate, n_layer=c.n_layer, vocab_size=c.vocab_size,
                       ssm_cfg={"layer": "Mamba2", "d_state": s.d_state, "d_conv": s.d_conv, "expand": s.expand,
                                "headdim": s.headdim, "ngroups": s.ngroups, "chunk_size": s.chunk_size},
                       rms_norm=c.rms_norm, residual_in_fp32=c.residual_in_fp32, fused_add_norm=c.fused_add_norm,
                       pad_vocab_size_multiple=c.pad_vocab_size_multiple, tie_embeddings=c.tie_embeddings)
    model = MambaLMHeadModel(config, device=device, dtype=workload.settings.dtype).eval()
    model.load_state_dict(workload.backbone.state_dict(), strict=True)
    return model


@torch.inference_mode()
def mamba_ssm_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids: [B, T] -> logits [B, T, padded V]. Through an InferenceParams: without one, mamba_ssm takes its
    memory-efficient path, which needs causal-conv1d."""
    from mamba_ssm.utils.generation import InferenceParams

    params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=ids.shape[0])
    return model(ids, inference_params=params).logits


@torch.inference_mode()
def mamba_ssm_generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int, streamer: TimingStreamer) -> torch.Tensor:
    """ids: [B, P] -> sequences [B, P + tokens] (max_length counts the prompt: decode stops once
    seqlen_offset reaches max_length - 1, which is after exactly `tokens` steps)."""
    return model.generate(ids, max_length=ids.shape[1] + tokens, cg=True, streamer=streamer)


def mamba_ssm_runs(workload: Workload, device: torch.device, batches: tuple[int, ...], tokens: int) -> BaselineResult:
    model = mamba_ssm_model(workload, device)
    probe = torch.tensor(workload.prompts(1, salt=500), device=device)
    with torch.inference_mode():
        err = rel_err(mamba_ssm_logits(model, probe)[..., :workload.config.vocab_size], workload.backbone(probe))

    def warm_up(ids: torch.Tensor) -> None:
        model._decoding_cache = None  # a fresh graph cache per batch size, captured by the warm-up call
        mamba_ssm_generate(model, ids, tokens, streamer_for(device))

    runs = timed_runs("mamba_ssm", workload, device, batches, tokens, warm_up,
                      lambda ids, streamer: mamba_ssm_generate(model, ids, tokens, streamer))
    model._decoding_cache = None
    return BaselineResult(
        backend="mamba_ssm", status="ok", reason=None,
        weights=f"the engine's (loaded strictly); prefill logits vs ours: rel. error {err:.2e}",
        notes="MambaLMHeadModel.generate(cg=True), greedy (top_k=1); "
              f"causal-conv1d {'installed' if importlib.util.find_spec('causal_conv1d') else 'not installed'}",
        runs=runs)


# ---- transformers -------------------------------------------------------------------------------------

def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours (mamba_ssm's names) -> Mamba2ForCausalLM's: only the embedding differs."""
    prefix, hf_prefix = "backbone.embedding.", "backbone.embeddings."
    return {(hf_prefix + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def hf_model(workload: Workload, device: torch.device) -> torch.nn.Module:
    """transformers' Mamba2ForCausalLM of the same config, holding the engine's weights. No eos token, so
    every run decodes exactly its max_new_tokens."""
    if importlib.util.find_spec("mamba_ssm") is not None:
        # Before transformers imports its Mamba-2 module, which tries `import mamba_ssm` for its kernels.
        from ..backbone.fused import register_selective_scan_stub

        register_selective_scan_stub()
    from transformers import Mamba2Config, Mamba2ForCausalLM

    c, s = workload.config, workload.config.ssm_cfg
    config = Mamba2Config(
        num_heads=c.nheads, head_dim=s.headdim, vocab_size=c.padded_vocab_size, hidden_size=c.d_model,
        state_size=s.d_state, num_hidden_layers=c.n_layer, layer_norm_epsilon=c.norm_epsilon, expand=s.expand,
        conv_kernel=s.d_conv, n_groups=s.ngroups, use_bias=False, use_conv_bias=True,
        residual_in_fp32=c.residual_in_fp32, chunk_size=s.chunk_size, tie_word_embeddings=c.tie_embeddings,
        eos_token_id=None, pad_token_id=None, bos_token_id=None)
    with torch.device(device):
        model = Mamba2ForCausalLM(config)
    model = model.to(dtype=workload.settings.dtype).eval()
    model.load_state_dict(hf_state_dict(workload.backbone.state_dict()), strict=True)
    return model


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int, streamer: TimingStreamer) -> torch.Tensor:
    """ids: [B, P] -> sequences [B, P + tokens]."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                          streamer=streamer)


def hf_runs(workload: Workload, device: torch.device, batches: tuple[int, ...], tokens: int) -> BaselineResult:
    s = workload.settings
    model = hf_model(workload, device)
    probe = torch.tensor(workload.prompts(1, salt=500), device=device)
    with torch.inference_mode():
        err = rel_err(model(probe).logits[..., :workload.config.vocab_size], workload.backbone(probe))
    runs = timed_runs("transformers", workload, device, batches, tokens,
                      lambda ids: hf_generate(model, ids, s.warmup_gaps + 4, streamer_for(device)),  # autotuning
                      lambda ids, streamer: hf_generate(model, ids, tokens, streamer))
    import transformers

    mamba_kernels = importlib.util.find_spec("mamba_ssm") is not None
    return BaselineResult(
        backend="transformers", status="ok", reason=None,
        weights=f"the engine's (renamed, loaded strictly); prefill logits vs ours: rel. error {err:.2e}",
        notes=f"transformers {transformers.__version__} Mamba2ForCausalLM.generate, eager, greedy; "
              f"{tokens} tokens per run; " +
              ("mamba_ssm's Triton scan and state update" if mamba_kernels else "torch reference kernels"),
        runs=runs)


# ---- the section --------------------------------------------------------------------------------------

def skip_reason(workload: Workload, package: str) -> str | None:
    s = workload.settings
    if s.quick:
        return "--quick runs the tiny model on the CPU; the baselines are measured on CUDA only"
    if s.device != "cuda":
        return "no CUDA device: the baselines are measured on CUDA only"
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed"
    return None


def baselines_section(workload: Workload) -> BaselinesResult:
    s = workload.settings
    device = torch.device(s.device)
    runners = {"mamba_ssm": lambda: mamba_ssm_runs(workload, device, s.concurrency, s.tokens),
               "transformers": lambda: hf_runs(workload, device, s.concurrency, s.hf_tokens)}
    results = []
    for backend in BACKENDS:
        reason = skip_reason(workload, backend)
        if reason is not None:
            log.info("baseline %s skipped: %s", backend, reason)
            results.append(BaselineResult(backend, "skipped", reason, weights="", notes=""))
            continue
        guarded = run_guarded(f"baseline {backend}", runners[backend])
        results.append(guarded.value if guarded.value is not None else
                       BaselineResult(backend, "failed", guarded.error, weights="", notes=""))
        gc.collect()
        torch.cuda.empty_cache()
    return BaselinesResult(results)
