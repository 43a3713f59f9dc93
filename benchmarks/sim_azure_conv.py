"""Wall time of `emoe sim` on the whole Azure conversation trace (19,366 requests), process
start included, for the eMoE expert planner under each scheduling policy; with ``--vidur-cmd``,
against Vidur on the same trace in the same sitting.

    .venv/bin/python benchmarks/sim_azure_conv.py [--repeat 5] [--configs emoe/emoe,...]
                                                  [--baseline COMMIT] [--vidur-cmd CMD]

Target (issue 13): emoe/emoe 15x faster than Vidur on the same trace (Vidur, with its latency
predictions cached, took 50-52 s where emoe took 6.1-6.4 s, medians of interleaved runs on one
quiet machine). The configurations run interleaved, ``--repeat`` times each; the table gives
the median and best wall time, the median user+sys CPU time of the process (on a shared box
the wall time includes waiting for a core), and the load average over the measurement.
``--baseline COMMIT`` also runs that commit's code (extracted with ``git archive``),
interleaved with this tree's, for an A/B in one sitting.

``--vidur-cmd CMD`` also runs Vidur once per round, after the emoe configurations: CMD is a
shell command that starts Vidur's ``vidur.main`` (model, device and predictor options as you
like); the script appends the trace replay options, with the trace converted to Vidur's
format (arrival seconds, prompt and output tokens; Vidur clips a prompt so that prompt plus
output fit its ``max_tokens``, 4096 by default: 8.3% of this trace's requests). A Vidur run
that trained or predicted its latencies (no cache yet) is reported and not counted; the round
runs Vidur again. The table gives Vidur's total wall time (process start to exit, as for
emoe: the ratio uses it) and its simulation phase alone (from its log, "Starting simulation"
to "Simulation ended", to the second). Vidur is not a dependency of emoe; without
``--vidur-cmd`` it is skipped. To set it up (Python >= 3.10; its `data/profiling` must hold
the profile of the chosen model and device):

    git clone https://github.com/microsoft/vidur /opt/vidur
    python3 -m venv /opt/vidur-venv
    /opt/vidur-venv/bin/pip install -r /opt/vidur/requirements.txt
    --vidur-cmd "cd /opt/vidur && WANDB_MODE=disabled /opt/vidur-venv/bin/python -m vidur.main"

The first Vidur run trains its random-forest predictors and caches their predictions (in
`cache/` of its checkout; minutes); later runs with the same options load them.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
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


VIDUR_UNCACHED = ("Trained model", "Predicting execution time")
"""Vidur's log lines when it trains its predictors or predicts (the cache was missing)."""
VIDUR_STAMP = re.compile(
    r"^\w+ (\d\d-\d\d \d\d:\d\d:\d\d) .*(Starting simulation|Simulation ended)", re.MULTILINE)


def vidur_trace(directory: Path) -> Path:
    """The Azure conversation trace in Vidur's trace replay format."""
    import pandas as pd

    trace = pd.read_csv(TRACE)
    stamps = pd.to_datetime(trace["TIMESTAMP"])
    path = directory / "azure_conv_vidur.csv"
    pd.DataFrame({"arrived_at": (stamps - stamps.iloc[0]).dt.total_seconds(),
                  "num_prefill_tokens": trace["ContextTokens"],
                  "num_decode_tokens": trace["GeneratedTokens"]}).to_csv(path, index=False)
    return path


