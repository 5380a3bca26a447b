"""What a `crsm bench` run measures: sections, sizes and device, validated once at the edge.

torch is imported where it is used: `crsm --help` reads this module without loading it."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"
SECTIONS = ("engine", "baselines", "deliberation", "http")
DEVICES = ("auto", "cpu", "cuda")
BACKBONES = ("reference", "fused", "fused_step")
# The engine section's backbones by device: the first is every section's, the others are compared with it.
DEFAULT_BACKBONES = {"cuda": ("fused_step", "fused"), "cpu": ("reference",)}
# The HTTP section's servers: the engine in the server's process, or in a process of its own.
HTTP_DESIGNS = ("one-process", "engine-process")


class SettingsError(ValueError):
    """Settings that cannot describe a run."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class BenchSettings:
    out: Path
    docs: Path | None = DEFAULT_DOCS          # None: do not touch the documentation
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False                       # tiny model, fp32, CPU: the CI's run
    device: str = "cuda"                      # resolved: "cpu" or "cuda" (see `create`)
    backbones: tuple[str, ...] = DEFAULT_BACKBONES["cuda"]   # see DEFAULT_BACKBONES
    tokens: int = 256                         # max_tokens of every measured session
    warmup_gaps: int = 8                      # first gaps of each session left out of the ITL numbers
    prompt_tokens: int = 16                   # random prompt of every measured session
    concurrency: tuple[int, ...] = (1, 16, 64)
    deliberation_concurrency: tuple[int, ...] = (1, 16)
    http_clients: tuple[int, ...] = (1, 16, 64)
    long_prompt_tokens: int = 4096            # the prompt admitted while 16 streams run
    long_prompt_streams: int = 16
    max_sessions: int = 64                    # EngineConfig.max_sessions and the server's slot pool
    hf_tokens: int = 256                      # transformers' generate (eager, slow): tokens per run
    # Deliberation runs are longer: a plan takes a good fraction of a second, and only plans that finish
    # before their session ends count (256 tokens at ~1.5 ms end every session before its first plan).
    deliberation_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise SettingsError(f"sections must be a non-empty subset of {SECTIONS}, got {list(self.sections)}")
        if self.device not in ("cpu", "cuda"):
            raise SettingsError(f"device must be resolved to 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise SettingsError("--device cuda, but no CUDA device is available")
        if not self.backbones or len(set(self.backbones)) != len(self.backbones) or \
                any(b not in BACKBONES for b in self.backbones):
            raise SettingsError(f"backbones must be distinct names of {BACKBONES}, got {list(self.backbones)}")
        if self.device == "cpu" and self.backbones != ("reference",):
            raise SettingsError(f"on the CPU the only backbone is the reference, got {list(self.backbones)}")
        # ITLs need at least two gaps per session after the warm-up ones.
        for name in ("tokens", "hf_tokens", "deliberation_tokens"):
            if getattr(self, name) < self.warmup_gaps + 3:
                raise SettingsError(f"{name} must be >= warmup_gaps + 3 = {self.warmup_gaps + 3}, "
                                    f"got {getattr(self, name)}")
        if self.warmup_gaps < 0 or self.prompt_tokens < 1 or self.seed < 0:
            raise SettingsError("warmup_gaps and seed must be >= 0, prompt_tokens >= 1")
        for name in ("concurrency", "deliberation_concurrency", "http_clients"):
            values = getattr(self, name)
            if not values or any(n < 1 or n > self.max_sessions for n in values):
                raise SettingsError(f"{name} must be sessions in [1, max_sessions={self.max_sessions}], got {values}")
        if self.long_prompt_streams + 1 > self.max_sessions:
            raise SettingsError("long_prompt_streams + 1 must fit in max_sessions")
        if self.long_prompt_tokens < 1:
            raise SettingsError("long_prompt_tokens must be >= 1")

    @classmethod
    def create(cls, out: Path, *, quick: bool = False, device: str = "auto", tokens: int | None = None,
               sections: tuple[str, ...] | None = None, docs: Path | None = DEFAULT_DOCS,
               backbones: tuple[str, ...] | None = None) -> "BenchSettings":
        """The defaults of a full (GPU) or `--quick` (CPU, tiny model) run, with the given overrides.

        device "auto": CUDA when available, except with `quick`, whose tiny model runs on the CPU.
        backbones: default DEFAULT_BACKBONES of the device."""
        if device not in DEVICES:
            raise SettingsError(f"device must be one of {DEVICES}, got {device!r}")
        if device == "auto":
            device = "cpu" if quick or not _cuda_available() else "cuda"
        values: dict[str, Any] = dict(out=Path(out), docs=docs, quick=quick, device=device,
                                      backbones=tuple(backbones) if backbones else DEFAULT_BACKBONES[device])
        if quick:
            # A few tokens per session, but enough that a light planner finishes some plans.
            values.update(tokens=24, warmup_gaps=2, hf_tokens=24, deliberation_tokens=24)
        if tokens is not None:
            # --tokens sets the sessions' length; transformers' runs are at most as long as their default,
            # deliberation runs at least as long as theirs (shorter ones finish no plan)
            values.update(tokens=tokens, hf_tokens=min(tokens, values.get("hf_tokens", cls.hf_tokens)),
                          deliberation_tokens=max(tokens, values.get("deliberation_tokens", cls.deliberation_tokens)))
        if sections is not None:
            values["sections"] = tuple(dict.fromkeys(sections))
        return cls(**values)

    @property
    def dtype(self) -> torch.dtype:
        """bf16 on CUDA for the full model; fp32 for --quick and on the CPU."""
        import torch

        return torch.bfloat16 if self.device == "cuda" and not self.quick else torch.float32

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out
