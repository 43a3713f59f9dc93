"""A tiny training configuration: the whole path (data, tokenizer, model, save, evaluate) in
seconds."""

import pytest
import torch

from emoe.engine.reference.train import TrainConfig

TINY = TrainConfig(seed=0, num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2,
                   num_kv_heads=1, num_experts=4, top_k=2, tokenizer_corpus_examples=500,
                   steps=30, batch_size=16, warmup_steps=5,
                   learning_rate=1e-2, eval_examples_per_task=4)


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Models this small gain nothing from a second thread, and on a busy machine two
    OpenMP threads wait on each other; restored afterwards for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config() -> TrainConfig:
    return TINY
