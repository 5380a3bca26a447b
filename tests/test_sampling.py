import pytest
import torch

from crsm_core.sampling import SamplingParams, filter_logits, sample_batch, sample_row


def test_greedy_takes_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    params = [SamplingParams(temperature=0.0)] * 2
    gens = [p.make_generator("cpu") for p in params]
    assert sample_batch(logits, params, gens).tolist() == [1, 0]


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # top_p 0.7: 0.5 then 0.3 reaches it; the rest goes
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, 0, 0.4)).tolist() == [False, True, True, True]


def test_seeded_rows_do_not_depend_on_neighbours():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.8, seed=3),
              SamplingParams(temperature=1.2, top_k=5, seed=11)]
    together = [sample_batch(logits, params, [p.make_generator("cpu") for p in params]).tolist()
                for _ in range(1)][0]
    alone = [sample_row(logits[i], p, p.make_generator("cpu")) for i, p in enumerate(params)]
    assert together == alone


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_row(logits, SamplingParams(), gen) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
