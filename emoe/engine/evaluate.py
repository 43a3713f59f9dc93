"""``emoe eval``: what offloading costs in accuracy, per task, against the all-experts output.

For each (planner, budget) the same prompts (the reference tasks' held-out prompts, all five
tasks interleaved as one stream) run on the real engine under the core scheduler, greedy, and
are compared with the ``all`` planner's output:

- agreement: the share of the all-experts greedy tokens reproduced at the same position
  (a shorter or diverging output loses the rest of the positions);
- perplexity change: perplexity of the reference answers (teacher-forced, given the prompt)
  with the experts resident at the end of the run, relative to all experts, in percent;
- quality: the task's own metric against the reference answer (ROUGE-L F1 for
  summarization, exact match otherwise);
- hit rate: share of router choices resident when their layer ran; proxy: the share served
  by their own expert (resident, or fetched on a miss) weighted by the planner's layer
  sensitivity, over the offloaded run's own routing: the simulator's accuracy proxy as the
  engine sees it. ``emoe calibrate-proxy`` replays the rows (``--json``, which carry the
  command's settings in ``run``) in the simulator and fits agreement and quality to the
  simulator's proxy, weighted by one measured table.

``random`` is the control: ``random_draws`` random expert sets (seeds 0, 1, ...) with the
per-layer sizes the ``emoe`` planner chose at that budget, pinned; its rows are the mean over
the draws and carry the per-draw values, so ``summarize`` reports their spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoe.engine.reference.data import Example
from emoe.engine.reference.metrics import exact_match, rouge_l_f1

if TYPE_CHECKING:  # torch is imported only when a command runs
    from emoe.core.routing_trace import RoutingTrace
    from emoe.engine.model import MoEModel
    from emoe.engine.offload.session import SessionConfig
    from emoe.engine.tokenizer import Tokenizer

DEFAULT_POLICIES = ("lru", "static", "random", "predict-every", "emoe")
DEFAULT_BUDGETS = ("25%", "50%", "60%", "75%")
RANDOM_DRAWS = 10


@dataclass(frozen=True, slots=True)
class EvalRow:
    """One task under one (policy, budget); ``*_draws``: per random draw (``random`` only)."""

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
    proxy: float = 1.0
    budget_fraction: float = 1.0
    slots_per_layer: tuple[int, ...] = ()
    predictor_calls: float = 0.0
    nll: float = 0.0
    answer_tokens: int = 0
    agreement_draws: tuple[float, ...] = ()
    quality_draws: tuple[float, ...] = ()


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
    hits: dict[str, list[float]]  # task -> [hits, choices, weighted hits, weighted choices]
    fraction: float = 1.0
    slots_per_layer: tuple[int, ...] = ()
    predictor_calls: int = 0


def _run(load_model: Callable[[], MoEModel], tokenizer: Tokenizer, examples: Sequence[Example],
         config: SessionConfig, max_new_tokens: int, calibration: RoutingTrace | None) -> _Run:
    from emoe.engine.offload.session import OffloadSession, SessionRequest

    session = OffloadSession(load_model(), config, calibration=calibration)
    requests = [SessionRequest(f"{i}", ex.task, tokenizer.encode(ex.prompt), max_new_tokens)
                for i, ex in enumerate(examples)]
    stats = session.run(requests)
    fetched = session.experts is not None and session.experts.lru is not None
    hits: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for record in stats.requests.values():
        counts = hits[record.task]
        counts[0] += record.expert_hits
        counts[1] += record.expert_hits + record.expert_misses
        # a fetched miss is served by its own expert: the simulator's proxy counts it so
        counts[2] += record.weighted_choices if fetched else record.weighted_hits
        counts[3] += record.weighted_choices
    nll = answer_nll(session.model, tokenizer, examples)
    planner, spec = session.scheduler.planner, session.spec
    return _Run({rid: r.token_ids for rid, r in stats.requests.items()}, nll, dict(hits),
                float(planner.capacity_bytes
                      / (spec.num_layers * spec.num_experts * spec.expert_bytes)),
                tuple(int(v) for v in planner.resident.sum(axis=1)), stats.predictor_calls)


def evaluate(load_model: Callable[[], MoEModel], tokenizer: Tokenizer, examples: Sequence[Example],
             policies: Sequence[str] = DEFAULT_POLICIES, budgets: Sequence[str] = DEFAULT_BUDGETS,
             max_new_tokens: int = 24, calibration: RoutingTrace | None = None,
             base: SessionConfig | None = None, random_draws: int = RANDOM_DRAWS,
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

    def rows_for(policy: str, budget: str, runs: list[_Run]) -> list[EvalRow]:
        rows = []
        for task, idx in by_task.items():
            ref_ppl = math.exp(sum(reference.nll[i][0] for i in idx)
                               / sum(reference.nll[i][1] for i in idx))
            agreement, scores, nll = [], [], 0.0
            for run in runs:
                agreement.append(sum(token_agreement(run.tokens[str(i)], reference.tokens[str(i)])
                                     for i in idx) / len(idx))
                scores.append([quality(task, text(run.tokens[str(i)]), examples[i].answer)
                               for i in idx])
                nll += sum(run.nll[i][0] for i in idx) / len(runs)
            tokens = sum(reference.nll[i][1] for i in idx)
            ppl = math.exp(nll / tokens)
            hits = [sum(run.hits.get(task, [0.0] * 4)[j] for run in runs) for j in range(4)]
            draws = len(runs) > 1
            rows.append(EvalRow(
                policy=policy, budget=budget, task=task, n=len(idx),
                agreement=statistics.fmean(agreement),
                perplexity=ppl, perplexity_change_pct=100.0 * (ppl / ref_ppl - 1.0),
                quality=statistics.fmean(sum(s for s, _ in q) / len(idx) for q in scores),
                quality_metric=scores[0][0][1],
                hit_rate=hits[0] / hits[1] if hits[1] else 1.0,
                proxy=hits[2] / hits[3] if hits[3] else 1.0,
                budget_fraction=runs[0].fraction, slots_per_layer=runs[0].slots_per_layer,
                predictor_calls=statistics.fmean(run.predictor_calls for run in runs),
                nll=nll, answer_tokens=tokens,
                agreement_draws=tuple(agreement) if draws else (),
                quality_draws=tuple(sum(s for s, _ in q) / len(idx) for q in scores)
                if draws else ()))
        return rows

    rows = rows_for("all", "100%", [reference])
    order = sorted(policies, key=lambda p: p == "random")  # random takes emoe's layer sizes
    for budget in budgets:
        sizes: list[int] | None = None
        for policy in order:
            if policy == "random":
                if sizes is None:
                    sizes = list(_run(load_model, tokenizer, examples, _with(base, "emoe", budget),
                                      max_new_tokens, calibration).slots_per_layer)
                runs = []
                for draw in range(random_draws):
                    if progress is not None:
                        progress(f"random @ {budget} (draw {draw + 1}/{random_draws}, "
                                 f"slots per layer {sizes})")
                    config = dataclasses.replace(_with(base, "random", budget),
                                                 experts_per_layer=base.experts_per_layer
                                                 or sizes, random_seed=draw)
                    runs.append(_run(load_model, tokenizer, examples, config, max_new_tokens,
                                     calibration))
                rows += rows_for(policy, budget, runs)
                continue
            if progress is not None:
                progress(f"{policy} @ {budget}")
            run = _run(load_model, tokenizer, examples, _with(base, policy, budget),
                       max_new_tokens, calibration)
            if policy == "emoe":
                sizes = list(run.slots_per_layer)
            rows += rows_for(policy, budget, [run])
    return rows


def _with(base: SessionConfig, planner: str, budget: str) -> SessionConfig:
    return dataclasses.replace(base, planner=planner, budget=budget,
                               miss=None if planner == "all" else base.miss)


def summarize(rows: Sequence[EvalRow], sensitivity: str = "hand-set",
              run: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (planner, budget): the means over tasks (as the tables' mean column),
    pooled perplexity, hit rate and proxy (weighted by ``sensitivity``: a file, or the
    hand-set defaults), the spread over random draws, and per task. ``run``: how the rows
    were measured (``run_config``), copied into every row so the simulator can replay it
    (``emoe calibrate-proxy``)."""
    groups: dict[tuple[str, str], list[EvalRow]] = defaultdict(list)
    for r in rows:
        groups[(r.policy, r.budget)].append(r)
    out = []
    for (policy, budget), group in groups.items():
        first = group[0]
        row: dict[str, Any] = {
            "planner": policy, "budget": round(first.budget_fraction, 4), "budget_label": budget,
            "slots_per_layer": list(first.slots_per_layer),
            "agreement": statistics.fmean(r.agreement for r in group),
            "quality": statistics.fmean(r.quality for r in group),
            "perplexity": math.exp(sum(r.nll for r in group)
                                   / max(1, sum(r.answer_tokens for r in group))),
            "perplexity_change_pct": statistics.fmean(r.perplexity_change_pct for r in group),
            "hit_rate": statistics.fmean(r.hit_rate for r in group),
            "proxy": statistics.fmean(r.proxy for r in group),
            "predictor_calls": first.predictor_calls,
            "sensitivity": sensitivity,
            "prompts": sum(r.n for r in group),
        }
        if first.agreement_draws:
            for metric in ("agreement", "quality"):
                per_draw = [statistics.fmean(vals) for vals in
                            zip(*(getattr(r, f"{metric}_draws") for r in group))]
                row[f"{metric}_sd"] = statistics.stdev(per_draw) if len(per_draw) > 1 else 0.0
                row[f"{metric}_min"] = min(per_draw)
                row[f"{metric}_max"] = max(per_draw)
            row["draws"] = len(first.agreement_draws)
        row["tasks"] = {r.task: {"agreement": r.agreement, "quality": r.quality,
                                 "perplexity": r.perplexity, "hit_rate": r.hit_rate,
                                 "proxy": r.proxy, "n": r.n} for r in group}
        if run is not None:
            row["run"] = run
        out.append(row)
    return out


