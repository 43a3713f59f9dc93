"""Does the reference model work? Per-task answer quality and task-dependent routing.

Quality, on held-out prompts with greedy decoding: exact match for every task (for
classification and similarity this is accuracy), ROUGE-L F1 for summaries; and for every task
the teacher-forced next-token accuracy over the answer (for conversation: the next reply).

Routing: for each prompt, how often each expert is in the top-k of each MoE layer over the
prompt's tokens (bos excluded). Per layer, the generalised Jensen-Shannon divergence between
the tasks' expert-usage distributions says how much routing depends on the task; the same
statistic with the task labels permuted (sampling noise) and for a randomly initialised model
of the same shape are the baselines.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from emoe.engine.model import MoEModel
from emoe.engine.reference.data import Example
from emoe.engine.reference.metrics import (exact_match, js_divergence, normalized_entropy,
                                          rouge_l_f1)
from emoe.engine.reference.tokenizer import special_token_ids
from emoe.engine.tokenizer import Tokenizer

MAX_NEW_TOKENS = 24
BATCH_SIZE = 50


def _right_padded(sequences: list[list[int]], pad_id: int, extra: int = 0) -> Tensor:
    tokens = torch.full((len(sequences), max(map(len, sequences)) + extra), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, :len(ids)] = torch.tensor(ids)
    return tokens  # [B, T + extra]


@torch.no_grad()
def greedy_generate(model: MoEModel, prompts: list[list[int]], eos_id: int, pad_id: int,
                    max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Greedy continuations (without eos) of right-padded prompts. Causal attention means a
    row's pad positions never affect its real ones, so each new token is written at its row's
    own end and the whole batch is re-run each step (no KV cache: the outputs are short)."""
    tokens = _right_padded(prompts, pad_id, extra=max_new_tokens)  # [B, T + new]
    lengths = torch.tensor([len(p) for p in prompts])  # [B]
    rows = torch.arange(len(prompts))  # [B]
    running = torch.ones(len(prompts), dtype=torch.bool)  # [B]
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = model(tokens[:, :int(lengths.max())])  # [B, T, V]
        next_ids = logits[rows, lengths - 1].argmax(dim=-1)  # [B]
        for row in rows[running].tolist():
            token = int(next_ids[row])
            if token == eos_id:
                running[row] = False
            else:
                outputs[row].append(token)
                tokens[row, lengths[row]] = token
                lengths[row] += 1
        if not running.any():
            break
    return outputs


@torch.no_grad()
def _answer_token_accuracy(model: MoEModel, tokenizer: Tokenizer, examples: list[Example],
                          eos_id: int, pad_id: int) -> float:
    """Teacher-forced: the share of answer tokens (and eos) the model predicts as its argmax."""
    correct = total = 0
    for start in range(0, len(examples), BATCH_SIZE):
        chunk = examples[start:start + BATCH_SIZE]
        prompts = [tokenizer.encode(e.prompt) for e in chunk]
        answers = [tokenizer.encode(e.answer, add_special_tokens=False) + [eos_id] for e in chunk]
        tokens = _right_padded([p + a for p, a in zip(prompts, answers)], pad_id)  # [B, T]
        predicted = model(tokens).argmax(dim=-1)  # [B, T]
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            guess = predicted[row, len(prompt) - 1:len(prompt) - 1 + len(answer)]
            correct += int((guess == torch.tensor(answer)).sum())
            total += len(answer)
    return correct / total


def evaluate_quality(model: MoEModel, tokenizer: Tokenizer,
                     examples: list[Example]) -> dict[str, dict[str, float]]:
    """Per task: ``n``, ``exact_match``, ``answer_token_accuracy``; summarization adds
    ``rouge_l_f1``."""
    ids = special_token_ids(tokenizer.inner)
    by_task: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_task[example.task].append(example)
    report: dict[str, dict[str, float]] = {}
    for task, group in by_task.items():
        predictions: list[str] = []
        for start in range(0, len(group), BATCH_SIZE):
            chunk = group[start:start + BATCH_SIZE]
            generated = greedy_generate(model, [tokenizer.encode(e.prompt) for e in chunk],
                                        ids["eos"], ids["pad"])
            predictions += [tokenizer.decode(g) for g in generated]
        references = [e.answer for e in group]
        metrics = {"n": len(group),
                   "exact_match": float(np.mean([exact_match(p, r) for p, r in
                                                 zip(predictions, references)]))}
        if task == "summarization":
            metrics["rouge_l_f1"] = float(np.mean([rouge_l_f1(p, r) for p, r in
                                                   zip(predictions, references)]))
        metrics["answer_token_accuracy"] = _answer_token_accuracy(
            model, tokenizer, group, ids["eos"], ids["pad"])
        report[task] = metrics
    return report


