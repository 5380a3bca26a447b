"""The fused decode-step kernels (backbone/step_kernels.py) in Triton's CPU interpreter, against the
reference backbone: small shapes, a few steps, fp32 and bf16, the GEMV (1 row) and the tl.dot (2+ rows)
paths, in place and by row index. tests/gpu/test_step_kernels_gpu.py runs the compiled kernels.

Skipped where triton is not installed (the CPU install has no triton) and on CUDA machines (where the
interpreter would also take over every other Triton kernel of the process). To run them here:
`pip install --target DIR triton==3.6.0`, then `PYTHONPATH=.:DIR pytest tests/test_step_kernels.py` (the
kernels' tests are marked `slow`: seconds each in the interpreter).
"""
import dataclasses
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (the CPU install has none; the kernels need it)", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("on a CUDA machine tests/gpu/test_step_kernels_gpu.py runs the compiled kernels",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"   # read when the kernels are decorated, i.e. at the import below

from crsm_core.backbone import step_kernels  # noqa: E402
from crsm_core.backbone.model import REFERENCE_KERNELS, MambaLM  # noqa: E402
from crsm_core.config import ConfigError, SSMConfig, tiny_config  # noqa: E402

STEP_KERNELS = dataclasses.replace(REFERENCE_KERNELS, name="fused_step (interpreted)",
                                   decode_step=step_kernels.decode_step)
FP32 = 1e-5   # relative; measured here: logits 6e-7, states 3e-7 after 4 steps
BF16 = 1e-2   # bf16 against the bf16 reference (same rounding plan; measured here: equal)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def pair(dtype: torch.dtype, groups: int = 1, d_conv: int = 4, d_model: int = 64):
    """(reference, step-kernel model) with the same weights, 2 layers."""
    torch.manual_seed(0)
    config = tiny_config(n_layer=2, d_model=d_model,
                         ssm_cfg=SSMConfig(d_state=16, headdim=16, ngroups=groups, d_conv=d_conv, chunk_size=16))
    reference = MambaLM(config).eval().to(dtype)
    fast = MambaLM(config, STEP_KERNELS).eval().to(dtype)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


@pytest.mark.slow
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32), (torch.bfloat16, BF16)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3], ids=["gemv", "dot"])
@torch.no_grad()
def test_steps_follow_the_reference(dtype, bound, batch):
    reference, fast = pair(dtype)
    want = reference.allocate_state(batch)
    reference(torch.randint(0, 256, (batch, 9)), want)     # a prefilled, non-zero state
    got = want.clone()
    for _ in range(3):
        tokens = torch.randint(0, 256, (batch,))
        logits = fast.step(tokens, got)
        expected = reference.step(tokens, want)
        assert logits.dtype == dtype and logits.shape == expected.shape
        assert rel(logits, expected) <= bound
    assert rel(got.ssm, want.ssm) <= bound
    assert rel(got.conv, want.conv) <= bound


@pytest.mark.slow
@torch.no_grad()
def test_batched_steps_read_each_rows_token_from_a_strided_column():
    # Step t fed decode[:, t], a column of the [B, S] token matrix (stride S), as the GPU parity run's
    # eager path does. The kernels once read entry m at offset m, i.e. row 0's later tokens: every row
    # but the first stepped the wrong token (there: logits error 1.34, top-1 agreement 1/16 at batch 16).
    batch = 16
    reference, fast = pair(torch.float32)
    want = reference.allocate_state(batch)
    reference(torch.randint(0, 256, (batch, 5)), want)
    got = want.clone()
    decode = torch.randint(0, 256, (batch, 3))
    for t in range(2):
        assert not decode[:, t].is_contiguous()
        logits, expected = fast.step(decode[:, t], got), reference.step(decode[:, t], want)
        assert rel(logits, expected) <= FP32
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert rel(got.ssm, want.ssm) <= FP32 and rel(got.conv, want.conv) <= FP32


