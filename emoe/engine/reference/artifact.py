"""Building the reference-model folder: train, save in the Hugging Face layout, evaluate the
stored weights, and write ``metrics.json`` and a model card beside them."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from emoe.engine.checkpoint import load_model, save_hf
from emoe.engine.reference.evaluate import evaluate_model
from emoe.engine.reference.tokenizer import save_tokenizer, special_token_ids
from emoe.engine.reference.train import TrainConfig, held_out_examples, train_tiny
from emoe.engine.tokenizer import Tokenizer

METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"


def build_reference_model(config: TrainConfig, folder: Path, dtype: str = "bfloat16",
                          command: str = "emoe model train-tiny",
                          log: Callable[[str], None] = lambda line: None) -> dict[str, object]:
    """Train with ``config``, save to ``folder`` in ``dtype``, evaluate what was saved; returns
    the report also written to ``folder/metrics.json``."""
    result = train_tiny(config, log)
    folder.mkdir(parents=True, exist_ok=True)
    save_hf(result.model.to(getattr(torch, dtype)), folder)
    save_tokenizer(result.tokenizer.inner, folder)
    ids = special_token_ids(result.tokenizer.inner)
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                  "pad_token_id": ids["pad"], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    log("evaluating the stored weights")
    report = evaluate_folder(folder, config)
    report.update(result.summary(), command=command, dtype=dtype,
                  torch_version=torch.__version__, machine=platform.machine(),
                  size_bytes=folder_size(folder))
    (folder / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (folder / CARD_FILE).write_text(model_card(report))
    return report


def evaluate_folder(folder: Path, config: TrainConfig) -> dict[str, object]:
    """Evaluate the checkpoint in ``folder`` (computing in float32) on ``config``'s held-out
    prompts."""
    model = load_model(folder, dtype="float32")
    tokenizer = Tokenizer.from_folder(folder)
    return evaluate_model(model, tokenizer, held_out_examples(config), seed=config.seed)


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def load_train_config(folder: Path) -> TrainConfig:
    """The training configuration recorded in ``folder/metrics.json``."""
    recorded = json.loads((folder / METRICS_FILE).read_text())["train_config"]
    recorded["tasks"] = tuple(recorded["tasks"])
    return TrainConfig(**recorded)


def _quality_table(quality: dict[str, dict[str, float]]) -> str:
    rows = ["| task | held-out prompts | exact match | other |", "|---|---|---|---|"]
    for task, m in quality.items():
        other = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k not in ("n", "exact_match"))
        rows.append(f"| {task} | {int(m['n'])} | {m['exact_match']:.3f} | {other or '-'} |")
    return "\n".join(rows)


def _routing_table(report: dict[str, object]) -> str:
    trained, random_init = report["routing"], report["random_init_routing"]
    rows = ["| layer | trained: tasks | trained: permuted labels | trained: balance "
            "| random init: tasks | random init: balance |", "|---|---|---|---|---|---|"]
    for layer in range(len(trained["task_bits"])):
        rows.append(f"| {layer} | {trained['task_bits'][layer]:.4f} "
                    f"| {trained['permuted_bits'][layer]:.4f} | {trained['balance'][layer]:.3f} "
                    f"| {random_init['task_bits'][layer]:.4f} | {random_init['balance'][layer]:.3f} |")
    return "\n".join(rows)


def model_card(report: dict[str, object]) -> str:
    c = report["train_config"]
    return f"""# emoe-tiny: the project's reference MoE model

A small Mixtral-architecture model (model_type "mixtral") trained by emoe itself on five
templated task types (summarization, classification, qa, similarity, conversation), so that
its expert routing really depends on the task. Hugging Face layout: config.json,
model.safetensors ({report['dtype']}), tokenizer.json (byte-level BPE), generation_config.json.
Code: emoe/engine/reference/; explained in docs/reference-model.md.

## How it was made
    {report['command']}

- seed {c['seed']}; {c['num_layers']} layers, hidden {c['hidden_size']}, {c['num_heads']} heads \
({c['num_kv_heads']} kv), {c['num_experts']} experts (top-{c['top_k']}) of intermediate size \
{c['intermediate_size']}
- {c['steps']} steps of {c['batch_size']} examples; AdamW lr {c['learning_rate']}; \
load-balancing loss coefficient {c['aux_loss_coef']}; prompt loss weight {c['prompt_loss_weight']}
- training took {report['train_seconds']} s on {report['machine']} (torch \
{report['torch_version']}); final answer loss {report['final_answer_loss']:.4f}, balance loss \
{report['final_aux_loss']:.3f} (1.0 = uniform)
- checkpoint files (weights, tokenizer, configs): {report['size_bytes']} bytes

## Quality on held-out prompts
Greedy decoding of {c['eval_examples_per_task']} prompts per task generated with seed \
{c['seed'] + 1}, which training never saw; measured from the stored weights (computing in
float32). answer_token_accuracy is teacher-forced, over the answer tokens and eos.

{_quality_table(report['quality'])}

## Routing depends on the task
Per MoE layer: the Jensen-Shannon divergence (bits; at most log2(5) = 2.32) between the five
tasks' expert-usage distributions over prompt tokens; the same with the task labels permuted
({report['routing']['permutations']} permutations: the sampling-noise floor); balance, the
entropy of the overall expert usage over log2(E) (1 = all experts used equally); and both for
a randomly initialised model of the same shape.

{_routing_table(report)}

Re-evaluate: `emoe model eval-tiny` (this folder by default).
"""
