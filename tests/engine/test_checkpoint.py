"""Checkpoint folders: round trips, sharding, the stacked layout, and errors naming file/key/field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from emoe.core.errors import ConfigError
from emoe.engine.checkpoint import CheckpointError, default_dtype, load_config, load_model, save_hf
from emoe.engine.config import MoEConfig
from emoe.engine.model import MoEModel

CFG = MoEConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                num_kv_heads=2, num_experts=3, top_k=2, max_position_embeddings=32)
IDS = torch.tensor([[1, 5, 9, 2, 7]])


@pytest.fixture
def saved(tmp_path):
    model = MoEModel(CFG).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval()
    return model, save_hf(model, tmp_path / "ckpt")


def _logits(model):
    with torch.no_grad():
        return model(IDS)


def test_round_trip_single_file(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    keys = load_file(folder / "model.safetensors").keys()
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in keys
    torch.testing.assert_close(_logits(load_model(folder)), _logits(model), atol=0, rtol=0)


def test_round_trip_sharded_with_index(tmp_path):
    cfg = CFG.replace(model_type="qwen2_moe", norm_topk_prob=False, shared_expert_intermediate_size=20,
                      attention_bias=True, tie_word_embeddings=True)
    model = MoEModel(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(1)).eval()
    folder = save_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.0.mlp.experts.1.up_proj.weight" in index["weight_map"]
    assert "lm_head.weight" not in index["weight_map"]
    torch.testing.assert_close(_logits(load_model(folder)), _logits(model), atol=0, rtol=0)


def test_stacked_expert_layout(saved, tmp_path):
    """transformers' in-memory layout: experts.gate_up_proj [E, 2F, H] and experts.down_proj [E, H, F]."""
    model, folder = saved
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for k, v in tensors.items():
        if ".experts." not in k:
            out[k.replace("block_sparse_moe", "mlp")] = v
    for i, layer in enumerate(model.layers):
        w = layer.moe.experts
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w.w1, w.w3], dim=1).detach().contiguous()
        out[f"model.layers.{i}.mlp.experts.down_proj"] = w.w2.detach().contiguous()
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    shutil.copy(folder / "config.json", stacked)
    save_file(out, stacked / "model.safetensors")
    torch.testing.assert_close(_logits(load_model(stacked)), _logits(model), atol=0, rtol=0)


def test_dtype_conversion_on_load(saved):
    _, folder = saved
    model = load_model(folder, dtype="bfloat16")
    assert model.layers[0].moe.experts.w1.dtype == torch.bfloat16
    assert model.rotary.cos.dtype == torch.float32
    with pytest.raises(ConfigError, match="dtype: 'int8'"):
        load_model(folder, dtype="int8")


def test_truncated_file_names_it(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_missing_shard_names_it(tmp_path):
    model = MoEModel(CFG).init_weights()
    folder = save_hf(model, tmp_path / "s", max_shard_bytes=20_000)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim.name}, which is missing"):
        load_model(folder)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        load_model(tmp_path)


def test_shape_mismatch_names_key_and_field(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape "
                                              "\\[24, 16\\], config.json implies \\[32, 16\\].*intermediate_size"):
        load_model(folder)


def test_missing_key_named(saved):
    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_model(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_named_at_load(saved, value):
    _, folder = saved
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.block_sparse_moe.experts.2.w2.weight"][3, 4] = value
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'model.layers.1."
                                              "block_sparse_moe.experts.2.w2.weight' holds 1 NaN "
                                              "or infinite values \\(first at index \\[3, 4\\]\\)"):
        load_model(folder)


def test_extra_keys_rejected(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not belong to a mixtral model.*model.layers.1"):
        load_model(folder)


def test_unknown_architecture_lists_supported(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported; supported: mixtral, qwen2_moe, olmoe"):
        load_config(folder)


def test_half_precision_runs_as_float32_on_cpu_unless_asked(saved):
    assert default_dtype(torch.bfloat16, "cpu") == torch.float32
    assert default_dtype(torch.float16, torch.device("cpu")) == torch.float32
    assert default_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert default_dtype(torch.float32, "cuda") == torch.float32
    _, folder = saved
    half = load_model(folder, dtype="bfloat16")
    half_folder = folder.parent / "half"
    save_hf(half, half_folder)
    assert load_model(half_folder).embed_tokens.weight.dtype == torch.float32
    assert load_model(half_folder, dtype="bfloat16").embed_tokens.weight.dtype == torch.bfloat16
