"""The simulator's model spec, read from config.json without torch, against the bytes the engine
really holds for the same checkpoint (all three families, as transformers writes them)."""

from __future__ import annotations

import json

import pytest

from emoe.core.errors import ConfigError
from emoe.core.model_config import model_spec_from
from emoe.core.specs import MODEL_CONFIGS, get_model


def engine_bytes(folder, dtype: str):
    """(bytes per routed expert, every other weight byte, shared-expert bytes, KV bytes per
    token) of the model as the engine loads it."""
    from emoe.engine.checkpoint import load_model
    from emoe.engine.engine import Engine

    model = load_model(folder, dtype=dtype)
    config = model.config
    routed = other = shared = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if ".moe.experts." in name:
            routed += nbytes
        else:
            other += nbytes
            shared += nbytes if ".shared." in name else 0
    cache = Engine(model, max_batch_size=2, max_seq_len=8).cache
    kv = (cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size())
    return (routed // (config.num_layers * config.num_experts), other, shared,
            kv // (cache.num_slots * cache.max_seq_len))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_spec_from_config_matches_the_engines_bytes(hf_checkpoints, family, dtype):
    _, folder = hf_checkpoints[family]
    spec = model_spec_from(folder / "config.json", dtype=dtype)
    assert model_spec_from(folder, dtype=dtype) == spec
    expert, other, shared, kv = engine_bytes(folder, dtype)
    assert (spec.expert_bytes, spec.non_expert_bytes, spec.shared_expert_bytes,
            spec.kv_bytes_per_token) == (expert, other, shared, kv)
    assert (family == "qwen2_moe") == (spec.shared_expert_bytes > 0)
    assert spec.name == folder.name and spec.max_context == 256
    assert spec.param_bytes == (4 if dtype == "float32" else 2)
    assert str(folder / "config.json") in spec.provenance and family in spec.provenance


def test_stored_dtype_is_read_from_the_safetensors_header(hf_checkpoints):
    _, folder = hf_checkpoints["mixtral"]  # transformers saved float32 weights
    assert model_spec_from(folder).param_bytes == 4
    reference = get_model("emoe/engine/reference/emoe-tiny")  # stored as bfloat16
    assert reference.param_bytes == 2 and reference.max_context == 256


@pytest.mark.parametrize("preset, total, active", [
    ("mixtral-8x7b", 46.7e9, 12.9e9), ("mixtral-8x22b", 140.6e9, 39.2e9),
    ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9), ("olmoe-1b-7b", 6.9e9, 1.3e9)])
def test_presets_are_published_configs_with_their_published_sizes(preset, total, active):
    spec = get_model(preset)
    params = (spec.non_expert_bytes + spec.all_experts_bytes) / spec.param_bytes
    assert params == pytest.approx(total, rel=0.005)
    assert spec.active_bytes_per_token / spec.param_bytes == pytest.approx(active, rel=0.02)
    assert spec.provenance.startswith(f"preset {preset}: ") and "config.json" in spec.provenance
    assert MODEL_CONFIGS[preset][0]["torch_dtype"] == "bfloat16"
    assert get_model("mixtral-8x7b").max_context == 32768


def test_unsupported_architecture_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3",
                                                      "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"config.json: model_type 'deepseek_v3' is not "
                                          r"supported; supported: mixtral, qwen2_moe, olmoe"):
        model_spec_from(tmp_path)


def test_unknown_model_lists_presets_and_says_what_else_works(tmp_path):
    with pytest.raises(ConfigError, match="not a preset .*mixtral-8x7b.*no such Hugging Face "
                                          "model folder or config.json"):
        get_model("mixtral-7x8b")
    with pytest.raises(ConfigError, match="no config.json"):
        model_spec_from(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json:1: not valid JSON"):
        model_spec_from(tmp_path)
