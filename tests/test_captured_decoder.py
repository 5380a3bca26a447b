"""CapturedDecoder's bucketing and its eager path (on the CPU there is nothing to capture; the graph
replay itself is checked against the reference on the GPU in tests/gpu/test_fused.py)."""
import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.backbone.graphs import CapturedDecoder, default_buckets
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
