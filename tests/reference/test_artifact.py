"""The committed reference model: loads as any checkpoint and really works."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from emoe.engine.checkpoint import load_model
from emoe.engine.reference import REFERENCE_MODEL_DIR
from emoe.engine.reference.artifact import folder_size, load_train_config
from emoe.engine.reference.evaluate import evaluate_quality, expert_usage, routing_stats
from emoe.engine.reference.train import held_out_examples
from emoe.engine.tokenizer import Tokenizer

PER_TASK = 20
FLOORS = {  # below the full held-out numbers in metrics.json (100 prompts per task)
    ("classification", "exact_match"): 0.9,
    ("qa", "exact_match"): 0.9,
    ("summarization", "rouge_l_f1"): 0.9,
    ("conversation", "exact_match"): 0.9,
    ("similarity", "exact_match"): 0.65,  # 0.77 on 100 prompts; chance is 0.5
}


@pytest.fixture(scope="module")
def model():
    return load_model(REFERENCE_MODEL_DIR, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_folder(REFERENCE_MODEL_DIR)


@pytest.fixture(scope="module")
def held_out():
    config = load_train_config(REFERENCE_MODEL_DIR)
    return held_out_examples(replace(config, eval_examples_per_task=PER_TASK))


def test_small_mixtral_checkpoint():
    assert folder_size(REFERENCE_MODEL_DIR) <= 12 * 2**20
    config = json.loads((REFERENCE_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
    assert 4 <= config["num_hidden_layers"] <= 8


def test_quality_floor_on_held_out_prompts(model, tokenizer, held_out):
    quality = evaluate_quality(model, tokenizer, held_out)
    for (task, metric), floor in FLOORS.items():
        assert quality[task][metric] >= floor, (task, quality[task])


def test_routing_depends_on_the_task_and_uses_every_expert(model, tokenizer, held_out):
    labels = [e.task for e in held_out]
    stats = routing_stats(expert_usage(model, tokenizer, held_out), labels)
    assert np.mean(stats.task_bits) > 10 * np.mean(stats.permuted_bits)
    assert min(stats.task_bits) > 0.02
    assert min(stats.balance) > 0.9


def test_transformers_reads_the_same_model(model, tokenizer, held_out):
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.MixtralForCausalLM.from_pretrained(
        REFERENCE_MODEL_DIR, dtype=torch.float32).eval()
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(REFERENCE_MODEL_DIR)
    prompt = held_out[0].prompt
    ids = tokenizer.encode(prompt)
    assert hf_tokenizer(prompt)["input_ids"] == ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))
        theirs = hf_model(torch.tensor([ids])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