def format_tables(rows: Sequence[EvalRow]) -> str:
    """Markdown: one table per metric, a row per (policy, budget), a column per task + mean."""
    tasks = list(dict.fromkeys(r.task for r in rows))
    keys = list(dict.fromkeys((r.policy, r.budget) for r in rows))
    cell = {(r.policy, r.budget, r.task): r for r in rows}
    out = []
    metrics = (("Greedy-token agreement with all experts", "agreement", "{:.3f}"),
               ("Perplexity change vs all experts (%)", "perplexity_change_pct", "{:+.1f}"),
               ("Task quality (summarization: ROUGE-L F1; others: exact match)", "quality", "{:.3f}"),
               ("Expert hit rate (router choices resident)", "hit_rate", "{:.3f}"),
               ("Accuracy proxy (sensitivity-weighted hit rate)", "proxy", "{:.3f}"))
    for title, attr, fmt in metrics:
        out.append(f"**{title}**\n")
        out.append("| policy | budget | slots per layer | " + " | ".join(tasks) + " | mean |")
        out.append("|---|---|---|" + "---|" * (len(tasks) + 1))
        for policy, budget in keys:
            values = [getattr(cell[(policy, budget, t)], attr) for t in tasks]
            slots = ",".join(map(str, cell[(policy, budget, tasks[0])].slots_per_layer))
            out.append(f"| {policy} | {budget} | {slots} | "
                       + " | ".join(fmt.format(v) for v in values)
                       + " | " + fmt.format(sum(values) / len(values)) + " |")
        out.append("")
    spread = [s for s in summarize(rows) if "agreement_sd" in s]
    if spread:
        out.append("**random: spread over draws (mean over tasks)**\n")
        out.append("| budget | draws | agreement mean | sd | min | max | quality mean | sd |")
        out.append("|---|---|---|---|---|---|---|---|")
        for s in spread:
            out.append(f"| {s['budget_label']} | {s['draws']} | {s['agreement']:.3f} | "
                       f"{s['agreement_sd']:.3f} | {s['agreement_min']:.3f} | "
                       f"{s['agreement_max']:.3f} | {s['quality']:.3f} | {s['quality_sd']:.3f} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--policy", action="append", help=f"expert planner, repeatable "
                   f"(default: {', '.join(DEFAULT_POLICIES)})")
    p.add_argument("--expert-budget", action="append", dest="budgets", metavar="BUDGET",
                   type=_budget,
                   help="experts per layer (5/layer), a fraction of all experts (62.5%%, "
                        "0.625) or a size (64MiB), repeatable (default: "
                        + ", ".join(b.replace("%", "%%") for b in DEFAULT_BUDGETS) + ")")
    p.add_argument("--miss", choices=["reroute", "fetch", "drop"], default=None,
                   help="miss handling (default: fetch for lru, reroute otherwise)")
    p.add_argument("--per-task", type=int, default=20, help="prompts per task (default 20)")
    p.add_argument("--seed", type=int, default=1, help="prompt seed (default 1: the reference "
                   "model's held-out prompts)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--prediction-interval", type=int, default=40)
    p.add_argument("--adaptive-interval", action="store_true",
                   help="re-predict early when the hit rate drops, stretch p while it holds")
    p.add_argument("--calibration", default=None,
                   help="routing trace of other prompts: warms the predictor, measures output "
                        "lengths, pins static")
    p.add_argument("--sensitivity", type=Path, default=None,
                   help="sensitivity file from `emoe sensitivity` (default: the task profiles' "
                        "hand-set sensitivity)")
    p.add_argument("--sensitivity-mode", choices=["graded", "binary"], default="graded",
                   help="which s of the sensitivity file (default graded)")
    p.add_argument("--slot-allocation", choices=["sensitivity", "uniform"],
                   default="sensitivity",
                   help="emoe/predict-every: split slots over layers by measured value, or "
                        "the same number per layer (default sensitivity)")
    p.add_argument("--predictor", default="frequency",
                   help="expert predictor of emoe/predict-every: frequency, last-prompt, or "
                        "learned:FILE (from `emoe predictor train`)")
    p.add_argument("--experts-per-layer", default=None, metavar="L0,L1,...",
                   help="force these slots per layer for every planner (their sum must fit "
                        "each --expert-budget)")
    p.add_argument("--random-draws", type=int, default=RANDOM_DRAWS,
                   help=f"random expert sets averaged for --policy random (default "
                        f"{RANDOM_DRAWS})")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, type=Path,
                   help="also write one row per planner and budget as JSON here")


