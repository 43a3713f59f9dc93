"""Wall time of `emoe sim` on the whole Azure conversation trace (19,366 requests), process
start included, for the eMoE expert planner under each scheduling policy.

    .venv/bin/python benchmarks/sim_azure_conv.py [--repeat 5] [--configs emoe/emoe,...]

Target (issue 13): emoe/emoe 15x faster than Vidur on the same trace (Vidur, with its latency
predictions cached, took 50-52 s where emoe took 6.1-6.4 s, medians of interleaved runs on one
quiet machine; ~36 s on this project's dev box earlier). The configurations run interleaved,
``--repeat`` times each; the table gives the median and best wall time, the median user+sys
CPU time of the `emoe sim` process (on a shared box the wall time includes waiting for a
core), and the load average over the measurement.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
EMOE = Path(sys.executable).with_name("emoe")


def measure(scheduler: str, planner: str) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([str(EMOE), "sim", "--trace", str(TRACE), "--scheduler", scheduler,
                           "--experts", planner, "--no-progress"],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = next(l for l in done.stdout.splitlines() if "SLO attainment" in l)
    return wall, cpu, line.split(",")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--configs", default="emoe/emoe,fcfs/emoe,sjf/emoe,edf/emoe,"
                                             "fcfs/predict-every")
    args = parser.parse_args()
    configs = [tuple(c.split("/")) for c in args.configs.split(",")]
    print(f"trace {TRACE} ({sum(1 for _ in open(TRACE)) - 1} requests); "
          f"{os.cpu_count()} CPUs; {args.repeat} interleaved runs of each configuration")
    runs: dict[tuple, list] = {c: [] for c in configs}
    load_start = os.getloadavg()[0]
    for _ in range(args.repeat):
        for config in configs:
            runs[config].append(measure(*config))
    load_end = os.getloadavg()[0]
    print(f"{'configuration':22s} {'median wall':>11s} {'best wall':>9s} {'median cpu':>10s}  result")
    for (scheduler, planner), results in runs.items():
        walls = [w for w, _, _ in results]
        cpus = [c for _, c, _ in results]
        print(f"{scheduler + '/' + planner:22s} {statistics.median(walls):9.2f} s "
              f"{min(walls):7.2f} s {statistics.median(cpus):8.2f} s  {results[0][2]}")
    print(f"load average (1 min): {load_start:.2f} at the start, {load_end:.2f} at the end")


if __name__ == "__main__":
    main()
