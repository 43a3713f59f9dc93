"""``emoe sensitivity``: measure, on the real engine, how much each task loses per MoE layer
when that layer's routing goes wrong, and write a sensitivity file (``emoe.core.sensitivity``).

The task's prompts run greedy with every expert resident (the reference), then for each
(method, layers, slot count) with those layers restricted to ``m`` resident experts and tokens
rerouted to the best resident experts, as the offloading executor does under a budget. Which
``m`` experts (``expert_order``):

- ``mix`` (default): the ``m`` most used by all tasks together in their reference runs
  (prompts and generated tokens). This is the order in which a planner serving a mix of tasks
  fills a layer, so the losses measured at growing ``m`` are the marginal values its slot
  allocation needs. A task's *own* most used experts would instead measure how concentrated
  its routing is, not what it loses when served by a set chosen for everyone.
- ``random``: ``draws`` random sets (seeded), closer to the paper's "routing made random".

- ``single-layer``: each layer alone;
- ``progressive`` (the paper's): layers 0..j together, from the input side.

Agreement and task quality are measured against the reference, and ``miss`` is the share of
the restricted layers' router choices in the reference run that fall outside the kept experts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emoe.core.sensitivity import METHODS, METRICS, Measurement, SensitivityProfile
from emoe.engine.evaluate import quality, token_agreement
from emoe.engine.reference import REFERENCE_MODEL_DIR
from emoe.engine.reference.data import Example

if TYPE_CHECKING:
    from emoe.engine.engine import Engine
    from emoe.engine.offload.executor import OffloadedExperts
    from emoe.engine.tokenizer import Tokenizer


@dataclass(slots=True)
class _Output:
    tokens: list[int]
    routing: np.ndarray  # [layers, experts] router choices over prompt and generated tokens


class _Runner:
    """One model with every expert in the slot pool; runs prompts under a resident mask."""

    def __init__(self, engine: Engine, experts: OffloadedExperts, tokenizer: Tokenizer,
                 max_new_tokens: int):
        self.engine, self.experts, self.tokenizer = engine, experts, tokenizer
        self.max_new_tokens = max_new_tokens
        cfg = engine.config
        self.shape = (cfg.num_layers, cfg.num_experts)
        self.eos = set(cfg.eos_token_ids)
        self._ids = 0

    def set_resident(self, mask: np.ndarray) -> None:
        cache = self.experts.cache
        resident = {(l, e) for l, e in cache.resident()}
        wanted = {(int(l), int(e)) for l, e in zip(*np.nonzero(mask))}
        cache.apply(evict=sorted(resident - wanted), load=sorted(wanted - resident))
        cache.synchronize()

    def run(self, examples: Sequence[Example], mask: np.ndarray) -> list[_Output]:
        from emoe.engine.engine import fcfs_plan
        from emoe.engine.sampling import SamplingParams

        self.set_resident(mask)
        order = []
        for ex in examples:
            rid = f"s{self._ids}"
            self._ids += 1
            self.engine.add_request(rid, self.tokenizer.encode(ex.prompt),
                                    SamplingParams(max_new_tokens=self.max_new_tokens))
            order.append(rid)
        outputs = {rid: _Output([], np.zeros(self.shape, dtype=np.int64)) for rid in order}
        pending = set(order)
        while pending:
            result = self.engine.execute(fcfs_plan(self.engine, order, self.engine.prefill_chunk))
            for rid, counts in (*result.routing.items(), *result.decode_routing.items()):
                outputs[rid].routing += counts
            for out in result.outputs:
                outputs[out.request_id].tokens.extend(out.token_ids)
                if out.finished:
                    pending.discard(out.request_id)
        return [outputs[rid] for rid in order]

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.eos])


EXPERT_ORDERS = ("mix", "random")


def profile_sensitivity(runner: _Runner, examples: Sequence[Example], slots: Sequence[int],
                        methods: Sequence[str], model_name: str, metric: str = "agreement",
                        threshold: float = 0.05, expert_order: str = "mix", draws: int = 2,
                        seed: int = 0,
                        progress: Callable[[str], None] | None = None) -> SensitivityProfile:
    """Measure every task of ``examples`` (see module); returns the profile without
    provenance beyond the model and its shape."""
    rng = np.random.default_rng(seed)
    layers, experts = runner.shape
    everything = np.ones(runner.shape, dtype=bool)
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    profile = SensitivityProfile(model=model_name, num_layers=layers, num_experts=experts,
                                 top_k=runner.engine.config.top_k, metric=metric,
                                 threshold=threshold)
    references = {task: runner.run(task_examples, everything)
                  for task, task_examples in by_task.items()}
    mix = sum(o.routing for outputs in references.values() for o in outputs)  # [layers, experts]
    by_use = np.argsort(-mix, axis=1, kind="stable")
    if expert_order == "mix":
        draws = 1
    # the same sets serve both methods: progressive layers 0..0 is single-layer 0
    kept = {(layer, m, d): (by_use[layer, :m] if expert_order == "mix"
                            else rng.permutation(experts)[:m])
            for layer in range(layers) for m in slots for d in range(draws)}
    for task, task_examples in by_task.items():
        reference = references[task]
        profile.baseline[task] = float(np.mean([
            quality(task, runner.text(o.tokens), ex.answer)[0]
            for o, ex in zip(reference, task_examples)]))
        usage = sum(o.routing for o in reference)  # [layers, experts]
        done: dict[tuple[tuple[int, ...], int, int], Measurement] = {}
        for method in methods:
            groups = ([(layer,) for layer in range(layers)] if method == "single-layer"
                      else [tuple(range(j + 1)) for j in range(layers)])
            for group in groups:
                for m in slots:
                    if progress is not None:
                        progress(f"{task}: {method} layers {list(group)} at {m} experts")
                    for d in range(draws):
                        known = done.get((group, m, d))
                        if known is None:
                            mask = everything.copy()
                            for layer in group:
                                mask[layer] = False
                                mask[layer, kept[(layer, m, d)]] = True
                            known = done[(group, m, d)] = _measure(
                                runner, task, task_examples, reference, usage, mask, group, m)
                        profile.measurements.append(Measurement(
                            task=task, method=method, layers=group, slots=m,
                            agreement=known.agreement, quality=known.quality, miss=known.miss))
    return profile


def _measure(runner: _Runner, task: str, examples: Sequence[Example], reference: list[_Output],
             usage: np.ndarray, mask: np.ndarray, group: tuple[int, ...], m: int) -> Measurement:
    outputs = runner.run(examples, mask)
    rows = list(group)
    miss = 1.0 - float((usage[rows] * mask[rows]).sum() / max(1, usage[rows].sum()))
    return Measurement(
        task=task, method="", layers=group, slots=m,
        agreement=float(np.mean([token_agreement(o.tokens, r.tokens)
                                 for o, r in zip(outputs, reference)])),
        quality=float(np.mean([quality(task, runner.text(o.tokens), ex.answer)[0]
                               for o, ex in zip(outputs, examples)])),
        miss=miss)


def format_profile(profile: SensitivityProfile) -> str:
    """Markdown: graded and binary s per task and layer."""
    layers = range(profile.num_layers)
    out = [f"sensitivity of {profile.model} ({profile.metric} loss; graded: loss per unit of "
           f"missed routing mass; binary: loss > {profile.threshold:g})", "",
           "| task | " + " | ".join(f"graded L{l}" for l in layers) + " | "
           + " | ".join(f"binary L{l}" for l in layers) + " |",
           "|---|" + "---|" * (2 * profile.num_layers)]
    graded, binary = profile.table("graded"), profile.table("binary")
    for task in profile.tasks:
        out.append(f"| {task} | " + " | ".join(f"{v:.3f}" for v in graded[task]) + " | "
                   + " | ".join(f"{v:g}" for v in binary[task]) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------- the command
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers, e.g. 2,4") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def _methods(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: methods are {', '.join(METHODS)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=str(REFERENCE_MODEL_DIR),
                   help="model folder (config.json, *.safetensors, tokenizer.json); default: "
                        "the reference model emoe-tiny")
    p.add_argument("-o", "--output", required=True, type=Path, help="sensitivity file to write")
    p.add_argument("--per-task", type=int, default=20, help="prompts per task (default 20)")
    p.add_argument("--seed", type=int, default=2, help="prompt seed (default 2: neither the "
                   "training nor the `emoe eval` prompts)")
    p.add_argument("--slots", type=_int_list, default=None,
                   help="experts kept in a restricted layer, comma-separated (default: top-k, "
                        "a half and three quarters of the experts)")
    p.add_argument("--method", type=_methods, default=list(METHODS),
                   help="single-layer, progressive or both (default: both)")
    p.add_argument("--metric", choices=METRICS, default="agreement",
                   help="loss measured: greedy-token agreement or task quality (default "
                        "agreement)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="loss above which a layer is sensitive, for binary s (default 0.05)")
    p.add_argument("--expert-order", choices=EXPERT_ORDERS, default="mix",
                   help="experts a restricted layer keeps: the most used by all tasks together "
                        "(mix, default) or random sets")
    p.add_argument("--draws", type=int, default=2,
                   help="random sets per layer and slot count with --expert-order random "
                        "(default 2)")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of the random expert sets")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from emoe.core.errors import ConfigError
    from emoe.engine.checkpoint import load_model
    from emoe.engine.engine import Engine
    from emoe.core.budget import ExpertBudget
    from emoe.engine.offload.executor import OffloadedExperts
    from emoe.engine.reference.data import TASKS, generate_examples
    from emoe.engine.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.per_task < 1:
        raise ConfigError(f"--per-task {args.per_task}: at least 1 prompt per task is needed")
    started = time.perf_counter()
    tokenizer = Tokenizer.from_folder(args.checkpoint)
    model = load_model(args.checkpoint)
    cfg = model.config
    slots = args.slots or sorted({cfg.top_k, max(cfg.top_k, cfg.num_experts // 2),
                                  max(cfg.top_k, 3 * cfg.num_experts // 4)})
    if max(slots) >= cfg.num_experts:
        raise ConfigError(f"--slots {','.join(map(str, slots))}: a restricted layer keeps fewer "
                          f"than the model's {cfg.num_experts} experts")
    experts = OffloadedExperts.install(model, ExpertBudget.parse("100%"), device=args.device)
    engine = Engine(model, max_batch_size=args.max_batch_size, expert_handler=experts)
    runner = _Runner(engine, experts, tokenizer, args.max_new_tokens)
    examples = generate_examples(args.per_task * len(TASKS), seed=args.seed)
    name = Path(args.checkpoint).resolve().name
    if args.draws < 1:
        raise ConfigError(f"--draws {args.draws}: at least 1 random expert set is needed")
    profile = profile_sensitivity(runner, examples, slots, args.method, name, args.metric,
                                  args.threshold, args.expert_order, args.draws, args.draw_seed,
                                  progress=lambda s: print(f"sensitivity: {s}", file=sys.stderr))
    profile.provenance = {
        "command": "emoe " + shlex.join(getattr(args, "argv", ["sensitivity"])),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": str(args.checkpoint),
        "prompts": {"source": "emoe.engine.reference.data", "seed": args.seed,
                    "per_task": args.per_task, "max_new_tokens": args.max_new_tokens},
        "methods": list(args.method), "slots": slots,
        "expert_choice": ("the most used experts of all tasks' all-experts runs"
                          if args.expert_order == "mix" else
                          f"{args.draws} random sets per layer and slot count (seed "
                          f"{args.draw_seed})") + "; misses rerouted to the best resident experts",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 1),
    }
    profile.to_file(args.output)
    print(format_profile(profile))
    print(f"\nwrote {args.output}")
    return 0
