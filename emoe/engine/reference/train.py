"""Training the reference model: a small Mixtral-architecture MoE on the generated tasks.

Each example is ``<s> prompt answer </s>``, one per row of a right-padded batch. The loss is
next-token cross-entropy over the answer and eos, plus ``prompt_loss_weight`` times that over
the prompt (a little language modelling of the prompt forms), each averaged per example, plus
a Switch/Mixtral load-balancing loss on every layer's router so the experts do not collapse.
Batches mix the tasks, so balance is asked of the mix, not of each task: experts stay free to
specialise by task. Deterministic for a seed (at a given torch thread count)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from emoe.engine.config import MoEConfig
from emoe.engine.model import MoEModel
from emoe.engine.reference.data import TASKS, Example, generate_examples, iter_examples
from emoe.engine.reference.tokenizer import special_token_ids, train_tokenizer
from emoe.engine.tokenizer import Tokenizer

EVAL_SEED_OFFSET = 1  # held-out prompts come from seed + 1; training never sees them


@dataclass(frozen=True)
class TrainConfig:
    """What ``emoe model train-tiny`` trains; the defaults make the committed artifact."""

    seed: int = 0
    num_layers: int = 4
    hidden_size: int = 128
    intermediate_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    max_position_embeddings: int = 256
    tokenizer_vocab_size: int = 2048
    tokenizer_corpus_examples: int = 20_000
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    prompt_loss_weight: float = 0.1
    aux_loss_coef: float = 0.02
    eval_examples_per_task: int = 100
    tasks: tuple[str, ...] = field(default=TASKS)

    @property
    def eval_seed(self) -> int:
        return self.seed + EVAL_SEED_OFFSET

    def model_config(self, tokenizer: Tokenizer) -> MoEConfig:
        ids = special_token_ids(tokenizer.inner)
        return MoEConfig(
            vocab_size=_round_up(tokenizer.vocab_size, 64), hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            num_experts=self.num_experts, top_k=self.top_k,
            max_position_embeddings=self.max_position_embeddings, rope_theta=10_000.0,
            model_type="mixtral", bos_token_id=ids["bos"], eos_token_ids=(ids["eos"],))


@dataclass
class TrainResult:
    model: MoEModel
    tokenizer: Tokenizer
    config: TrainConfig
    losses: list[float]  # per step: cross-entropy on the answer tokens and eos
    aux_losses: list[float]  # per step: load-balancing loss (1.0 = perfectly balanced)
    seconds: float

    def summary(self) -> dict[str, object]:
        tail = max(1, len(self.losses) // 20)
        return {"train_config": asdict(self.config), "train_seconds": round(self.seconds, 1),
                "final_answer_loss": sum(self.losses[-tail:]) / tail,
                "final_aux_loss": sum(self.aux_losses[-tail:]) / tail}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def encode_example(tokenizer: Tokenizer, example: Example, eos_id: int) -> tuple[list[int], int]:
    """``(ids, answer_start)``: bos + prompt + answer + eos, and where the answer begins."""
    prompt = tokenizer.encode(example.prompt)
    answer = tokenizer.encode(example.answer, add_special_tokens=False)
    return prompt + answer + [eos_id], len(prompt)


@dataclass(frozen=True)
class Batch:
    """Right-padded ``inputs`` and next-token ``targets`` [B, T-1] (T = longest example).

    ``weights`` [B, T-1] make the loss, summed and divided by B, the mean over examples of
    (answer cross-entropy + prompt_loss_weight * prompt cross-entropy), each averaged over
    that example's own tokens, so short answers (a label) count as much as long ones.
    ``answer_mask`` [B, T-1] marks the answer and eos targets. One example per row: packing
    several into a row (attending across examples) made the tasks markedly slower to learn.
    """

    inputs: Tensor
    targets: Tensor
    weights: Tensor
    answer_mask: Tensor


def make_batch(encoded: list[tuple[list[int], int]], pad_id: int,
               prompt_loss_weight: float) -> Batch:
    """``encoded``: (ids, answer_start) pairs from :func:`encode_example`."""
    length = max(len(ids) for ids, _ in encoded)
    tokens = torch.full((len(encoded), length), pad_id, dtype=torch.long)  # [B, T]
    weights = torch.zeros(len(encoded), length - 1)  # [B, T-1]
    answer_mask = torch.zeros(len(encoded), length - 1, dtype=torch.bool)  # [B, T-1]
    for row, (ids, answer_start) in enumerate(encoded):
        tokens[row, :len(ids)] = torch.tensor(ids)
        prompt_targets = answer_start - 1  # targets 1 .. answer_start-1 lie inside the prompt
        answer = slice(prompt_targets, len(ids) - 1)  # targets: the answer tokens and eos
        weights[row, :prompt_targets] = prompt_loss_weight / prompt_targets
        weights[row, answer] = 1.0 / (answer.stop - answer.start)
        answer_mask[row, answer] = True
    return Batch(tokens[:, :-1], tokens[:, 1:], weights, answer_mask)


def load_balancing_loss(router_logits: list[Tensor], top_k: int, token_mask: Tensor) -> Tensor:
    """Switch-Transformer balance loss, averaged over layers: E * sum_e f_e * P_e, with f_e the
    share of top-k assignments to expert e and P_e its mean router probability, over the
    tokens in ``token_mask`` [N]. Equals 1 when routing is uniform."""
    mask = token_mask.float()[:, None]  # [N, 1]
    count = mask.sum()
    total = router_logits[0].new_zeros(())
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # [N, E]
        num_experts = probs.shape[-1]
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1)  # [N, E]
        share = (chosen * mask).sum(dim=0) / (count * top_k)  # [E]
        mean_prob = (probs * mask).sum(dim=0) / count  # [E]
        total = total + num_experts * (share * mean_prob).sum()
    return total / len(router_logits)


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.learning_rate * (config.min_lr_fraction + (1 - config.min_lr_fraction) * cosine)


def held_out_examples(config: TrainConfig) -> list[Example]:
    """The evaluation prompts: from ``config.eval_seed``, never in the training stream."""
    return generate_examples(config.eval_examples_per_task * len(config.tasks),
                             config.eval_seed, config.tasks)


def _training_stream(config: TrainConfig) -> Iterator[Example]:
    held_out = {e.prompt for e in held_out_examples(config)}
    return (e for e in iter_examples(config.seed, config.tasks) if e.prompt not in held_out)


def train_tiny(config: TrainConfig,
               log: Callable[[str], None] = lambda line: None) -> TrainResult:
    """Train the tokenizer, then the model; returns both with the loss curve."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    corpus = generate_examples(config.tokenizer_corpus_examples, config.seed, config.tasks)
    tokenizer = Tokenizer(train_tokenizer((e.text for e in corpus), config.tokenizer_vocab_size))
    ids = special_token_ids(tokenizer.inner)
    model_config = config.model_config(tokenizer)
    model = MoEModel(model_config).init_weights(
        generator=torch.Generator().manual_seed(config.seed))
    log(f"tokenizer: {tokenizer.vocab_size} tokens; model: {model_config.num_params() / 1e6:.2f}M "
        f"parameters, {model_config.num_layers} layers x {model_config.num_experts} experts "
        f"(top-{model_config.top_k})")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate, betas=(0.9, 0.95))
    stream = _training_stream(config)
    losses: list[float] = []
    aux_losses: list[float] = []
    model.train()
    for step in range(config.steps):
        batch = [encode_example(tokenizer, next(stream), ids["eos"])
                 for _ in range(config.batch_size)]
        b = make_batch(batch, ids["pad"], config.prompt_loss_weight)
        logits, router_logits = model(b.inputs, return_router_logits=True)  # [B, T, V], [B*T, E]
        token_loss = F.cross_entropy(logits.flatten(0, 1).float(), b.targets.flatten(),
                                     reduction="none").view_as(b.weights)  # [B, T]
        loss = (token_loss * b.weights).sum() / len(batch)
        answer_loss = token_loss[b.answer_mask].mean()
        aux = load_balancing_loss(router_logits, model_config.top_k,
                                  (b.inputs != ids["pad"]).flatten())
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        (loss + config.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(answer_loss.item())
        aux_losses.append(aux.item())
        if step % 50 == 0 or step == config.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  answer {answer_loss.item():.4f}  "
                f"balance {aux.item():.3f}  lr {_lr_at(step, config):.2e}  {time.perf_counter() - started:.0f}s")
    model.eval()
    return TrainResult(model, tokenizer, config, losses, aux_losses,
                       time.perf_counter() - started)