@torch.no_grad()
def expert_usage(model: MoEModel, tokenizer: Tokenizer, examples: list[Example]) -> np.ndarray:
    """[N, L, E]: per prompt and MoE layer, top-k selections of each expert over the prompt's
    tokens after bos."""
    c = model.config
    pad_id = special_token_ids(tokenizer.inner)["pad"]
    usage = np.zeros((len(examples), c.num_layers, c.num_experts))
    for start in range(0, len(examples), BATCH_SIZE):
        prompts = [tokenizer.encode(e.prompt) for e in examples[start:start + BATCH_SIZE]]
        tokens = _right_padded(prompts, pad_id)  # [B, T]
        batch, length = tokens.shape
        counted = torch.arange(length)[None, :] < torch.tensor([len(p) for p in prompts])[:, None]
        counted[:, 0] = False  # bos: the same token at the same place in every prompt
        _, router_logits = model(tokens, return_router_logits=True)  # L x [B*T, E]
        for layer, logits in enumerate(router_logits):
            chosen = logits.view(batch, length, -1).topk(c.top_k, dim=-1).indices  # [B, T, K]
            one_hot = torch.nn.functional.one_hot(chosen, c.num_experts).sum(dim=2)  # [B, T, E]
            usage[start:start + batch, layer] = (one_hot * counted[..., None]).sum(dim=1).numpy()
    return usage


@dataclass(frozen=True)
class RoutingStats:
    """Per MoE layer: ``task_bits``, the JSD (bits) between the tasks' expert-usage
    distributions; ``permuted_bits``, the same with shuffled task labels (mean over
    ``permutations``); ``balance``, the entropy of the overall usage over log2(E) (1 = every
    expert used equally)."""

    task_bits: list[float]
    permuted_bits: list[float]
    balance: list[float]
    permutations: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _per_layer_jsd(usage: np.ndarray, labels: np.ndarray) -> list[float]:
    tasks = np.unique(labels)
    per_task = np.stack([usage[labels == t].sum(axis=0) for t in tasks])  # [K, L, E]
    return [js_divergence(per_task[:, layer]) for layer in range(usage.shape[1])]


def routing_stats(usage: np.ndarray, labels: list[str], permutations: int = 20,
                  seed: int = 0) -> RoutingStats:
    """``usage`` [N, L, E] from :func:`expert_usage`; ``labels`` the N prompts' tasks."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    permuted = np.mean([_per_layer_jsd(usage, rng.permutation(labels_array))
                        for _ in range(permutations)], axis=0)
    total = usage.sum(axis=0)  # [L, E]
    balance = [normalized_entropy(total[layer]) for layer in range(usage.shape[1])]
    return RoutingStats([round(x, 4) for x in _per_layer_jsd(usage, labels_array)],
                        [round(float(x), 4) for x in permuted],
                        [round(x, 4) for x in balance], permutations)


def evaluate_model(model: MoEModel, tokenizer: Tokenizer, examples: list[Example],
                   seed: int = 0) -> dict[str, object]:
    """Quality and routing divergence of ``model``, with the routing divergence of a randomly
    initialised model of the same shape as a baseline."""
    labels = [e.task for e in examples]
    random_model = MoEModel(model.config).init_weights(
        generator=torch.Generator().manual_seed(seed)).eval()
    return {
        "quality": evaluate_quality(model, tokenizer, examples),
        "routing": routing_stats(expert_usage(model, tokenizer, examples), labels,
                                 seed=seed).as_dict(),
        "random_init_routing": routing_stats(
            expert_usage(random_model, tokenizer, examples), labels, seed=seed).as_dict(),
    }
