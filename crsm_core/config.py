"""Model configuration: mamba_ssm's `MambaConfig` fields, as a typed, validated dataclass.

`config.json` written by mamba_ssm (and by us) loads as it is; unknown keys are rejected so a typo
never silently becomes a default.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import read_text

# The model directory the commands use when none is given: the repository's models/default.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


@dataclass(frozen=True)
class SSMConfig:
    layer: str = "Mamba2"
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256

    def __post_init__(self) -> None:
        if self.layer != "Mamba2":
            raise ConfigError(f"ssm_cfg.layer must be 'Mamba2', got {self.layer!r}")
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ssm_cfg.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class MambaConfig:
    d_model: int = 768
    n_layer: int = 24
    d_intermediate: int = 0
    vocab_size: int = 50277
    ssm_cfg: SSMConfig = field(default_factory=SSMConfig)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    # Present in mamba_ssm's config.json; hybrid attention layers are not supported.
    attn_layer_idx: tuple[int, ...] = ()
    attn_cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.attn_layer_idx or self.attn_cfg:
            raise ConfigError("attention layers (attn_layer_idx, attn_cfg) are not supported")
        if not self.rms_norm:
            raise ConfigError("only rms_norm=true models are supported")
        if self.d_model <= 0 or self.n_layer <= 0 or self.vocab_size <= 0:
            raise ConfigError("d_model, n_layer and vocab_size must be positive")
        if self.d_intermediate < 0:
            raise ConfigError(f"d_intermediate must be >= 0, got {self.d_intermediate}")
        if self.d_inner % self.ssm_cfg.headdim:
            raise ConfigError(
                f"expand*d_model={self.d_inner} is not a multiple of headdim={self.ssm_cfg.headdim}")
        if self.nheads % self.ssm_cfg.ngroups:
            raise ConfigError(f"nheads={self.nheads} is not a multiple of ngroups={self.ssm_cfg.ngroups}")

    # Derived sizes, named as in mamba_ssm's Mamba2.
    @property
    def d_inner(self) -> int:
        return self.ssm_cfg.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.ssm_cfg.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ssm_cfg.ngroups * self.ssm_cfg.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ssm_cfg.ngroups * self.ssm_cfg.d_state + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MambaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown config fields: {unknown}")
        values = dict(raw)
        ssm = values.pop("ssm_cfg", {}) or {}
        ssm_known = {f.name for f in dataclasses.fields(SSMConfig)}
        ssm_unknown = sorted(set(ssm) - ssm_known)
        if ssm_unknown:
            raise ConfigError(f"unknown ssm_cfg fields: {ssm_unknown}")
        values["attn_layer_idx"] = tuple(values.get("attn_layer_idx", ()))
        try:
            return cls(ssm_cfg=SSMConfig(**ssm), **values)
        except TypeError as e:  # wrong value types surface here
            raise ConfigError(str(e)) from e

    @classmethod
    def load(cls, path: str | Path) -> "MambaConfig":
        path = Path(path)
        text = read_text(path, ConfigError)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def tiny_config(vocab_size: int = 260, **overrides: Any) -> MambaConfig:
    """A few-layer model for tests: chunk_size 16 so short prompts cross chunk borders."""
    ssm = SSMConfig(d_state=16, d_conv=4, expand=2, headdim=16, ngroups=1, chunk_size=16)
    base: dict[str, Any] = dict(d_model=64, n_layer=4, vocab_size=vocab_size, ssm_cfg=ssm,
                                pad_vocab_size_multiple=8)
    base.update(overrides)
    return MambaConfig(**base)
