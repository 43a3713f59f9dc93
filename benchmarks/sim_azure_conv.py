"""Wall time of `emoe sim` on the whole Azure conversation trace (19,366 requests), process
start included, for the eMoE expert planner under each scheduling policy.

    .venv/bin/python benchmarks/sim_azure_conv.py [--repeat 5] [--configs emoe/emoe,...]
                                                  [--baseline COMMIT]

Target (issue 13): emoe/emoe 15x faster than Vidur on the same trace (Vidur, with its latency
predictions cached, took 50-52 s where emoe took 6.1-6.4 s, medians of interleaved runs on one
quiet machine; ~36 s on this project's dev box earlier). The configurations run interleaved,
``--repeat`` times each; the table gives the median and best wall time, the median user+sys
CPU time of the `emoe sim` process (on a shared box the wall time includes waiting for a
core), and the load average over the measurement. ``--baseline COMMIT`` also runs that
commit's code (extracted with ``git archive``), interleaved with this tree's, for an A/B in
one sitting.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
EMOE = Path(sys.executable).with_name("emoe")


# Runs `emoe` from a source tree given as argv[1] instead of the installed (editable) one.
FROM_SOURCE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
               "repr(f)]; sys.path.insert(0, sys.argv.pop(1)); from emoe.cli import main; "
               "raise SystemExit(main(sys.argv[1:]))")


def measure(scheduler: str, planner: str, source: Path | None = None) -> tuple[float, float, str]:
    command = ([str(EMOE)] if source is None
               else [sys.executable, "-c", FROM_SOURCE, str(source)])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([*command, "sim", "--trace", str(TRACE), "--scheduler", scheduler,
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
    parser.add_argument("--baseline", default=None, metavar="COMMIT",
                        help="also time this commit's code, interleaved")
    args = parser.parse_args()
    configs = [tuple(c.split("/")) for c in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.baseline:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees.append((args.baseline, Path(tmp)))
        print(f"trace {TRACE} ({sum(1 for _ in open(TRACE)) - 1} requests); "
              f"{os.cpu_count()} CPUs; {args.repeat} interleaved runs of each configuration"
              + (f", this tree and {args.baseline}" if args.baseline else ""))
        runs: dict[tuple, list] = {(c, t): [] for t, _ in trees for c in configs}
        load_start = os.getloadavg()[0]
        for _ in range(args.repeat):
            for config in configs:
                for tree, source in trees:
                    runs[(config, tree)].append(measure(*config, source))
        load_end = os.getloadavg()[0]
    print(f"{'configuration':22s} {'code':>12s} {'median wall':>11s} {'best wall':>9s} "
          f"{'median cpu':>10s}  result")
    for ((scheduler, planner), tree), results in runs.items():
        walls = [w for w, _, _ in results]
        cpus = [c for _, c, _ in results]
        print(f"{scheduler + '/' + planner:22s} {tree[:12]:>12s} "
              f"{statistics.median(walls):9.2f} s {min(walls):7.2f} s "
              f"{statistics.median(cpus):8.2f} s  {results[0][2]}")
    print(f"load average (1 min): {load_start:.2f} at the start, {load_end:.2f} at the end")


if __name__ == "__main__":
    main()
