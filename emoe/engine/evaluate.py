"""``emoe eval``: what offloading costs in accuracy, per task, against the all-experts output.

For each (policy, budget) the same prompts (the reference tasks' held-out prompts, all five
tasks interleaved as one stream) run on the real engine under the core scheduler, greedy, and
are compared with the ``all`` planner's output:

- agreement: the share of the all-experts greedy tokens reproduced at the same position
  (a shorter or diverging output loses the rest of the positions);
- perplexity change: perplexity of the reference answers (teacher-forced, given the prompt)
  with the experts resident at the end of the run, relative to all experts, in percent;
- quality: the task's own metric against the reference answer (ROUGE-L F1 for
  summarization, exact match otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emoe.engine.reference.data import Example
from emoe.engine.reference.metrics import exact_match, rouge_l_f1

if TYPE_CHECKING:  # torch is imported only when a command runs
    from emoe.core.routing_trace import RoutingTrace
    from emoe.engine.model import MoEModel
    from emoe.engine.offload.session import SessionConfig
    from emoe.engine.tokenizer import Tokenizer

DEFAULT_POLICIES = ("lru", "static", "predict-every", "emoe")
DEFAULT_BUDGETS = ("20%", "40%", "60%", "80%", "100%")


@dataclass(frozen=True, slots=True)
class EvalRow:
    policy: str
    budget: str
    task: str
    n: int
    agreement: float
    perplexity: float
    perplexity_change_pct: float
    quality: float
    quality_metric: str
    hit_rate: float


def quality(task: str, prediction: str, reference: str) -> tuple[float, str]:
    if task == "summarization":
        return rouge_l_f1(prediction, reference), "rouge_l_f1"
    return float(exact_match(prediction, reference)), "exact_match"


def token_agreement(output: Sequence[int], reference: Sequence[int]) -> float:
    """Share of ``reference`` tokens that ``output`` has at the same position."""
    if not reference:
        return 1.0 if not output else 0.0
    return sum(a == b for a, b in zip(output, reference)) / len(reference)


def answer_nll(model: MoEModel, tokenizer: Tokenizer, examples: Sequence[Example]) -> list[tuple[float, int]]:
    """Per example: summed negative log-likelihood of the answer tokens (+ eos) given the
    prompt, and their count."""
    import torch

    eos = model.config.eos_token_ids[0] if model.config.eos_token_ids else None
    out = []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt)
        answer = tokenizer.encode(ex.answer, add_special_tokens=False) + ([eos] if eos is not None else [])
        device = model.embed_tokens.weight.device
        ids = torch.tensor([prompt + answer], device=device)  # [1, T]
        with torch.inference_mode():
            logits = model(ids)[0, len(prompt) - 1:-1].float()  # [A, V]
        target = torch.tensor(answer, device=device)  # [A]
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        out.append((float(nll), len(answer)))
    return out


@dataclass(slots=True)
class _Run:
    tokens: dict[str, list[int]]
    nll: list[tuple[float, int]]
    hit_rate: dict[str, float]


def _run(load_model: Callable[[], MoEModel], tokenizer: Tokenizer, examples: Sequence[Example],
         config: SessionConfig, max_new_tokens: int, calibration: RoutingTrace | None) -> _Run:
    from emoe.engine.offload.session import OffloadSession, SessionRequest

    session = OffloadSession(load_model(), config, calibration=calibration)
    requests = [SessionRequest(f"{i}", ex.task, tokenizer.encode(ex.prompt), max_new_tokens)
                for i, ex in enumerate(examples)]
    stats = session.run(requests)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record in stats.requests.values():
        hits[record.task][0] += record.expert_hits
        hits[record.task][1] += record.expert_hits + record.expert_misses
    nll = answer_nll(session.model, tokenizer, examples)
    return _Run({rid: r.token_ids for rid, r in stats.requests.items()}, nll,
                {t: (h / n if n else 1.0) for t, (h, n) in hits.items()})


def evaluate(load_model: Callable[[], MoEModel], tokenizer: Tokenizer, examples: Sequence[Example],
             policies: Sequence[str] = DEFAULT_POLICIES, budgets: Sequence[str] = DEFAULT_BUDGETS,
             max_new_tokens: int = 24, calibration: RoutingTrace | None = None,
             base: SessionConfig | None = None,
             progress: Callable[[str], None] | None = None) -> list[EvalRow]:
    """Rows for the ``all`` reference and every (policy, budget), per task."""
    from emoe.engine.offload.session import SessionConfig

    base = base or SessionConfig()
    eos = set(load_model().config.eos_token_ids)

    def text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t not in eos])

    reference = _run(load_model, tokenizer, examples, _with(base, "all", "100%"), max_new_tokens, None)
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_task[ex.task].append(i)

    def rows_for(policy: str, budget: str, run: _Run) -> list[EvalRow]:
        rows = []
        for task, idx in by_task.items():
            ppl = math.exp(sum(run.nll[i][0] for i in idx) / sum(run.nll[i][1] for i in idx))
            ref_ppl = math.exp(sum(reference.nll[i][0] for i in idx)
                               / sum(reference.nll[i][1] for i in idx))
            scores = [quality(task, text(run.tokens[str(i)]), examples[i].answer) for i in idx]
            rows.append(EvalRow(
                policy=policy, budget=budget, task=task, n=len(idx),
                agreement=sum(token_agreement(run.tokens[str(i)], reference.tokens[str(i)])
                              for i in idx) / len(idx),
                perplexity=ppl, perplexity_change_pct=100.0 * (ppl / ref_ppl - 1.0),
                quality=sum(s for s, _ in scores) / len(idx), quality_metric=scores[0][1],
                hit_rate=run.hit_rate.get(task, 1.0)))
        return rows

    rows = rows_for("all", "100%", reference)
    for policy in policies:
        for budget in budgets:
            if progress is not None:
                progress(f"{policy} @ {budget}")
            run = _run(load_model, tokenizer, examples, _with(base, policy, budget),
                       max_new_tokens, calibration)
            rows += rows_for(policy, budget, run)
    return rows


def _with(base: SessionConfig, planner: str, budget: str) -> SessionConfig:
    return dataclasses.replace(base, planner=planner, budget=budget,
                               miss=None if planner == "all" else base.miss)


def format_tables(rows: Sequence[EvalRow]) -> str:
    """Markdown: one table per metric, a row per (policy, budget), a column per task + mean."""
    tasks = list(dict.fromkeys(r.task for r in rows))
    keys = list(dict.fromkeys((r.policy, r.budget) for r in rows))
    cell = {(r.policy, r.budget, r.task): r for r in rows}
    out = []
    metrics = (("Greedy-token agreement with all experts", "agreement", "{:.3f}"),
               ("Perplexity change vs all experts (%)", "perplexity_change_pct", "{:+.1f}"),
               ("Task quality (summarization: ROUGE-L F1; others: exact match)", "quality", "{:.3f}"),
               ("Expert hit rate (router choices resident)", "hit_rate", "{:.3f}"))
    for title, attr, fmt in metrics:
        out.append(f"**{title}**\n")
        out.append("| policy | budget | " + " | ".join(tasks) + " | mean |")
        out.append("|---|---|" + "---|" * (len(tasks) + 1))
        for policy, budget in keys:
            values = [getattr(cell[(policy, budget, t)], attr) for t in tasks]
            out.append(f"| {policy} | {budget} | " + " | ".join(fmt.format(v) for v in values)
                       + " | " + fmt.format(sum(values) / len(values)) + " |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--policy", action="append", help=f"expert planner, repeatable "
                   f"(default: {', '.join(DEFAULT_POLICIES)})")
    p.add_argument("--expert-budget", action="append", dest="budgets", metavar="BUDGET",
                   help="fraction (0.4, 40%%) or bytes (64MiB), repeatable "
                        f"(default: {', '.join(DEFAULT_BUDGETS)})")
    p.add_argument("--miss", choices=["reroute", "fetch", "drop"], default=None,
                   help="miss handling (default: fetch for lru, reroute otherwise)")
    p.add_argument("--per-task", type=int, default=20, help="prompts per task (default 20)")
    p.add_argument("--seed", type=int, default=1, help="prompt seed (default 1: the reference "
                   "model's held-out prompts)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--prediction-interval", type=int, default=40)
    p.add_argument("--calibration", default=None,
                   help="routing trace of other prompts: warms the predictor, pins static")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")


def run(args: argparse.Namespace) -> int:
    import sys

    from emoe.core.routing_trace import read_routing_trace
    from emoe.engine.checkpoint import load_model
    from emoe.engine.offload.session import SessionConfig
    from emoe.engine.reference.data import TASKS, generate_examples
    from emoe.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(args.checkpoint)
    examples = generate_examples(args.per_task * len(TASKS), seed=args.seed)
    calibration = read_routing_trace(args.calibration) if args.calibration else None
    base = SessionConfig(miss=args.miss, prediction_interval=args.prediction_interval,
                         max_batch_size=args.max_batch_size, device=args.device)
    rows = evaluate(lambda: load_model(args.checkpoint), tokenizer, examples,
                    policies=args.policy or DEFAULT_POLICIES,
                    budgets=args.budgets or DEFAULT_BUDGETS,
                    max_new_tokens=args.max_new_tokens, calibration=calibration, base=base,
                    progress=lambda s: print(f"eval: {s}", file=sys.stderr))
    print(format_tables(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0
