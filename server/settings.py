"""Server settings: defaults, overridden by `CRSM_<FIELD>` environment variables, overridden by CLI flags.

Validated once here; the rest of the server trusts them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crsm_core.cli import DEFAULT_MODEL

ENV_PREFIX = "CRSM_"


class SettingsError(ValueError):
    pass


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_dir: Path = DEFAULT_MODEL
    model_name: str | None = None          # the id clients name; default: the model directory's name
    device: str = "auto"                   # "auto" = cuda when available, else cpu
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_sessions: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_new_tokens: int = Field(1024, ge=1)   # the limit on a request's max_tokens
    default_max_tokens: int = Field(16, ge=1)  # when a request gives none (OpenAI's completions default)
    queue_size: int = Field(256, ge=0)
    prefill_chunk: int = Field(256, ge=1)
    retry_after_s: int = Field(1, ge=1)
    shutdown_drain_s: float = Field(10.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # CPU intra-op threads; None = torch's default
    # where planner work runs on a GPU (crsm_core/planner/runtime.py); docs/benchmarks.md measures both
    planner_mode: Literal["auto", "stream", "ride"] = "auto"   # auto: ride on a GPU, stream on the CPU
    ride_rows: int = Field(16, ge=1)       # "ride": planner rows carried by one decode step at most
    # deliberation: the defaults of requests that do not say; None = the model's own setting
    deliberation_enabled: bool = False
    deliberation_lag: int | None = Field(None, ge=1)
    deliberation_simulations: int | None = Field(None, ge=1)
    deliberation_injection_rate: float | None = Field(None, ge=0, le=1)
    deliberation_use_suggestions: bool | None = None

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model_dir.name

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServerSettings":
        """Fields from `CRSM_<NAME>` variables, then the given overrides (None = not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in environ:
                values[name] = environ[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise SettingsError(f"invalid server settings: {problems}") from e
