"""Training configuration: one typed dataclass tree loaded from `configs/NAME.yaml`, validated once.

Unknown keys are errors (a typo never becomes a default); scalars are type-checked; the `model` section is
a `MambaConfig` (mamba_ssm's config.json fields) so the model is described one way everywhere.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, MambaConfig
from ..deliberation import DeliberationConfig
from ..tasks import TaskSpec


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = 256
    task_fraction: float = 0.3       # share of training rows made of task examples
    heldout_percent: int = 5         # share of corpus files held out (by a hash of the path)
    max_corpus_bytes: int = 0        # 0 = the whole corpus; else stop listing files past this size
    exclude_dirs: tuple[str, ...] = ("site-packages", "dist-packages", "__pycache__")

    def __post_init__(self) -> None:
        _require(self.seq_len >= 8, "data.seq_len must be >= 8")
        _require(0.0 <= self.task_fraction <= 1.0, "data.task_fraction must be in [0, 1]")
        _require(1 <= self.heldout_percent <= 50, "data.heldout_percent must be in [1, 50]")
        _require(self.max_corpus_bytes >= 0, "data.max_corpus_bytes must be >= 0")


@dataclass(frozen=True)
class BackboneTrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 32           # held-out windows (seq_len each) per evaluation
    checkpoint_every: int = 200
    # > 0: time the first steps and shorten `steps` so that training ends within this many seconds.
    time_budget_s: float = 0.0

    def __post_init__(self) -> None:
        _require(self.steps > 0 and self.batch_size > 0, "backbone.steps and batch_size must be > 0")
        _require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "backbone.lr > 0, min_lr_ratio in [0, 1]")
        _require(0 <= self.warmup_steps < self.steps, "backbone.warmup_steps must be in [0, steps)")
        _require(self.eval_every > 0 and self.checkpoint_every > 0 and self.eval_windows > 0,
                 "backbone.eval_every, checkpoint_every and eval_windows must be > 0")
        _require(self.grad_clip > 0 and self.time_budget_s >= 0, "backbone.grad_clip > 0, time_budget_s >= 0")


@dataclass(frozen=True)
class DynamicsTrainConfig:
    steps: int = 500
    rows: int = 16                   # text rows stepped through the frozen backbone in parallel
    unroll: int = 32                 # backbone steps per row before new rows are drawn
    max_prefix: int = 64             # rows start after a random prefix of up to this many tokens
    horizon: int = 1                 # open-loop steps per loss (1 = one-step distillation)
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lags: tuple[int, ...] = (1, 3, 8)
    fidelity_rows: int = 16          # held-out rows for the fidelity report
    checkpoint_every: int = 200
    time_budget_s: float = 0.0
    # Settings of the dynamics model itself, passed through to crsm_core.dynamics.
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.steps > 0 and self.rows > 0 and self.unroll > 0 and self.max_prefix >= 0,
                 "dynamics.steps, rows, unroll > 0; max_prefix >= 0")
        _require(self.horizon >= 1, "dynamics.horizon must be >= 1")
        _require(self.checkpoint_every > 0, "dynamics.checkpoint_every must be > 0")
        _require(self.lr > 0 and self.grad_clip > 0, "dynamics.lr and grad_clip must be > 0")
        _require(len(self.lags) > 0 and all(k > 0 for k in self.lags), "dynamics.lags must be positive")
        _require(self.fidelity_rows > 0 and self.time_budget_s >= 0, "dynamics.fidelity_rows > 0")


@dataclass(frozen=True)
class ValueTrainConfig:
    train_prompts: int = 256
    heldout_prompts: int = 64
    rollouts: int = 2                # sampled completions per prompt, whose answer positions are branched
    temperature: float = 1.0
    max_new_tokens: int = 8
    branch_top_k: int = 4            # candidates per branch point (the planner's top_k)
    branch_rollouts: int = 2         # completions per candidate: its Monte-Carlo return
    branch_temperature: float = 1.0
    epochs: int = 4
    batch_rollouts: int = 256        # candidate states replayed per optimiser step
    rollout_sessions: int = 256      # engine slots for the rollouts
    lr: float = 1e-3
    weight_decay: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.train_prompts > 0 and self.heldout_prompts > 0 and self.rollouts > 0,
                 "value.train_prompts, heldout_prompts and rollouts must be > 0")
        _require(self.temperature > 0 and self.max_new_tokens > 0, "value.temperature, max_new_tokens > 0")
        _require(self.epochs > 0 and self.batch_rollouts > 0 and self.lr > 0 and self.rollout_sessions > 0,
                 "value.epochs, batch_rollouts, rollout_sessions and lr must be > 0")
        _require(self.branch_top_k > 0 and self.branch_rollouts > 0 and self.branch_temperature > 0,
                 "value.branch_top_k, branch_rollouts and branch_temperature must be > 0")


@dataclass(frozen=True)
class AssembleConfig:
    dtype: str = "bf16"              # dtype of the shipped weights; loading casts to the runtime dtype
    out_dir: str = ""                # "" = <out_dir>/model
    sample_tokens: int = 200         # length of the sample continuations in the report

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"assemble.dtype must be one of {sorted(DTYPES)}")
        _require(self.sample_tokens > 0, "assemble.sample_tokens must be > 0")


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 200
    max_new_tokens: int = 8
    best_of_n: int = 0               # 0 = the GPU time of (b), in runs of (a)
    oracle_k: int = 8                # samples of the oracle ceiling, pass@k
    temperature: float = 1.0         # for best-of-N and oracle samples
    lead_window: int = 2             # (b): answer tokens planned synchronously before the rest streams
    out: str = "docs/evaluation.md"

    def __post_init__(self) -> None:
        _require(self.prompts > 0 and self.max_new_tokens > 0 and self.best_of_n >= 0 and self.oracle_k > 0
                 and self.lead_window >= 0, "eval.prompts, max_new_tokens, oracle_k > 0; best_of_n, lead_window >= 0")


@dataclass(frozen=True)
class TrainConfig:
    name: str
    model: MambaConfig
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"             # auto = cuda when available
    tasks: TaskSpec = field(default_factory=TaskSpec)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneTrainConfig = field(default_factory=BackboneTrainConfig)
    dynamics: DynamicsTrainConfig = field(default_factory=DynamicsTrainConfig)
    value: ValueTrainConfig = field(default_factory=ValueTrainConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deliberation: dict[str, Any] = field(default_factory=dict)  # defaults written to crsm.json

    def __post_init__(self) -> None:
        _require(self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda")
        deliberation_config(self.deliberation)  # fail now, not after hours of training

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    @property
    def model_dir(self) -> Path:
        return Path(self.assemble.out_dir) if self.assemble.out_dir else self.out_path / "model"

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


DTYPES = {"bf16", "fp16", "fp32"}


def deliberation_config(settings: dict[str, Any]) -> DeliberationConfig:
    """The `deliberation` section as a validated DeliberationConfig (missing keys take its defaults)."""
    try:
        return DeliberationConfig.from_dict(settings)
    except ValueError as e:
        raise ConfigError(f"deliberation: {e}") from e


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is MambaConfig:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return MambaConfig.from_dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{where}: expected {len(item_types)} items, got {len(value)}")
        return tuple(_convert(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def build(cls: type, raw: Any, where: str = "config") -> Any:
    """A dataclass instance from a mapping: unknown keys rejected, each value converted by its field type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    values = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in raw.items()}
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from e
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """configs/NAME.yaml -> TrainConfig. `overrides` replace top-level fields (e.g. out_dir, device)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    raw = dict(raw or {})
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return build(TrainConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
