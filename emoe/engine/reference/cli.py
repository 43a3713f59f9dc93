"""``emoe model train-tiny`` and ``emoe model eval-tiny``: the reference model's commands.

Registered in ``emoe.engine.cli``; torch is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from emoe.engine.reference import REFERENCE_MODEL_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_command", metavar="MODEL_COMMAND", required=True)
    train = sub.add_parser("train-tiny", help="train the reference model and write its folder",
                           description="Generate the multi-task data, train the tokenizer and a "
                                       "small Mixtral-architecture model, save it in the Hugging "
                                       "Face layout, evaluate the stored weights, write the card.")
    train.add_argument("--out", type=Path, default=Path("out/emoe-tiny"),
                       help="output folder (default: out/emoe-tiny)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, help="training steps (default: the artifact's)")
    train.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                       help="stored weight type (default: bfloat16)")
    train.add_argument("--threads", type=int, default=1,
                       help="torch threads (default: 1: this small model trains fastest on one "
                            "thread, and the committed model was trained at 1; results are "
                            "reproducible at a given thread count)")
    evaluate = sub.add_parser("eval-tiny", help="evaluate a reference-model folder",
                              description="Per-task quality and routing divergence on the "
                                          "held-out prompts recorded in the folder's metrics.json.")
    evaluate.add_argument("folder", nargs="?", type=Path, default=REFERENCE_MODEL_DIR,
                          help="default: the committed emoe-tiny")
    evaluate.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.model_command == "train-tiny":
        return _train(args)
    return _evaluate(args)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from emoe.engine.reference.artifact import build_reference_model
    from emoe.engine.reference.train import TrainConfig

    config = TrainConfig(seed=args.seed)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    command = "emoe model " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if sys.argv[1:2] == ["model"] else "emoe model train-tiny"
    report = build_reference_model(config, args.out, dtype=args.dtype, command=command,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({k: report[k] for k in ("quality", "routing", "random_init_routing",
                                            "train_seconds", "size_bytes")}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from emoe.engine.reference.artifact import evaluate_folder, load_train_config

    report = evaluate_folder(args.folder, load_train_config(args.folder))
    print(json.dumps(report, indent=2))
    return 0
