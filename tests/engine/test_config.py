"""MoEConfig <-> Hugging Face config dicts, including transformers' own, and validation."""

from __future__ import annotations

import pytest

from emoe.core.errors import ConfigError
from emoe.engine.config import MoEConfig

from .conftest import FAMILIES, make_hf_model


def test_from_transformers_configs(family):
    hf_cfg = make_hf_model(family).config.to_dict()
    cfg = MoEConfig.from_hf_dict(hf_cfg)
    assert cfg.model_type == family
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 2, 4, 2, 16)
    extra = FAMILIES[family][2]
    assert cfg.num_experts == extra.get("num_local_experts", extra.get("num_experts"))
    assert cfg.intermediate_size == extra.get("moe_intermediate_size", extra["intermediate_size"])
    assert cfg.norm_topk_prob == (family == "mixtral")
    assert cfg.shared_expert_intermediate_size == (40 if family == "qwen2_moe" else 0)
    assert cfg.qk_norm == (family == "olmoe")
    assert MoEConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_to_hf_dict_is_read_by_transformers(family):
    import transformers
    cfg = MoEConfig.from_hf_dict(make_hf_model(family).config.to_dict())
    config_cls = getattr(transformers, FAMILIES[family][0])
    assert MoEConfig.from_hf_dict(config_cls(**cfg.to_hf_dict()).to_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": None}, "missing field 'num_hidden_layers'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ({"sliding_window": 16}, "sliding_window 16 < max_position_embeddings"),
    ({"num_experts_per_tok": 9}, "top_k: 9 exceeds num_experts 4"),
    ({"num_key_value_heads": 3}, "num_kv_heads: 3 must divide num_heads 4"),
])
def test_bad_fields_are_named(change, message):
    d = make_hf_model("mixtral").config.to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        MoEConfig.from_hf_dict(d, source="ckpt/config.json")


def test_qwen_dense_layers_rejected():
    d = make_hf_model("qwen2_moe").config.to_dict()
    d["mlp_only_layers"] = [1]
    with pytest.raises(ConfigError, match="ckpt/config.json: mlp_only_layers \\[1\\]"):
        MoEConfig.from_hf_dict(d, source="ckpt/config.json")


def test_model_spec_sizes():
    cfg = MoEConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, num_experts=4, top_k=2)
    spec = cfg.to_model_spec("tiny", dtype="bfloat16")
    assert spec.expert_bytes == 3 * 8 * 16 * 2
    assert spec.kv_bytes_per_token == 2 * 2 * 1 * 4 * 2
    from emoe.engine.model import MoEModel
    n = sum(p.numel() for p in MoEModel(cfg).parameters())
    assert cfg.num_params() == n
    assert spec.non_expert_bytes + spec.all_experts_bytes == 2 * n
