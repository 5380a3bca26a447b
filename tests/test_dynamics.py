"""Latent dynamics: same interface as the backbone step, fidelity against exact steps, cost bound."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from crsm_core.backbone import MambaLM
from crsm_core.config import MambaConfig, tiny_config
from crsm_core.dynamics import DynamicsConfig, LatentDynamics, backbone_step_cost, distillation_loss, fidelity

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLM(tiny_config()).eval()


def prefilled(model, batch=4, length=12):
    state = model.allocate_state(batch)
    with torch.no_grad():
        logits = model.prefill(torch.randint(0, 256, (batch, length)), state)
    return state, logits


@torch.no_grad()
def test_step_matches_functional_forward_and_advances_in_place(model):
    dyn = LatentDynamics(DynamicsConfig.for_model(model.config, rank=8), model)
    with torch.no_grad():
        for p in dyn.parameters():       # non-zero write weights so every path matters
            p.add_(0.05 * torch.randn_like(p))
    state, _ = prefilled(model)
    tokens = torch.randint(0, 256, (4,))
    logits_f, conv_f, ssm_f = dyn(tokens, state.conv, state.ssm)
    before = state.clone()
    logits = dyn.step(tokens, state)
    assert logits.shape == (4, model.config.vocab_size)
    assert torch.allclose(logits, logits_f, atol=1e-5)
    assert torch.allclose(state.ssm, ssm_f, atol=1e-6) and torch.equal(state.conv, conv_f)
    # the conv window is shifted by one column
    assert torch.equal(state.conv[..., :-1], before.conv[..., 1:])
    assert not torch.equal(state.ssm, before.ssm)


def test_fidelity_exact_is_perfect_and_training_improves_the_latent_model(model):
    torch.manual_seed(1)
    state, _ = prefilled(model, batch=8, length=16)
    tokens = torch.randint(0, 256, (8, 8))
    perfect = fidelity(model, model.step, state, tokens, lags=(1, 3, 8))
    assert [r.lag for r in perfect] == [1, 3, 8]
    for r in perfect:
        assert r.cosine == pytest.approx([1.0] * 4, abs=1e-5) and max(r.rel_error) < 1e-6
        assert r.top1_agreement == 1.0

    dyn = LatentDynamics(DynamicsConfig.for_model(model.config, rank=16), model)
    untrained = fidelity(model, dyn.step, state, tokens, lags=(1, 3, 8))
    for r in untrained:
        assert all(-1.0 <= c <= 1.0 for c in r.cosine) and all(e >= 0 for e in r.rel_error)
    # a short distillation on random contexts lowers the held-out loss and the one-step state error
    held_out, held_tokens = prefilled(model, batch=16, length=10)[0], torch.randint(0, 256, (16,))
    loss_before = distillation_loss(dyn, model, held_out, held_tokens).item()
    contexts = [prefilled(model, batch=32, length=n)[0] for n in (4, 8, 12, 16, 20)]
    opt = torch.optim.Adam(dyn.parameters(), lr=3e-3)
    for i in range(150):
        loss = distillation_loss(dyn, model, contexts[i % 5], torch.randint(0, 256, (32,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_after = distillation_loss(dyn, model, held_out, held_tokens).item()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    trained = fidelity(model, dyn.step, state, tokens, lags=(1, 3, 8))
    assert sum(trained[0].rel_error) < sum(untrained[0].rel_error)
    assert sum(trained[0].cosine) > sum(untrained[0].cosine)


def test_save_load_round_trip(model, tmp_path):
    dyn = LatentDynamics(DynamicsConfig.for_model(model.config, rank=8), model)
    with torch.no_grad():
        dyn.write.normal_(0, 0.1)
    dyn.save(tmp_path)
    loaded = LatentDynamics.load(tmp_path, model)
    assert loaded.config == dyn.config
    assert set(loaded.state_dict()) == set(dyn.state_dict())   # borrowed backbone tensors are not saved
    state, _ = prefilled(model)
    a, b = state.clone(), state.clone()
    tokens = torch.randint(0, 256, (4,))
    with torch.no_grad():
        assert torch.equal(loaded.step(tokens, a), dyn.step(tokens, b))


@pytest.mark.slow
@torch.no_grad()
def test_cost_is_below_a_tenth_of_a_backbone_step_at_768x24():
    config = MambaConfig()   # d_model 768, 24 layers, vocab 50277: mamba2-130m's shape
    torch.manual_seed(0)
    backbone = MambaLM(config).eval()
    dyn = LatentDynamics(DynamicsConfig.for_model(config, rank=32), backbone).eval()
    bb, dc = backbone_step_cost(config), dyn.step_cost()
    # the matrix-product part of both counts agrees with torch's own flop counter
    state, token = backbone.allocate_state(1), torch.tensor([5])
    with FlopCounterMode(display=False) as counter:
        backbone.step(token, state)
    assert counter.get_total_flops() == bb.matmul
    with FlopCounterMode(display=False) as counter:
        dyn.step(token, state)
    assert counter.get_total_flops() == dc.matmul
    assert dc.total / bb.total <= 0.10, dc.total / bb.total
    n_dyn = sum(p.numel() for p in dyn.parameters())
    assert n_dyn / backbone.num_parameters() <= 0.10
