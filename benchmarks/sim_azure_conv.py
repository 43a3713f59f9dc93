"""Wall time of `emoe sim` on the whole Azure conversation trace (19,366 requests), process
start included, for the eMoE expert planner under each scheduling policy.

    .venv/bin/python benchmarks/sim_azure_conv.py [--repeat 3]

Target (issue 2): at most 3.5 s under the `emoe` policies on a 2-core CPU; Vidur takes ~36 s.
Prints the best wall time of each configuration, and its user+sys CPU time (on a shared box
the wall time includes waiting for a core).
"""

from __future__ import annotations

import argparse
import os
import resource
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
    line = next(l for l in done.stdout.splitlines() if "requests over" in l)
    return wall, cpu, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--configs", default="fcfs/emoe,emoe/emoe,edf/emoe,fcfs/predict-every")
    args = parser.parse_args()
    print(f"trace {TRACE} ({sum(1 for _ in open(TRACE)) - 1} requests); "
          f"{os.cpu_count()} CPUs; best of {args.repeat}")
    for config in args.configs.split(","):
        scheduler, planner = config.split("/")
        runs = [measure(scheduler, planner) for _ in range(args.repeat)]
        wall, cpu, line = min(runs)
        print(f"{config:22s} wall {wall:5.2f} s  cpu {cpu:5.2f} s  | {line}")


if __name__ == "__main__":
    main()
