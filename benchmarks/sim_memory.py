"""Peak RSS of `emoe sim` on synthetic streams of growing length: it must not grow with the
number of requests (requests are streamed in and metrics aggregated in bounded memory).

    .venv/bin/python benchmarks/sim_memory.py [--sizes 10000,100000,1000000]

Each size runs in its own process (`emoe sim --synthetic N`, fcfs scheduling, emoe planner);
prints the requests, the wall time and the peak RSS (ru_maxrss of the child).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

EMOE = Path(sys.executable).with_name("emoe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--scheduler", default="fcfs")
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        # a fresh process per size: RUSAGE_CHILDREN's maxrss is the largest child so far,
        # so sizes run in increasing order report each one's own peak
        done = subprocess.run(
            [sys.executable, "-c",
             "import resource, sys; from emoe.cli import main; rc = main(sys.argv[1:]); "
             "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
             "raise SystemExit(rc)",
             "sim", "--synthetic", str(size), "--rate", str(args.rate), "--scheduler",
             args.scheduler, "--experts", "emoe", "--no-progress"],
            capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        rss = int(done.stdout.split("maxrss_kib")[-1].split()[0]) / 1024
        line = next(l for l in done.stdout.splitlines() if "requests over" in l)
        print(f"{size:>9,d} requests  wall {wall:7.1f} s  peak RSS {rss:6.0f} MiB  | {line}")


if __name__ == "__main__":
    main()
