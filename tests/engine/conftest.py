"""Tiny random Mixtral / Qwen2-MoE / OLMoE checkpoints written by transformers itself."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=80, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                       shared_expert_intermediate_size=40, norm_topk_prob=False)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2, attention_bias=True,
                   norm_topk_prob=False, clip_qkv=3.0)),
}


def make_hf_model(family: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # non-trivial biases and norms so their loading is tested too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """family -> (transformers model, folder it saved itself to)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in FAMILIES:
            model = make_hf_model(family)
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            out[family] = (model, folder)
    return out


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param
