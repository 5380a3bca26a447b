"""Consensus value heads: one head per layer, their spread, and the calibrated veto threshold."""
import pytest
import torch

from crsm_core.config import tiny_config
from crsm_core.state import RecurrentState
import dataclasses

from crsm_core.value import ValueHeads, ValueHeadsConfig, calibrate_veto, spread

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


def test_each_head_reads_only_its_own_layer():
    cfg = tiny_config()
    heads = ValueHeads(ValueHeadsConfig.for_model(cfg, hidden=16))
    with torch.no_grad():
        heads.b2.copy_(torch.randn(cfg.n_layer))
        s = RecurrentState.allocate(cfg, 3)
        s.ssm.normal_()
        v = heads(s)
        assert v.shape == (3, cfg.n_layer)
        s.ssm[2].mul_(-3.0).add_(0.5)
        w = heads(s)
    changed = (w - v).abs().amax(dim=0) > 1e-6
    assert changed.tolist() == [False, False, True, False]
    # scale invariance of the features: a state scaled by 10 gets the same values
    with torch.no_grad():
        s.ssm.mul_(10.0)
        assert torch.allclose(heads(s), w, atol=1e-4)


def test_spread_and_the_calibrated_veto_threshold():
    values = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 1.0]])
    assert spread(values).tolist() == [0.0, 0.5]
    # the threshold is a percentile of the spreads seen: 99% of these states are at or below it
    probs = torch.rand(1000, 4)
    threshold = calibrate_veto(probs, 99.0)
    spreads = spread(probs)
    assert (spreads <= threshold).float().mean() == pytest.approx(0.99, abs=0.002)
    assert calibrate_veto(probs, 50.0) == pytest.approx(float(spreads.median()), abs=1e-3)
    with pytest.raises(ValueError):
        calibrate_veto(torch.empty(0, 4))


def test_save_load_round_trip(tmp_path):
    cfg = tiny_config()
    heads = ValueHeads(ValueHeadsConfig.for_model(cfg, hidden=8))
    heads.save(tmp_path)
    assert (tmp_path / "value_heads.safetensors").exists() and (tmp_path / "value_heads.json").exists()
    loaded = ValueHeads.load(tmp_path)
    s = RecurrentState.allocate(cfg, 2)
    s.ssm.normal_()
    with torch.no_grad():
        assert torch.equal(loaded(s), heads(s))
    assert loaded.config == heads.config
    # a calibrated threshold travels with the heads it was measured on
    heads.config = dataclasses.replace(heads.config, veto_threshold=0.25, veto_percentile=99.0)
    heads.save(tmp_path)
    assert ValueHeads.load(tmp_path).config.veto_threshold == 0.25
