"""model.pretrained: a local transformers directory, checked on every rank before any communication (one
process here; the sharded load is in test_real_models.py)."""

import json

import pytest

from ring_flash_attn.train.config import ConfigError, DataConfig, ModelConfig, RunConfig
from ring_flash_attn.train.model import check_model, model_config

from .helpers import save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _run_config(directory, seq_len=64, **model):
    return RunConfig(model=ModelConfig(pretrained=str(directory), **model), data=DataConfig(seq_len=seq_len))


def _check(directory, seq_len=64, **model):
    check_model(_run_config(directory, seq_len, **model), "sdpa")


def test_a_good_directory_passes_and_keeps_its_architecture(tiny):
    _check(tiny)
    hf_config = model_config(_run_config(tiny, hidden_size=999))
    assert hf_config.hidden_size == 32 and hf_config.max_position_embeddings == 64


@pytest.mark.parametrize("rope_scaling, rope_type", [
    ({"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, "llama3"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}, "yarn"),
])
def test_context_extension_settings_pass_through(tiny, rope_scaling, rope_type):
    _check(tiny, seq_len=128, rope_scaling=rope_scaling)  # builds: the settings are complete
    hf_config = model_config(_run_config(tiny, 128, rope_scaling=rope_scaling, rope_theta=5e5))
    assert hf_config.max_position_embeddings == 128
    params = hf_config.rope_parameters
    assert params["rope_type"] == rope_type and params["factor"] == 2.0 and params["rope_theta"] == 5e5


def test_seq_len_beyond_positions_needs_a_rope_setting(tiny):
    with pytest.raises(ConfigError, match=r"data.seq_len: 128 is beyond the 64 positions of model.pretrained .*; "
                                          r"set model.rope_scaling \(e.g. \{rope_type: yarn, factor: 2, "
                                          r"original_max_position_embeddings: 64\}\) or model.rope_theta"):
        _check(tiny, seq_len=128)
    _check(tiny, seq_len=128, rope_theta=40000.0)  # a larger base is a setting that allows it


def _copy(tiny, target):
    target.mkdir()
    for path in tiny.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("damage, message", [
    (lambda d: None, None),
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json cannot be read"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors or model.safetensors.index.json"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     r"model.safetensors has \d+ bytes, its header describes \d+ \(truncated or corrupt\)"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "intermediate_size": 48})),
     r"tensor model.layers.0.mlp.down_proj.weight has shape \[32, 64\] in the weights, config.json describes "
     r"\[32, 48\]"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "num_hidden_layers": 3})),
     r"the weights lack 9 tensor\(s\) config.json describes, e.g. model.layers.2"),
])
def test_bad_directories_are_one_clear_error(tiny, tmp_path, damage, message):
    directory = _copy(tiny, tmp_path / "model")
    damage(directory)
    if message is None:
        _check(directory)
        return
    with pytest.raises(ConfigError, match=rf"model.pretrained '{directory}': {message}") as info:
        _check(directory)
    assert "\n" not in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"model.pretrained '{tmp_path / 'absent'}': no such directory"):
        _check(tmp_path / "absent")