@pytest.mark.slow
@torch.no_grad()
def test_rows_are_read_from_strided_index_vectors():
    # src and dst as the columns of one [M, 2] table of (parent, child) rows
    reference, fast = pair(torch.float32)
    pool = reference.allocate_state(7)
    reference(torch.randint(0, 256, (7, 5)), pool)
    table = torch.tensor([[4, 0], [1, 5], [6, 2]])
    src, dst = table[:, 0], table[:, 1]
    assert not src.is_contiguous()
    tokens = torch.randint(0, 256, (6,))[::2]
    stepped = pool.gather(src)
    want = reference.step(tokens, stepped)
    got_pool = pool.clone()
    assert rel(fast.step_rows(tokens, got_pool, src, dst), want) <= FP32
    assert rel(got_pool.gather(dst).ssm, stepped.ssm) <= FP32
    assert rel(got_pool.gather(dst).conv, stepped.conv) <= FP32
    assert torch.equal(got_pool.gather([1, 3, 4, 6]).ssm, pool.gather([1, 3, 4, 6]).ssm)


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 2])
@torch.no_grad()
def test_gemv_blocks_past_the_end_of_k_are_masked(groups):
    # d_model 48, d_inner 96: the GEMV's one K block (64, 128) runs past the end of in_proj's and
    # out_proj's rows, as at the 129M model's 768 and 1536; with 2 groups out_proj's blocks are 16 wide
    reference, fast = pair(torch.float32, groups, d_model=48)
    want = reference.allocate_state(1)
    reference(torch.randint(0, 256, (1, 5)), want)
    got = want.clone()
    for _ in range(2):
        tokens = torch.randint(0, 256, (1,))
        assert rel(fast.step(tokens, got), reference.step(tokens, want)) <= FP32
    assert rel(got.ssm, want.ssm) <= FP32 and rel(got.conv, want.conv) <= FP32


@pytest.mark.slow
@pytest.mark.parametrize("groups,d_conv", [(1, 4), (2, 3)])
@torch.no_grad()
def test_rows_are_read_and_written_by_index(groups, d_conv):
    # Entries 0 and 2 read the same row (two children of one parent) and write elsewhere; the rows
    # neither read nor written keep their bits; the sources are left as they were.
    reference, fast = pair(torch.float32, groups, d_conv)
    pool = reference.allocate_state(6)
    reference(torch.randint(0, 256, (6, 9)), pool)
    src, dst = torch.tensor([4, 1, 4]), torch.tensor([0, 5, 2])
    tokens = torch.randint(0, 256, (3,))
    stepped = pool.gather(src)
    want = reference.step(tokens, stepped)
    got_pool = pool.clone()
    got = fast.step_rows(tokens, got_pool, src, dst)
    assert rel(got, want) <= FP32
    assert rel(got_pool.gather(dst).ssm, stepped.ssm) <= FP32
    assert rel(got_pool.gather(dst).conv, stepped.conv) <= FP32
    for row in (1, 3, 4):
        assert torch.equal(got_pool.gather([row]).ssm, pool.gather([row]).ssm)
        assert torch.equal(got_pool.gather([row]).conv, pool.gather([row]).conv)


@pytest.mark.slow
@torch.no_grad()
def test_in_place_rows_match_the_layered_step_rows():
    # the same entry point on the reference (gather, step, scatter) and on the kernels (in place)
    reference, fast = pair(torch.float32)
    pool = reference.allocate_state(5)
    reference(torch.randint(0, 256, (5, 7)), pool)
    rows = torch.tensor([3, 0, 4])
    tokens = torch.randint(0, 256, (3,))
    want_pool, got_pool = pool.clone(), pool.clone()
    want = reference.step_rows(tokens, want_pool, rows)
    got = fast.step_rows(tokens, got_pool, rows)
    assert rel(got, want) <= FP32
    assert rel(got_pool.ssm, want_pool.ssm) <= FP32 and rel(got_pool.conv, want_pool.conv) <= FP32
    assert torch.equal(got_pool.gather([1, 2]).ssm, pool.gather([1, 2]).ssm)


def test_unsupported_configs_are_refused():
    with pytest.raises(ConfigError, match="without an MLP"):
        step_kernels.check_config(tiny_config(d_intermediate=96))
    with pytest.raises(ConfigError, match=r"d_conv in \[2, 4\]"):
        step_kernels.check_config(tiny_config(ssm_cfg=SSMConfig(d_state=16, headdim=16, d_conv=5)))
    step_kernels.check_config(tiny_config())


def test_out_proj_blocks_stay_in_one_group():
    # out_proj's K blocks never straddle two groups of the gated norm
    assert step_kernels._group_block(1536, 1, 2048) == 2048 and step_kernels._group_block(768, 2, 2048) == 256
