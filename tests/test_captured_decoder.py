"""CapturedDecoder's bucketing and its eager path, and CapturedPrefill's eager path: the batched rows,
the cut into pieces, a failing call (on the CPU there is nothing to capture; the graph replays
themselves are checked on the GPU in tests/gpu/test_fused.py and tests/gpu/test_engine_gpu.py)."""
import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.backbone.graphs import CapturedDecoder, CapturedPrefill, binary_pieces, default_buckets
from crsm_core.config import tiny_config


def test_buckets_double_up_to_max_batch():
    assert default_buckets(1) == (1,)
    assert default_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        default_buckets(0)


@torch.no_grad()
def test_step_advances_the_front_rows_of_the_pool_like_model_step():
    torch.manual_seed(0)
    model = MambaLM(tiny_config()).eval()
    decoder = CapturedDecoder(model, max_batch=8)
    assert not decoder.graphed and decoder.pool.batch == 8
    assert decoder.bucket_for(3) == 4 and decoder.bucket_for(8) == 8
    with pytest.raises(ValueError, match="batch 9 exceeds max_batch=8"):
        decoder.bucket_for(9)

    prompt = torch.randint(0, 256, (3, 11))
    model(prompt, decoder.pool.rows(slice(0, 3)))
    decoder.pool.rows(slice(3, 8)).ssm.fill_(7.0)   # rows outside the step must stay as they are
    expected = decoder.pool.rows(slice(0, 3)).clone()
    for t in range(4):
        tokens = torch.randint(0, 256, (3,))
        logits = decoder.step(tokens)
        want = model.step(tokens, expected)
        assert logits.shape == (3, model.config.vocab_size)
        torch.testing.assert_close(logits, want, rtol=0, atol=0)
    torch.testing.assert_close(decoder.pool.rows(slice(0, 3)).ssm, expected.ssm, rtol=0, atol=0)
    torch.testing.assert_close(decoder.pool.rows(slice(0, 3)).conv, expected.conv, rtol=0, atol=0)
    assert bool((decoder.pool.rows(slice(3, 8)).ssm == 7.0).all())
    with pytest.raises(ValueError, match="batch 9 exceeds max_batch=8"):
        decoder.step(torch.zeros(9, dtype=torch.long))


def test_a_pool_smaller_than_max_batch_is_refused():
    model = MambaLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="pool has 4 rows, fewer than max_batch=8"):
        CapturedDecoder(model, max_batch=8, pool=model.allocate_state(4))


def test_prefill_pieces_take_the_cut_of_fewer_calls():
    model = MambaLM(tiny_config()).eval()
    prefill = CapturedPrefill(model, rows=4, budget=300)
    assert prefill.lengths == (256, 128, 64, 32, 16, 8, 4, 2, 1)
    assert binary_pieces(44) == (32, 8, 4) and binary_pieces(256) == (256,)
    assert prefill.pieces([30]) == [(30,)]                          # alone: one call, not four
    assert prefill.pieces([12, 12, 16]) == [(12,), (12,), (16,)]    # two lengths: two calls
    assert prefill.pieces([9, 10, 11, 12]) == [(9,), (10,), (11,), (12,)]   # 4 calls either way: fewer pieces
    assert prefill.pieces([9, 10, 11, 13, 14]) == [(8, 1), (8, 2), (8, 2, 1), (8, 4, 1), (8, 4, 2)]  # 4 < 5


class FailingPrefill(MambaLM):
    def prefill(self, ids, state):
        out = super().prefill(ids, state)   # the state is written: the failure comes after
        if bool((ids == 7).any()):
            raise RuntimeError("failed on purpose")
        return out


@torch.no_grad()
def test_batched_prefill_rows_are_each_prompt_alone_and_a_failed_call_changes_nothing():
    torch.manual_seed(0)
    model = FailingPrefill(tiny_config()).eval()
    prefill = CapturedPrefill(model, rows=4, budget=64)
    prompts = {1: torch.randint(8, 256, (40,)), 3: torch.randint(8, 256, (40,))}
    for row in prompts:
        prefill.begin(row)
    logits = prefill.feed([3, 1], torch.stack([prompts[3][:24], prompts[1][:24]]))
    logits = prefill.feed([1, 3], torch.stack([prompts[1][24:], prompts[3][24:]]))
    for i, row in enumerate((1, 3)):
        alone = model.allocate_state(1)
        want = model.prefill(prompts[row][None], alone)
        torch.testing.assert_close(logits[i:i + 1], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefill.state(row).ssm, alone.ssm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefill.state(row).conv, alone.conv, rtol=1e-5, atol=1e-5)
    before = prefill.pool.clone()
    with pytest.raises(RuntimeError, match="on purpose"):
        prefill.feed([1, 3], torch.tensor([[1, 2], [7, 7]]))
    assert torch.equal(prefill.pool.ssm, before.ssm) and torch.equal(prefill.pool.conv, before.conv)
    with pytest.raises(ValueError, match="a prefill feed takes"):
        prefill.feed([1], torch.zeros(1, 65, dtype=torch.long))      # past the budget
