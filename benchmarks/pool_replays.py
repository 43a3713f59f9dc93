"""Issue 14's goal over several replays of one workload: the requests of K benchmark runs pooled.

    .venv/bin/python benchmarks/fidelity.py --out out/fidelityA
    .venv/bin/python benchmarks/fidelity.py --profile out/fidelityA/profile.json --out out/fidelityB
    .venv/bin/python benchmarks/fidelity.py --profile out/fidelityA/profile.json --out out/fidelityC
    .venv/bin/python benchmarks/pool_replays.py out/fidelityA out/fidelityB out/fidelityC

One replay of 300 requests pins a p90 only to its own spread: near saturation the same
workload simulated again with the steps drawn anew moves a TTFT p90 by tens of percent, and
the measured side moves as much from one replay to the next (docs/fidelity.md, limits 13 and
15). Runs that share a profile play the same workload (rates, SLOs, requests, policies); this
script pools their requests per trace and policy, the measured rows of the K replays and, for
each draw of the step scatter, that draw's rows of the K simulations (each simulated at its
own replay's speeds), and judges the goal on the pooled requests: p50/p90 of TTFT and E2E from
the pooled rows (the simulated ones the median over the pooled draws), SLO attainment and
goodput over the K replays, the goodput rankings, and one pooled draw against the others (the
step scatter's own ceiling). It refuses runs whose workloads differ.

The requests of one replay are not independent draws (a burst that one replay serves slowly
delays dozens of them at once), so each cell's error also gets an interval over the replays:
``--resamples`` sets of K replays drawn with replacement, each with its own simulation, pooled
as above; the 5th and 95th percentiles of the error. A cell whose interval reaches the goal
could meet it on other replays; one whose interval excludes 0 is a bias the replays agree on.

No replay runs: it reads the runs' reports (``<trace>.json``) and rows (``<trace>/*.csv``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.fidelity import GOAL_POINTS, GOAL_REL, draws_within_goal  # noqa: E402
from emoe.rpc.fidelity import rank_pairs, resolved_pairs, rows_file  # noqa: E402

CELLS = [(m, q) for m in ("ttft", "e2e") for q in ("p50", "p90")]
SAME_WORKLOAD = ("trace", "limit", "rate_scale", "seed", "fit", "profile", "sim_draws")


def _reports(runs: list[Path]) -> dict[str, list[dict]]:
    """Per trace, each run's report; refuses traces whose runs played different workloads."""
    by_trace: dict[str, list[dict]] = {}
    for run in runs:
        found = {path.stem: doc for path in sorted(run.glob("*.json"))
                 if "policies" in (doc := json.loads(path.read_text()))}
        if not found:
            raise SystemExit(f"{run}: no fidelity reports (built-in.json, azure-code.json)")
        for trace, doc in found.items():
            by_trace.setdefault(trace, []).append(doc)
    for trace, docs in by_trace.items():
        if len(docs) != len(runs):
            raise SystemExit(f"{trace}: in {len(docs)} of the {len(runs)} runs only")
        for key in SAME_WORKLOAD:
            values = {json.dumps(doc.get(key)) for doc in docs}
            if len(values) > 1:
                raise SystemExit(f"{trace}: the runs differ in {key} ({', '.join(values)}); "
                                 f"pool runs that share a profile (--profile)")
        names = {tuple(doc["policies"]) for doc in docs}
        if len(names) > 1:
            raise SystemExit(f"{trace}: the runs ran different policies")
    return by_trace


def _rows(run: Path, trace: str, policy: str, draw: int | None):
    """The measured rows of a run's replay (``draw`` None) or its simulated draw's."""
    import pandas as pd

    return pd.read_csv(run / trace / rows_file(policy, draw))


def _columns(frame) -> dict:
    """A replay's (or a draw's) finite values of each goal metric."""
    import numpy as np

    out = {}
    for m in {m for m, _ in CELLS}:
        values = frame[f"{m}_s"].to_numpy(dtype=float)
        out[m] = values[np.isfinite(values)]
    return out


def _percentiles(runs: list[dict], pick) -> dict[str, float]:
    """The goal percentiles of the requests of ``runs`` (indices into the per-run values
    ``pick`` gives) pooled."""
    import numpy as np

    return {f"{m} {q}": float(np.percentile(np.concatenate([pick[i][m] for i in runs]),
                                            int(q[1:])))
            for m, q in CELLS}


