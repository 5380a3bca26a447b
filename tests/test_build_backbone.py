"""build_backbone: which kernels it picks, in which dtype, and the errors when the fused one cannot run."""
import importlib.util

import pytest
import torch

from crsm_core.backbone import REFERENCE_KERNELS, build_backbone, fused_available, resolve_impl
from crsm_core.config import tiny_config


def test_auto_on_cpu_is_the_fp32_reference_in_eval_mode():
    model = build_backbone(tiny_config(), "cpu")
    assert model.kernels is REFERENCE_KERNELS
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not model.training
    assert all(block.mixer.kernels is REFERENCE_KERNELS for block in model.backbone.layers)


def test_explicit_dtype_overrides_the_default():
    model = build_backbone(tiny_config(), "cpu", dtype=torch.bfloat16, impl="reference")
    assert model.dtype == torch.bfloat16
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model.step(torch.tensor([1, 2]), model.allocate_state(2))
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 260)


@pytest.mark.parametrize("impl", ["fused", "fused_step"])
def test_fused_on_the_cpu_device_is_refused(impl):
    with pytest.raises(ValueError, match=f"the {impl} backbone runs on a CUDA device, not 'cpu'"):
        build_backbone(tiny_config(), "cpu", impl=impl)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'reference', 'fused', 'fused_step'\), got 'triton'"):
        build_backbone(tiny_config(), "cpu", impl="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_fused_without_cuda_names_the_missing_device():
    assert not fused_available()
    with pytest.raises(RuntimeError, match="needs CUDA, and no CUDA device is available"):
        build_backbone(tiny_config(), "cuda", impl="fused")


def test_fused_without_mamba_ssm_names_the_package(monkeypatch):
    # A CUDA machine without mamba_ssm: auto falls back to the reference, an explicit request fails.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mamba_ssm" else real_find_spec(name, *a))
    assert not fused_available()
    assert resolve_impl("auto", "cuda") == "reference"
    for impl in ("fused", "fused_step"):
        with pytest.raises(RuntimeError, match=rf"the {impl} backbone needs mamba_ssm \(pip install 'crsm-server\[gpu\]'\)"):
            resolve_impl(impl, "cuda")


def test_auto_picks_fused_when_cuda_and_mamba_ssm_are_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "mamba_ssm" else real_find_spec(name, *a))
    assert fused_available()
    assert resolve_impl("auto", "cuda") == "fused"
    assert resolve_impl("auto", "cpu") == "reference"   # the device decides first
    assert resolve_impl("reference", "cuda") == "reference"
    assert resolve_impl("fused_step", "cuda") == "fused_step"
