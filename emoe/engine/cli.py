"""The engine's ``emoe`` subcommands: a table of (name, module, help).

Each module defines ``add_arguments(parser)`` and ``run(args) -> int`` and imports torch only
inside ``run``, so building the parser stays cheap. Adding a command is one line here.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("generate", "emoe.engine.generate_cmd", "generate tokens from a Hugging Face checkpoint folder"),
    ("eval", "emoe.engine.evaluate", "accuracy of expert offloading policies and budgets vs all experts"),
    ("profile", "emoe.engine.profile", "measure step time, expert copies and memory for the simulator"),
    ("record-routing", "emoe.engine.routing", "record a routing trace of the reference tasks"),
    ("predictor", "emoe.engine.predictor_cmd",
     "train the learned expert predictor on routing traces and compare its set recall"),
    ("calibrate-proxy", "emoe.sim.calibrate",
     "replay `emoe eval` runs in the simulator and fit its accuracy proxy to their measured "
     "agreement and quality"),
    ("sensitivity", "emoe.engine.sensitivity",
     "measure per task and MoE layer how much wrong routing costs; write a sensitivity file"),
    ("model", "emoe.engine.reference.cli", "train or evaluate the reference model (train-tiny, eval-tiny)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, module, help_text in COMMANDS:
        command = importlib.import_module(module)
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        command.add_arguments(parser)
        parser.set_defaults(func=command.run)
