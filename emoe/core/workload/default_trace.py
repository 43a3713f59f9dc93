"""The built-in traces behind ``emoe sim``'s defaults, and the seeded generators that made them.

Regenerate both with ``python -m emoe.core.workload`` (byte-identical: the generators are
seeded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emoe.core.workload.reader import write_trace
from emoe.core.workload.synthetic import synthetic_requests

TRACES_DIR = Path(__file__).resolve().parents[3] / "traces"
DEFAULT_TRACE = TRACES_DIR / "mixed-tasks-poisson.csv"
"""1,200 requests, Poisson arrivals at 2 req/s (~10 min), uniform mix of the default tasks."""
STUDY_TRACE = TRACES_DIR / "mixed-tasks-bursty.csv"
"""2,000 requests, bursty Gamma arrivals (CV 3) at 14 req/s (~2.4 min), uniform mix of the
default tasks: enough load on one simulated H100 that the scheduling policies differ. The
default ``emoe sim`` study runs on it."""

DEFAULT_TRACE_RATE = 2.0
DEFAULT_TRACE_REQUESTS = 1200
DEFAULT_TRACE_SEED = 2503
STUDY_TRACE_RATE = 14.0
STUDY_TRACE_CV = 3.0
STUDY_TRACE_REQUESTS = 2000
STUDY_TRACE_SEED = 1307


def make_default_trace(path: str | Path = DEFAULT_TRACE) -> int:
    """Write the default trace to ``path``; returns the number of requests written."""
    requests = synthetic_requests(rate=DEFAULT_TRACE_RATE, num_requests=DEFAULT_TRACE_REQUESTS,
                                  seed=DEFAULT_TRACE_SEED)
    return write_trace(path, requests)


def make_study_trace(path: str | Path = STUDY_TRACE) -> int:
    """Write the study trace to ``path``; returns the number of requests written."""
    requests = synthetic_requests(rate=STUDY_TRACE_RATE, cv=STUDY_TRACE_CV,
                                  num_requests=STUDY_TRACE_REQUESTS, seed=STUDY_TRACE_SEED)
    return write_trace(path, requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="write the default (Poisson) trace here instead of traces/")
    parser.add_argument("--study-out", type=Path, default=None,
                        help="write the study (bursty) trace here instead of traces/")
    args = parser.parse_args(argv)
    for make, out, default in ((make_default_trace, args.out, DEFAULT_TRACE),
                               (make_study_trace, args.study_out, STUDY_TRACE)):
        path = out or default
        print(f"wrote {make(path)} requests to {path}")
