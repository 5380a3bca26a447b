"""Reference backbone: chunked prefill agrees with the step recurrence and composes over splits."""
import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=[dict(), dict(d_intermediate=96), dict(ssm_ngroups=2)], ids=["plain", "mlp", "groups2"])
def model(request):
    overrides = dict(request.param)
    if overrides.pop("ssm_ngroups", None):
        from crsm_core.config import SSMConfig
        overrides["ssm_cfg"] = SSMConfig(d_state=16, headdim=16, ngroups=2, chunk_size=16)
    torch.manual_seed(0)
    return MambaLM(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("length", [16, 32, 37, 5])
@torch.no_grad()
def test_chunked_prefill_equals_step_recurrence(model, length):
    # 16 and 32 are multiples of the chunk size (16), 37 and 5 are not.
    ids = torch.randint(0, 256, (3, length))
    prefill_state = model.allocate_state(3)
    logits = model(ids, prefill_state)
    step_state = model.allocate_state(3)
    stepped = torch.stack([model.step(ids[:, t], step_state) for t in range(length)], dim=1)
    assert logits.shape == (3, length, model.config.vocab_size)
    assert rel(logits, stepped) <= 1e-5
    assert rel(prefill_state.ssm, step_state.ssm) <= 1e-5
    assert rel(prefill_state.conv, step_state.conv) <= 1e-5


@pytest.mark.parametrize("split", [1, 7, 16, 20])
@torch.no_grad()
def test_prefill_composes_over_a_split(model, split):
    ids = torch.randint(0, 256, (2, 41))
    whole = model.allocate_state(2)
    whole_logits = model(ids, whole)
    parts = model.allocate_state(2)
    first = model(ids[:, :split], parts)
    second = model(ids[:, split:], parts)
    assert rel(torch.cat([first, second], 1), whole_logits) <= 1e-5
    assert rel(parts.ssm, whole.ssm) <= 1e-5
    assert rel(parts.conv, whole.conv) <= 1e-5


@torch.no_grad()
def test_rows_are_independent(model):
    # A row's logits do not depend on what the other rows of the batch hold.
    ids = torch.randint(0, 256, (4, 9))
    batch_state = model.allocate_state(4)
    batch_logits = model(ids, batch_state)
    alone_state = model.allocate_state(1)
    alone_logits = model(ids[2:3], alone_state)
    assert rel(batch_logits[2:3], alone_logits) <= 1e-6


@torch.no_grad()
def test_prefill_returns_last_position_and_training_forward_keeps_no_state(model):
    ids = torch.randint(0, 256, (1, 10))
    state = model.allocate_state(1)
    last = model.prefill(ids, state)
    full = model(ids)  # no state: starts from zeros
    assert last.shape == (1, model.config.vocab_size)
    assert rel(last, full[:, -1]) <= 1e-6
    assert state.ssm.abs().sum() > 0


@torch.no_grad()
def test_step_rows_steps_the_chosen_rows_of_a_pool(model):
    # By row index: entries 0 and 2 read the same row and write two others; rows neither read nor
    # written keep their bits; in place (no dst_rows) it is a step of those rows.
    pool = model.allocate_state(6)
    model(torch.randint(0, 256, (6, 9)), pool)
    src, dst = torch.tensor([4, 1, 4]), torch.tensor([0, 5, 2])
    tokens = torch.randint(0, 256, (3,))
    stepped = pool.gather(src)
    want = model.step(tokens, stepped)
    got_pool = pool.clone()
    got = model.step_rows(tokens, got_pool, src, dst)
    assert torch.equal(got, want)
    assert torch.equal(got_pool.gather(dst).ssm, stepped.ssm) and torch.equal(got_pool.gather(dst).conv, stepped.conv)
    for row in (1, 3, 4):
        assert torch.equal(got_pool.gather([row]).ssm, pool.gather([row]).ssm)
    # (against a step of the same two rows: a batch of another size may round differently)
    in_place, two = pool.clone(), pool.gather(src[:2])
    model.step(tokens[:2], two)
    model.step_rows(tokens[:2], in_place, src[:2])
    assert torch.equal(in_place.gather(src[:2]).ssm, two.ssm) and torch.equal(in_place.gather(src[:2]).conv, two.conv)
    with pytest.raises(ValueError, match="must match the tokens"):
        model.step_rows(tokens, pool, src[:2])
