from __future__ import annotations

import pytest
import torch

from emoe.engine.config import MoEConfig
from emoe.engine.model import MoEModel

TINY = MoEConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
                 num_kv_heads=1, num_experts=4, top_k=2, max_position_embeddings=128,
                 eos_token_ids=(1,))


def tiny_model(seed: int = 0, config: MoEConfig = TINY) -> MoEModel:
    g = torch.Generator().manual_seed(seed)
    return MoEModel(config).init_weights(std=0.2, generator=g).eval()


@pytest.fixture
def make_tiny():
    return tiny_model
