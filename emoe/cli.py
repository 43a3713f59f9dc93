"""The ``emoe`` command. Each part registers its own subcommands; nothing heavy is imported
until a subcommand runs, so ``emoe sim`` starts without loading torch or grpc."""

from __future__ import annotations

import argparse
import importlib
import sys

from emoe.core.errors import EmoeError

# (module, what it adds). Each module defines ``register(subparsers)`` which adds its
# subcommands with ``set_defaults(func=handler)``; handlers take the parsed args and return
# an exit code. Modules keep heavy imports inside their handlers.
PARTS = (
    "emoe.sim.cli",      # sim
    "emoe.engine.cli",   # model train-tiny, generate, eval, profile, record-routing
    "emoe.rpc.cli",      # serve, worker, submit, replay
    "emoe.rpc.fidelity", # fidelity
)


def _learned_predictor(path: str):
    """``learned:FILE`` predictors for every subcommand; torch loads only when one is named."""
    from emoe.engine.learned_predictor import loader

    return loader(path)


SIM = "emoe.sim.cli"
"""``emoe sim`` builds only its own parser: the simulator starts without the engine's and the
service's command modules (and what they import)."""


def build_parser(parts: tuple[str, ...] = PARTS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emoe", description="Memory-efficient, task-aware MoE inference: simulator, engine, gRPC service.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in parts:
        try:
            part = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        part.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from emoe.core.predictor import register_predictor_loader

    register_predictor_loader("learned", _learned_predictor)
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser((SIM,) if words[:1] == ["sim"] else PARTS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for provenance records
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EmoeError as exc:
        print(f"emoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
