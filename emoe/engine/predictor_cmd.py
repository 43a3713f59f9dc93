"""``emoe predictor train``: train the learned expert predictor on routing traces, compare its
set recall with the frequency and last-prompt predictors on held-out prompts, and save it
(see emoe/engine/learned_predictor.py). torch is imported only when the command runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="predictor_command", metavar="PREDICTOR_COMMAND", required=True)
    train = sub.add_parser("train", help="train the learned predictor on routing traces",
                           description="Train the learned expert predictor on routing traces, "
                                       "compare its set recall with the frequency and "
                                       "last-prompt predictors on held-out prompts, save it.")
    train.add_argument("--routing-trace", action="append", type=Path, required=True,
                       help="training routing trace (Parquet), repeatable")
    train.add_argument("--held-out", type=Path, required=True,
                       help="routing trace of other prompts to measure set recall on")
    train.add_argument("-o", "--output", type=Path, required=True,
                       help="predictor file to write (safetensors)")
    train.add_argument("--hidden", type=int, default=64)
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from emoe.core.errors import ConfigError
    from emoe.core.predictor import FrequencyPredictor, LastPromptPredictor
    from emoe.core.routing_trace import read_routing_trace
    from emoe.engine.learned_predictor import (RECALL_FRACTIONS, LearnedPredictor,
                                               call_seconds, evaluate_recall, save_predictor,
                                               train_predictor)

    if args.threads:
        torch.set_num_threads(args.threads)
    traces = [read_routing_trace(p) for p in args.routing_trace]
    held_out = read_routing_trace(args.held_out)
    shapes = {(t.num_layers, t.num_experts) for t in [*traces, held_out]}
    if len(shapes) != 1:
        raise ConfigError(f"routing traces of different models: layers x experts {sorted(shapes)}")
    learned = train_predictor(traces, hidden=args.hidden, steps=args.steps, lr=args.lr,
                              seed=args.seed, log=lambda s: print(f"train: {s}", file=sys.stderr))
    layers, experts = shapes.pop()
    tasks = list(learned.task_index)
    recall = evaluate_recall({"frequency": FrequencyPredictor(layers, experts),
                              "last-prompt": LastPromptPredictor(layers, experts),
                              "learned": LearnedPredictor(learned.net, tasks)},
                             traces, held_out)
    seconds = call_seconds(LearnedPredictor(learned.net, tasks), tasks)
    wins = all(l > f for l, f in zip(recall["learned"], recall["frequency"]))
    report = {"recall": recall, "fractions": list(RECALL_FRACTIONS),
              "call_seconds": seconds, "beats_frequency": wins,
              "training": [str(p) for p in args.routing_trace], "held_out": str(args.held_out),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_predictor(learned, args.output, report)
    print("Set recall on held-out prompts (share of router choices, prompt and generated "
          "tokens, in the predicted top m per layer)\n")
    print("| predictor | " + " | ".join(f"{f:.0%} of experts" for f in RECALL_FRACTIONS) + " |")
    print("|---|" + "---|" * len(RECALL_FRACTIONS))
    for name, values in recall.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    print(f"\nlearned predictor call: {seconds * 1e3:.2f} ms (median of 200, CPU, "
          f"{torch.get_num_threads()} threads)")
    verdict = ("beats" if wins else "does not beat")
    print(f"the learned predictor {verdict} the frequency predictor at every size; wrote "
          f"{args.output}")
    return 0
