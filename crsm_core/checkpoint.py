"""Checkpoint directories.

Ours: `config.json` + `model.safetensors` (+ tokenizer files, + deliberation components as
`<name>.safetensors` + `<name>.json`). A mamba_ssm checkpoint (`config.json` + `pytorch_model.bin`, as
state-spaces publishes its Mamba-2 models) loads as it is: the parameter names are the same.
Every failure names the file and what is wrong with it.
"""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import MambaLM, build_backbone
from .config import ConfigError, MambaConfig
from .files import check_directory, os_problem, read_text
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"


class CheckpointError(RuntimeError):
    pass


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        path.open("rb").close()  # safetensors reports an unreadable file as not found
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"{path}: {os_problem(e)}") from e
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable weights file ({e})") from e


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: Path,
                     optional: frozenset[str] = frozenset()) -> None:
    """Raise a CheckpointError naming the file and every mismatch (missing, unexpected, shape)."""
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file has {tuple(found[k].shape)}, config expects {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]))
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def save_pretrained(model: MambaLM, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")  # shares storage with the embedding; safetensors stores it once
    save_file(tensors, str(directory / SAFETENSORS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)
    log.info("saved backbone (%d tensors) to %s", len(tensors), directory)
    return directory


def load_config(directory: str | Path) -> MambaConfig:
    directory = Path(directory)
    check_directory(directory, CheckpointError)
    try:
        return MambaConfig.load(directory / CONFIG)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def load_pretrained(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    impl: str = "auto") -> MambaLM:
    directory = Path(directory)
    config = load_config(directory)
    weights = directory / SAFETENSORS
    if not weights.exists():
        weights = directory / TORCH_BIN
    if not weights.exists():
        raise CheckpointError(f"{directory}: neither {SAFETENSORS} nor {TORCH_BIN} found")
    tensors = _read_tensors(weights)
    # The model is built once and checked against the file before its weights are loaded. (A model built
    # on the meta device to check first cost more than the check: initialising meta tensors imports
    # torch._dynamo, 1.3 s on the CPU.)
    model = build_backbone(config, device=device, dtype=dtype, impl=impl)
    tied = frozenset({"lm_head.weight"}) if config.tie_embeddings else frozenset()
    check_state_dict(model.state_dict(), tensors, weights, optional=tied)
    model.load_state_dict(tensors, strict=False, assign=False)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    log.info("loaded %s (%s, %.1fM parameters, %s backbone)", directory, weights.name,
             model.num_parameters() / 1e6, model.kernels.name)
    return model.eval()


def save_component(directory: str | Path, name: str, module: torch.nn.Module, config: dict[str, Any]) -> None:
    """A deliberation part (dynamics, value heads) as `<name>.safetensors` + `<name>.json`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(directory / f"{name}.safetensors"), metadata={"format": "pt"})


def has_component(directory: str | Path, name: str) -> bool:
    return (Path(directory) / f"{name}.safetensors").exists()


def load_component_state(directory: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    config_path = directory / f"{name}.json"
    try:
        config = json.loads(read_text(config_path, CheckpointError))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    return _read_tensors(directory / f"{name}.safetensors"), config


def load_component(directory: str | Path, name: str, module: torch.nn.Module) -> None:
    """Load `<name>.safetensors` into an already-built module, checking names and shapes."""
    tensors, _ = load_component_state(directory, name)
    check_state_dict(module.state_dict(), tensors, Path(directory) / f"{name}.safetensors")
    module.load_state_dict(tensors)
