import numpy as np
import pytest
import torch

from emoe.engine.config import MoEConfig
from emoe.engine.model import MoEModel
from emoe.engine.reference.data import generate_examples
from emoe.engine.reference.evaluate import (evaluate_quality, expert_usage, greedy_generate,
                                            routing_stats)
from emoe.engine.reference.tokenizer import train_tokenizer
from emoe.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def examples():
    return generate_examples(20, seed=11)


@pytest.fixture(scope="module")
def tokenizer(examples):
    return Tokenizer(train_tokenizer((e.text for e in generate_examples(300, seed=0)), 1024))


@pytest.fixture(scope="module")
def model(tokenizer):
    config = MoEConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                       num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4, top_k=2,
                       max_position_embeddings=256)
    return MoEModel(config).init_weights(std=0.3, generator=torch.Generator().manual_seed(1)).eval()


def _one_by_one(model, prompt, eos_id, max_new_tokens):
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token == eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


def test_batched_greedy_equals_one_prompt_at_a_time(model, tokenizer, examples):
    prompts = [tokenizer.encode(e.prompt) for e in examples[:6]]
    assert len({len(p) for p in prompts}) > 1  # really padded
    eos = 7  # a frequent token, so some rows stop early and others run on
    batched = greedy_generate(model, prompts, eos_id=eos, pad_id=2, max_new_tokens=6)
    assert batched == [_one_by_one(model, p, eos, 6) for p in prompts]


def test_expert_usage_counts_top_k_per_prompt_token_after_bos(model, tokenizer, examples):
    usage = expert_usage(model, tokenizer, examples)
    assert usage.shape == (len(examples), 2, 4)
    lengths = np.array([len(tokenizer.encode(e.prompt)) - 1 for e in examples])
    assert (usage.sum(axis=2) == 2 * lengths[:, None]).all()


def test_routing_stats_sees_task_dependent_usage():
    rng = np.random.default_rng(0)
    labels = ["a"] * 40 + ["b"] * 40
    dependent = np.concatenate([rng.multinomial(100, [0.7, 0.1, 0.1, 0.1], size=(40, 1)),
                                rng.multinomial(100, [0.1, 0.1, 0.1, 0.7], size=(40, 1))])
    stats = routing_stats(dependent.astype(float), labels)
    assert stats.task_bits[0] > 0.3 > 10 * stats.permuted_bits[0]
    independent = rng.multinomial(100, [0.25] * 4, size=(80, 1)).astype(float)
    assert routing_stats(independent, labels).task_bits[0] < 0.01
    assert stats.balance[0] == pytest.approx(0.861, abs=0.02)  # overall usage (.4, .1, .1, .4)


def test_quality_report_shape(model, tokenizer, examples):
    quality = evaluate_quality(model, tokenizer, examples)
    assert {t: m["n"] for t, m in quality.items()} == dict.fromkeys(
        ["summarization", "classification", "qa", "similarity", "conversation"], 4)
    assert "rouge_l_f1" in quality["summarization"]
    assert 0 <= quality["conversation"]["answer_token_accuracy"] <= 1