def measure_vidur(command: str, trace: Path, out: Path) -> tuple[float, float, float, bool]:
    """Wall time, simulation phase (s, from the log), user+sys CPU, and whether the run had
    its latency predictions cached."""
    options = ["--request_generator_config_type", "trace_replay",
               "--trace_request_generator_config_trace_file", str(trace),
               "--metrics_config_output_dir", str(out),
               "--no-metrics_config_store_plots", "--no-metrics_config_enable_chrome_trace"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(f"{command} {shlex.join(options)}", shell=True, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"it failed (exit {done.returncode}): {command}\n{log[-2000:]}")
    stamps = {phase: datetime.strptime(stamp, "%m-%d %H:%M:%S")
              for stamp, phase in VIDUR_STAMP.findall(log)}
    if len(stamps) != 2:
        raise RuntimeError(f"its log has no simulation start and end: {command}\n{log[-2000:]}")
    simulation = (stamps["Simulation ended"] - stamps["Starting simulation"]).total_seconds()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, simulation, cpu, not any(line in log for line in VIDUR_UNCACHED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--configs", default="emoe/emoe,fcfs/emoe,sjf/emoe,edf/emoe,"
                                             "fcfs/predict-every")
    parser.add_argument("--baseline", default=None, metavar="COMMIT",
                        help="also time this commit's code, interleaved")
    parser.add_argument("--vidur-cmd", default=None, metavar="CMD",
                        help="also time Vidur, started by this shell command (see the top of "
                             "this script), interleaved; compared with emoe/emoe")
    args = parser.parse_args()
    configs = [tuple(c.split("/")) for c in args.configs.split(",")]
    if args.vidur_cmd and ("emoe", "emoe") not in configs:
        configs.insert(0, ("emoe", "emoe"))
    with tempfile.TemporaryDirectory() as tmp:
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.baseline:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees.append((args.baseline, Path(tmp)))
        vidur = vidur_trace(Path(tmp)) if args.vidur_cmd else None
        print(f"trace {TRACE} ({sum(1 for _ in open(TRACE)) - 1} requests); "
              f"{os.cpu_count()} CPUs; {args.repeat} interleaved runs of each configuration"
              + (f", this tree and {args.baseline}" if args.baseline else "")
              + (", and Vidur" if vidur else ""))
        runs: dict[tuple, list] = {(c, t): [] for t, _ in trees for c in configs}
        vidur_runs: list[tuple[float, float, float, bool]] = []
        load_start = os.getloadavg()
        for _ in range(args.repeat):
            for config in configs:
                for tree, source in trees:
                    runs[(config, tree)].append(measure(*config, source))
            for _attempt in range(2 if vidur else 0):
                try:
                    run = measure_vidur(args.vidur_cmd, vidur, Path(tmp) / "vidur-out")
                except RuntimeError as error:
                    print(f"Vidur skipped from here on: {error}")
                    vidur = None
                    break
                vidur_runs.append(run)
                if run[3]:
                    break
                print(f"a Vidur run had no cached predictions ({run[0]:.1f} s; not counted)")
        load_end = os.getloadavg()
    print(f"{'configuration':22s} {'code':>12s} {'median wall':>11s} {'best wall':>9s} "
          f"{'median cpu':>10s}  result")
    for ((scheduler, planner), tree), results in runs.items():
        walls = [w for w, _, _ in results]
        cpus = [c for _, c, _ in results]
        print(f"{scheduler + '/' + planner:22s} {tree[:12]:>12s} "
              f"{statistics.median(walls):9.2f} s {min(walls):7.2f} s "
              f"{statistics.median(cpus):8.2f} s  {results[0][2]}")
    cached = [run for run in vidur_runs if run[3]]
    if cached:
        emoe_wall = statistics.median(w for w, _, _ in runs[(("emoe", "emoe"), "this tree")])
        emoe_cpu = statistics.median(c for _, c, _ in runs[(("emoe", "emoe"), "this tree")])
        wall = statistics.median(w for w, _, _, _ in cached)
        simulation = statistics.median(s for _, s, _, _ in cached)
        cpu = statistics.median(c for _, _, c, _ in cached)
        print(f"{'Vidur, cached':22s} {'':>12s} {wall:9.2f} s "
              f"{min(w for w, _, _, _ in cached):7.2f} s {cpu:8.2f} s  "
              f"simulation phase {simulation:.0f} s (median, from its log)")
        print(f"Vidur / emoe (emoe/emoe, this tree), medians of {len(cached)} and "
              f"{len(runs[(('emoe', 'emoe'), 'this tree')])} runs: {wall / emoe_wall:.1f}x "
              f"wall time, process start to exit (the ratio of record); "
              f"{simulation / emoe_wall:.1f}x Vidur's simulation phase alone against emoe's "
              f"whole run; {cpu / emoe_cpu:.1f}x user+sys CPU time")
    elif not args.vidur_cmd:
        print("Vidur: not run (pass --vidur-cmd; how to set it up: the top of this script)")
    else:
        print("Vidur: no run with cached predictions to compare (see above)")
    print("load average (1, 5, 15 min): " + " ".join(f"{x:.2f}" for x in load_start)
          + " at the start, " + " ".join(f"{x:.2f}" for x in load_end) + " at the end")


if __name__ == "__main__":
    main()