def _budget(text: str) -> str:
    """A budget as written, checked (``emoe.core.budget``: the spellings of every command)."""
    from emoe.core.budget import ExpertBudget
    from emoe.core.errors import ConfigError

    try:
        ExpertBudget.parse(text, flag=None)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from emoe.core.errors import ConfigError
    from emoe.core.routing_trace import read_routing_trace
    from emoe.core.sensitivity import load_sensitivity
    from emoe.core.tasks import DEFAULT_TASKS
    from emoe.engine.checkpoint import load_model
    from emoe.engine.offload.session import SessionConfig
    from emoe.engine.reference.data import TASKS, generate_examples
    from emoe.engine.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.per_task < 1 or args.random_draws < 1:
        raise ConfigError("--per-task and --random-draws: at least 1 is needed")
    tokenizer = Tokenizer.from_folder(args.checkpoint)
    examples = generate_examples(args.per_task * len(TASKS), seed=args.seed)
    calibration = read_routing_trace(args.calibration) if args.calibration else None
    forced = None
    if args.experts_per_layer:
        try:
            forced = [int(v) for v in args.experts_per_layer.split(",")]
        except ValueError:
            raise ConfigError(f"--experts-per-layer {args.experts_per_layer!r}: integers, e.g. "
                              f"8,4,2,2") from None
    sensitivity, source = None, None
    if args.sensitivity is not None:
        layers = load_model(args.checkpoint).config.num_layers
        sensitivity, source = load_sensitivity(args.sensitivity, args.sensitivity_mode, layers,
                                               list(DEFAULT_TASKS))
    base = SessionConfig(miss=args.miss, prediction_interval=args.prediction_interval,
                         max_batch_size=args.max_batch_size, device=args.device,
                         predictor=args.predictor, sensitivity=sensitivity,
                         sensitivity_source=source, slot_allocation=args.slot_allocation,
                         adaptive_interval=args.adaptive_interval, experts_per_layer=forced)
    print(f"eval: sensitivity: {_describe(source)}", file=sys.stderr)
    rows = evaluate(lambda: load_model(args.checkpoint), tokenizer, examples,
                    policies=args.policy or DEFAULT_POLICIES,
                    budgets=args.budgets or DEFAULT_BUDGETS,
                    max_new_tokens=args.max_new_tokens, calibration=calibration, base=base,
                    random_draws=args.random_draws,
                    progress=lambda s: print(f"eval: {s}", file=sys.stderr))
    print(format_tables(rows))
    if args.json:
        weights = (f"{args.sensitivity} ({args.sensitivity_mode})"
                   if args.sensitivity is not None else "hand-set")
        args.json.write_text(json.dumps(summarize(rows, weights, run_config(args, forced)),
                                        indent=1) + "\n")
    return 0


def run_config(args: argparse.Namespace, forced: list[int] | None) -> dict[str, Any]:
    """What a row needs to be replayed: the prompts, the engine's batch, the planner's
    settings and history (every option of the command but the planners and budgets)."""
    return {"checkpoint": str(args.checkpoint), "prompt_seed": args.seed,
            "per_task": args.per_task, "max_new_tokens": args.max_new_tokens,
            "max_batch_size": args.max_batch_size, "scheduling": "fcfs",
            "prediction_interval": args.prediction_interval,
            "adaptive_interval": args.adaptive_interval,
            "calibration": args.calibration,
            "sensitivity": None if args.sensitivity is None else str(args.sensitivity),
            "sensitivity_mode": args.sensitivity_mode, "slot_allocation": args.slot_allocation,
            "predictor": args.predictor, "experts_per_layer": forced, "miss": args.miss,
            "random_draws": args.random_draws, "device": args.device,
            "command": "emoe " + " ".join(getattr(args, "argv", []))}


def _describe(source: dict | None) -> str:
    if source is None:
        return "hand-set defaults of emoe.core.tasks (not measured)"
    return (f"{source['mode']} s from {source['file']} (measured on {source['model']}, "
            f"{source['metric']} loss, threshold {source['threshold']:g})")