def _cells(runs: list[int], real: list[dict], sim: list[list[dict]],
           slo: list[dict]) -> dict[str, dict]:
    """The pooled cells of the replays ``runs`` (indices, repeats allowed): per goal metric
    the simulated value (median over the pooled draws), the measured one and each pooled
    draw's."""
    per_draw = [_percentiles(runs, [draws[d] for draws in sim]) for d in range(len(sim[0]))]
    measured = _percentiles(runs, real)
    cells = {key: {"sim": statistics.median(d[key] for d in per_draw), "real": measured[key],
                   "draws": [d[key] for d in per_draw]} for key in measured}
    slo_draws = [statistics.fmean(slo[i]["sim_draws"][d] for i in runs)
                 for d in range(len(sim[0]))]
    cells["slo"] = {"sim": statistics.median(slo_draws),
                    "real": statistics.fmean(slo[i]["real"] for i in runs), "draws": slo_draws}
    return cells


def _error(key: str, cell: dict) -> float:
    """A cell's simulated error: relative for a percentile, in points for the SLO (a
    fraction, x100)."""
    if key == "slo":
        return 100 * (cell["sim"] - cell["real"])
    return cell["sim"] / cell["real"] - 1


def run_intervals(real: list[dict], sim: list[list[dict]], slo: list[dict],
                  resamples: int, seed: int = 0) -> dict[str, list[float]]:
    """Per cell, the 5th and 95th percentile of its simulated error over ``resamples`` sets of
    the replays drawn with replacement (each replay with its own simulation): how far the
    error moves with which replays were run. Relative for the percentiles, in points for the
    SLO (a fraction x100)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    errors: dict[str, list[float]] = {}
    for _ in range(resamples):
        runs = rng.integers(0, len(real), len(real)).tolist()
        for key, cell in _cells(runs, real, sim, slo).items():
            errors.setdefault(key, []).append(_error(key, cell))
    return {key: [float(v) for v in np.percentile(values, [5, 95])]
            for key, values in errors.items()}


def pool(runs: list[Path], trace: str, docs: list[dict], resamples: int = 0) -> dict[str, dict]:
    """Per policy of one trace, the pooled cells: per goal metric the simulated value (median
    over the pooled draws), the measured one and each pooled draw's, and with ``resamples``
    the error's interval over the replays resampled (``run_intervals``); goodput over the
    runs."""
    draws = docs[0]["sim_draws"]
    pooled = {}
    for name in docs[0]["policies"]:
        real = [_columns(_rows(run, trace, name, None)) for run in runs]
        sim = [[_columns(_rows(run, trace, name, d)) for d in range(draws)] for run in runs]
        policies = [doc["policies"][name] for doc in docs]
        slo = [p["slo_attainment"] for p in policies]
        if any("sim_draws" not in s for s in slo):
            raise SystemExit(f"{trace} {name}: a run without each draw's SLO attainment "
                             f"(before session 15)")
        cells = _cells(list(range(len(runs))), real, sim, slo)
        if resamples:
            for key, interval in run_intervals(real, sim, slo, resamples).items():
                cells[key]["run_interval"] = interval

        elapsed = {side: sum(p["elapsed_s"][side] for p in policies) for side in ("sim", "real")}
        pooled[name] = {
            "cells": cells, "elapsed_s": elapsed,
            "slo_attainment": {"sim": cells["slo"]["sim"], "real": cells["slo"]["real"]},
            "goodput_rps": {side: sum(p["goodput_rps"][side] * p["elapsed_s"][side]
                                      for p in policies) / elapsed[side]
                            for side in ("sim", "real")}}
    return pooled


def resolved(runs: list[Path], trace: str, names) -> list[str]:
    """The pairs of policies the pooled measurement resolves (``resolved_pairs`` over the
    requests of every replay)."""
    import pandas as pd

    met = {}
    for name in names:
        frames = []
        for k, run in enumerate(runs):
            rows = _rows(run, trace, name, None)
            frames.append(rows.set_index(rows["id"].map(lambda i, k=k: f"{k}:{i}"))["slo_met"])
        met[name] = pd.concat(frames)
    return resolved_pairs(met)


def _ranked(pooled: dict, side: str) -> list[str]:
    return sorted(pooled, key=lambda name: (-pooled[name]["goodput_rps"][side], name))


def main() -> int:
    from emoe.core.metrics import format_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+",
                        help="benchmarks/fidelity.py --out folders that share a profile")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="sets of replays drawn with replacement for each cell's interval "
                             "(0: none)")
    args = parser.parse_args()
    if args.resamples < 0:
        raise SystemExit(f"--resamples: 0 or more, got {args.resamples}")
    if len(args.runs) < 2:
        raise SystemExit("pool two or more runs")
    by_trace = _reports(args.runs)
    metrics = [f"{m} {q}" for m, q in CELLS] + ["slo"]
    within = {k: [0, 0, 0, 0] for k in metrics}  # all, of, without lru, of
    ceiling = {k: [0.0, 0.0] for k in metrics}
    spread = {k: [0, 0, 0, 0] for k in metrics}  # reaching the goal, away from 0 (without lru)
    results = {}
    for trace, docs in by_trace.items():
        pooled = pool(args.runs, trace, docs, args.resamples)
        rows, intervals = [], []
        for name, p in pooled.items():
            row = [name]
            interval_row = [name]
            for key in metrics:
                cell = p["cells"][key]
                err, goal = _error(key, cell), GOAL_POINTS if key == "slo" else GOAL_REL
                hit = abs(err) <= goal
                if key == "slo":
                    row.append(f"{100 * cell['sim']:.1f}/{100 * cell['real']:.1f} ({err:+.1f})")
                else:
                    row.append(f"{cell['sim']:.3f}/{cell['real']:.3f} ({err:+.0%})")
                cell["within_goal"] = hit
                if "run_interval" in cell:
                    lo, hi = cell["run_interval"]
                    reach, away = lo <= goal and hi >= -goal, lo > 0 or hi < 0
                    spread[key][0] += reach
                    spread[key][1] += away
                    if "lru" not in name:
                        spread[key][2] += reach
                        spread[key][3] += away
                    interval_row.append(f"{err:+.1f} [{lo:+.1f}, {hi:+.1f}]" if key == "slo"
                                        else f"{err:+.0%} [{lo:+.0%}, {hi:+.0%}]")
                share = draws_within_goal(cell["draws"], points=key == "slo")
                counts = within[key]
                counts[0] += hit
                counts[1] += 1
                ceiling[key][0] += share
                if "lru" not in name:
                    counts[2] += hit
                    counts[3] += 1
                    ceiling[key][1] += share
            row.append(f"{p['goodput_rps']['sim']:.2f}/{p['goodput_rps']['real']:.2f}")
            rows.append(row)
            intervals.append(interval_row)
        opposite = rank_pairs(pooled)["opposite"]
        told = resolved(args.runs, trace, pooled)
        print(f"\n{trace}: {len(args.runs)} replays of each policy pooled "
              f"({docs[0]['limit']} requests each, rate x{docs[0]['rate_scale']:g})")
        print(format_table(["policy", "TTFT p50 sim/real", "TTFT p90 sim/real",
                            "E2E p50 sim/real", "E2E p90 sim/real", "SLO % sim/real (pts)",
                            "goodput sim/real"], rows))
        if args.resamples:
            print(f"the error and its 90% interval over {args.resamples} sets of "
                  f"{len(args.runs)} replays drawn with replacement (each with its own "
                  f"simulation)")
            print(format_table(["policy", "TTFT p50", "TTFT p90", "E2E p50", "E2E p90",
                                "SLO (pts)"], intervals))
        print(f"ranking by pooled goodput: simulated {' > '.join(_ranked(pooled, 'sim'))}; "
              f"measured {' > '.join(_ranked(pooled, 'real'))}: "
              f"{'agree' if not opposite else 'DISAGREE'}"
              + (f" ({len(opposite)} pairs opposite: {', '.join(opposite)}; "
                 f"{sum(p in told for p in opposite)} of them resolved by the measurement, "
                 f"which resolves {len(told)} of the pairs)" if opposite else ""))
        results[trace] = {"policies": pooled, "opposite": opposite, "resolved": told}
    print(f"\ncells within the goal ({GOAL_REL:.0%}, {GOAL_POINTS:g} points) on the pooled "
          "requests, both traces: all policies (without lru)")
    print(format_table(["pooled", "TTFT p50", "TTFT p90", "E2E p50", "E2E p90", "SLO"], [
        ["simulated against measured",
         *(f"{c[0]}/{c[1]} ({c[2]}/{c[3]})" for c in within.values())],
        ["one draw against the others",
         *(f"{c[0]:.1f} ({c[1]:.1f})" for c in ceiling.values())],
        *([["interval reaching the goal", *(f"{c[0]} ({c[2]})" for c in spread.values())],
           ["interval away from 0 (a bias)", *(f"{c[1]} ({c[3]})" for c in spread.values())]]
          if args.resamples else [])]))
    out = args.runs[0] / f"pooled-{len(args.runs)}.json"
    out.write_text(json.dumps({"runs": [str(r) for r in args.runs], "traces": results,
                               "within_goal": within, "draw_against_draws": ceiling,
                               "resamples": args.resamples,
                               **({"interval_reaches_goal": {
                                       k: {"within": c[0], "without_lru": c[2]}
                                       for k, c in spread.items()},
                                   "interval_away_from_zero": {
                                       k: {"within": c[1], "without_lru": c[3]}
                                       for k, c in spread.items()}}
                                  if args.resamples else {})},
                              indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
