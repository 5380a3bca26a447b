import json

import pytest
import torch

from crsm_core.backbone import MambaLM
from crsm_core.checkpoint import CheckpointError, load_pretrained, save_pretrained, save_component, \
    load_component
from crsm_core.config import MambaConfig, tiny_config
from crsm_core.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MambaLM(tiny_config()).eval()


def test_round_trip_is_bit_exact(model, tmp_path):
    save_pretrained(model, tmp_path, ByteTokenizer())
    loaded = load_pretrained(tmp_path, impl="reference")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embedding.weight.data_ptr()
    ids = torch.randint(0, 256, (2, 11))
    assert torch.equal(model(ids), loaded(ids))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_mamba_ssm_layout_loads_and_gives_the_same_logits(model, tmp_path):
    # A mamba_ssm checkpoint: config.json as MambaLMHeadModel writes it (with its attention fields and a
    # partial ssm_cfg) and pytorch_model.bin holding the tied lm_head explicitly.
    cfg = model.config.to_dict()
    cfg["attn_layer_idx"], cfg["attn_cfg"] = [], {}
    del cfg["norm_epsilon"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
    loaded = load_pretrained(tmp_path, impl="reference")
    ids = torch.randint(0, 256, (1, 23))
    assert torch.equal(loaded(ids), model(ids))


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config.json: file not found"):
        load_pretrained(tmp_path)
    tiny_config().save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load_pretrained(tmp_path)


def test_corrupt_files_are_named(model, tmp_path):
    save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layers": 2}))
    with pytest.raises(CheckpointError, match=r"config.json: unknown config fields: \['n_layers'\]"):
        load_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(model, tmp_path):
    save_pretrained(model, tmp_path)
    bigger = MambaConfig.from_dict({**model.config.to_dict(), "d_model": 128})
    bigger.save(tmp_path / "config.json")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.safetensors" in msg and "backbone.embedding.weight" in msg
    assert "file has (264, 64), config expects (264, 128)" in msg


def test_missing_and_unexpected_tensors(model, tmp_path):
    sd = {k: v for k, v in model.state_dict().items() if "layers.3" not in k}
    sd["extra.weight"] = torch.zeros(1)
    model.config.save(tmp_path / "config.json")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: missing tensors \['backbone.layers.3"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['extra.weight'\]"):
        load_pretrained(tmp_path)


def test_component_round_trip_and_mismatch(tmp_path):
    head = torch.nn.Linear(4, 2)
    save_component(tmp_path, "value_heads", head, {"hidden": 4})
    other = torch.nn.Linear(4, 2)
    load_component(tmp_path, "value_heads", other)
    assert torch.equal(other.weight, head.weight)
    with pytest.raises(CheckpointError, match=r"value_heads.safetensors: shape mismatch"):
        load_component(tmp_path, "value_heads", torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match=r"dynamics.json: file not found"):
        load_component(tmp_path, "dynamics", head)
