"""Wall time of a capacity search: 4 scheduling policies x 3 expert planners x 3 expert
budgets (36 configurations) on the first 15 minutes of the Azure conversation trace, each
configuration's capacity found by bisection on the rate scale (SLO attainment >= 90%), with
one worker process and with two.

    .venv/bin/python benchmarks/sim_search.py [--jobs 1,2] [--minutes 15]

Target (issue 13): within 3 minutes on a 2-core machine, and faster with 2 jobs than with 1.
Prints, per job count, the wall time, the CPU time of the whole process tree, the load
average before and after, the number of simulations, and checks that every job count gives
byte-identical JSON results. The last run's table is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
EMOE = Path(sys.executable).with_name("emoe")
GRID = ["--scheduler", "fcfs,sjf,edf,emoe", "--experts", "lru,static,emoe",
        "--expert-budget", "4/layer,5/layer,6/layer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1,2", help="job counts to time, in order")
    parser.add_argument("--minutes", type=float, default=15.0)
    args = parser.parse_args()
    print(f"trace {TRACE}, first {args.minutes:g} min; {len(os.sched_getaffinity(0))} CPUs "
          f"available; 36 configurations, capacity search (SLO >= 90%, tolerance 5%)")
    outputs: dict[str, str] = {}
    last = ""
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in args.jobs.split(","):
            out = Path(tmp) / f"jobs{jobs}.json"
            command = [str(EMOE), "sim", "--trace", str(TRACE), "--duration",
                       str(args.minutes * 60), *GRID, "--search", "capacity", "--jobs", jobs,
                       "--no-progress", "--json", str(out)]
            load_before = os.getloadavg()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            simulated = next(l for l in done.stdout.splitlines() if l.startswith("simulated"))
            print(f"--jobs {jobs}: wall {wall:6.1f} s  cpu {cpu:6.1f} s  load average "
                  f"{load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}  | {simulated}")
            outputs[jobs] = out.read_text()
            last = done.stdout
    same = len(set(outputs.values())) == 1
    print(f"results identical across job counts: {same}")
    print()
    print(last)
    if not same:
        raise SystemExit("results differ between job counts")


if __name__ == "__main__":
    main()
