import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from emoe.cli import main
from emoe.engine.checkpoint import load_model
from emoe.engine.reference.artifact import build_reference_model, load_train_config
from emoe.engine.reference.data import TASKS, Example
from emoe.engine.reference.train import (TrainConfig, held_out_examples, load_balancing_loss,
                                         make_batch, train_tiny)


def test_make_batch_pads_and_weighs_each_example_equally():
    # ids: bos p p | a a eos (answer starts at 3), and a shorter row that gets padded
    b = make_batch([([0, 5, 6, 7, 8, 1], 3), ([0, 5, 7, 1], 2)], pad_id=2, prompt_loss_weight=0.1)
    assert b.inputs.tolist() == [[0, 5, 6, 7, 8], [0, 5, 7, 1, 2]]
    assert b.targets.tolist() == [[5, 6, 7, 8, 1], [5, 7, 1, 2, 2]]
    expected = torch.tensor([[0.05, 0.05, 1 / 3, 1 / 3, 1 / 3], [0.1, 0.5, 0.5, 0, 0]])
    assert torch.allclose(b.weights, expected)
    assert b.answer_mask.tolist() == [[False, False, True, True, True],
                                      [False, True, True, False, False]]


def test_load_balancing_loss_is_one_when_uniform_and_grows_with_collapse():
    mask = torch.ones(64, dtype=torch.bool)
    balanced = torch.randn(64, 8) * 1e-3
    assert load_balancing_loss([balanced], 2, mask).item() == pytest.approx(1.0, abs=0.02)
    collapsed = torch.zeros(64, 8)
    collapsed[:, :2] = 10.0
    assert load_balancing_loss([collapsed], 2, mask).item() == pytest.approx(4.0, rel=0.01)
    # masked tokens do not count
    mixed = torch.cat([balanced[:32], collapsed[:32]])
    only_balanced = torch.arange(64) < 32
    assert load_balancing_loss([mixed], 2, only_balanced).item() == pytest.approx(1.0, abs=0.02)


def test_training_learns_and_is_deterministic(tiny_config: TrainConfig):
    first = train_tiny(tiny_config)
    assert len(first.losses) == tiny_config.steps
    assert sum(first.losses[-5:]) / 5 < 0.8 * sum(first.losses[:5]) / 5
    second = train_tiny(tiny_config)
    assert second.losses == first.losses
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_held_out_prompts_never_reach_training(tiny_config: TrainConfig, monkeypatch):
    held_out = {e.prompt for e in held_out_examples(tiny_config)}
    seen: list[Example] = []
    from emoe.engine.reference import train as train_module
    real_encode = train_module.encode_example

    def spy(tokenizer, example, eos_id):
        seen.append(example)
        return real_encode(tokenizer, example, eos_id)

    monkeypatch.setattr(train_module, "encode_example", spy)
    train_tiny(replace(tiny_config, steps=3))
    assert len(seen) == 3 * tiny_config.batch_size
    assert not held_out & {e.prompt for e in seen}


def test_build_writes_a_loadable_hf_folder_and_eval_tiny_reads_it(tiny_config, tmp_path, capsys):
    report = build_reference_model(tiny_config, tmp_path, dtype="bfloat16")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "metrics.json", "README.md"):
        assert (tmp_path / name).is_file(), name
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "mixtral" and hf_config["num_local_experts"] == 4
    with safe_open(tmp_path / "model.safetensors", framework="pt") as stored:
        assert stored.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    model = load_model(tmp_path)
    assert model.embed_tokens.weight.dtype == torch.float32  # half precision runs as float32 on CPU
    assert set(report["quality"]) == set(TASKS)
    assert len(report["routing"]["task_bits"]) == tiny_config.num_layers
    assert load_train_config(tmp_path) == tiny_config
    assert "emoe model train-tiny" in (tmp_path / "README.md").read_text()

    assert main(["model", "eval-tiny", str(tmp_path), "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["quality"] == report["quality"]
