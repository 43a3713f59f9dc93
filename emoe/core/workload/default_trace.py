"""The built-in trace behind ``emoe sim``'s defaults, and the seeded generator that made it.

Regenerate with ``python -m emoe.core.workload`` (byte-identical: the generator is seeded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emoe.core.workload.reader import write_trace
from emoe.core.workload.synthetic import synthetic_requests

DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "traces" / "mixed-tasks-poisson.csv"
"""1,200 requests, Poisson arrivals at 2 req/s (~10 min), uniform mix of the default tasks."""

DEFAULT_TRACE_RATE = 2.0
DEFAULT_TRACE_REQUESTS = 1200
DEFAULT_TRACE_SEED = 2503


def make_default_trace(path: str | Path = DEFAULT_TRACE) -> int:
    """Write the default trace to ``path``; returns the number of requests written."""
    requests = synthetic_requests(rate=DEFAULT_TRACE_RATE, num_requests=DEFAULT_TRACE_REQUESTS,
                                  seed=DEFAULT_TRACE_SEED)
    return write_trace(path, requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_TRACE)
    args = parser.parse_args(argv)
    print(f"wrote {make_default_trace(args.out)} requests to {args.out}")
