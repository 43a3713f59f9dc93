"""The simulator's accuracy proxy against `emoe eval`, on the reference model, in one command.

    .venv/bin/python benchmarks/proxy_calibration.py                 # the committed eval rows
    .venv/bin/python benchmarks/proxy_calibration.py --run-eval      # measure them again (~12 min)

Every eval row (a planner at a budget and per-layer allocation; traces/eval-emoe-tiny.json: 38
runs of 60 prompts per task, from the EXPERIMENTS below) is replayed in the simulator as `emoe
calibrate-proxy` replays it (emoe/sim/calibrate.py), with the proxy weighted three ways and the
routing taken three ways:

- weights: the hand-set task-profile defaults (what `emoe sim` weighs with by default); each
  run's planner's own table (`emoe sim --sensitivity` given as eval was: measured for most runs,
  hand-set for the runs whose planner used hand-set s); one measured table for every run (what
  a calibration carries, `emoe sim --accuracy-calibration`);
- routing (measured weights): eval's own prompts' recorded routing; the shipped routing trace
  of other prompts (traces/routing-emoe-tiny.parquet, each task's requests in turn); synthetic.

It prints Pearson r of each variant's proxy with measured agreement and quality across planners
(the `main` experiment: every planner at 25/50/60/75%), across allocations (`emoe` and `static`
under every allocation measured), over the allocations outside `main`, over the single-layer
cuts and over all runs; the calibration and its worst runs; per group the calibrated
estimate's error in sample and held out (every run outside `main` estimated by the fit on
`main`, a run of `main` by the fit on the rest of `main`); and the per-run table. The routing
of eval's prompts is recorded once into --work (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emoe.core.accuracy import AccuracyCalibration, LinearFit, fit_line  # noqa: E402
from emoe.core.policy_file import PolicyConfig  # noqa: E402
from emoe.core.specs import get_model  # noqa: E402
from emoe.sim.eval_replay import (EvalReplay, Replayed, calibrate, correlations,  # noqa: E402
                                  eval_rows, format_runs, format_worst, replay_all)

CHECKPOINT = "emoe/engine/reference/emoe-tiny"
HISTORY = "traces/routing-emoe-tiny.parquet"
SENSITIVITY = "traces/sensitivity-emoe-tiny.json"
ROWS = "traces/eval-emoe-tiny.json"

EVAL = ["--calibration", HISTORY, "--threads", "1"]
MEASURED = ["--sensitivity", SENSITIVITY]
EXPERIMENTS: dict[str, list[str]] = {
    "main": [*MEASURED, "--policy", "static", "--policy", "predict-every", "--policy", "emoe",
             "--policy", "random", "--random-draws", "4"],
    "measured-uniform": ["--policy", "emoe", *MEASURED, "--slot-allocation", "uniform"],
    "handset-allocation": ["--policy", "emoe"],
    **{f"cut-layer-{layer}": ["--policy", "static", "--expert-budget", "81.25%",
                              "--experts-per-layer",
                              ",".join("2" if i == layer else "8" for i in range(4))]
       for layer in range(4)},
    **{f"skew-{b}-{slots.replace(',', '')}": ["--policy", "static", "--expert-budget", f"{b}%",
                                               "--experts-per-layer", slots]
       for b, slots in (("25", "5,1,1,1"), ("50", "8,4,2,2"), ("50", "2,2,4,8"),
                        ("50", "4,8,2,2"), ("50", "6,2,2,6"), ("60", "8,7,2,2"),
                        ("75", "2,8,8,6"), ("75", "8,8,2,6"), ("75", "8,8,6,2"))},
    "random-uniform-50": ["--policy", "random", "--expert-budget", "50%", "--random-draws", "4",
                          "--experts-per-layer", "4,4,4,4"],
}
"""The eval invocations behind the committed rows: `emoe eval CHECKPOINT --per-task N` + these."""


def run_evals(work: Path, per_task: int) -> Path:
    """Every experiment's `emoe eval` (skipping those already in ``work``), merged."""
    merged = []
    for name, extra in EXPERIMENTS.items():
        out = work / f"eval-{name}.json"
        if not out.exists():
            command = [sys.executable, "-m", "emoe", "eval", CHECKPOINT, "--per-task",
                       str(per_task), *EVAL, *extra, "--json", str(out)]
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command[2:])}", file=sys.stderr)
            subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        merged += [{"experiment": name, **row} for row in json.loads(out.read_text())]
    path = work / "eval-rows.json"
    path.write_text("[\n" + ",\n".join(json.dumps(row) for row in merged) + "\n]\n")
    return path


def eval_prompts_routing(work: Path, rows: list[dict]) -> Path:
    run = rows[0]["run"]
    path = work / (f"eval-prompts-seed{run['prompt_seed']}-{run['per_task']}x"
                   f"{run['max_new_tokens']}.parquet")
    if not path.exists():
        print(f"recording the routing of eval's prompts into {path}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "emoe", "record-routing", run["checkpoint"], "-o",
                        str(path), "--seed", str(run["prompt_seed"]), "--per-task",
                        str(run["per_task"]), "--max-new-tokens", str(run["max_new_tokens"]),
                        "--max-batch-size", str(run["max_batch_size"])],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return path


def handset_weights(work: Path) -> Path:
    """The hand-set defaults as a weights-only calibration file, so the simulator weighs every
    run with them (what `emoe sim` does without --sensitivity)."""
    model = get_model(str(REPO / CHECKPOINT))
    table = {t: s.tolist() for t, s in PolicyConfig().layer_sensitivity(model).items()}
    path = work / "handset-weights.json"
    identity = LinearFit(0.0, 1.0, float("nan"))
    AccuracyCalibration(model=model.name, fits={"agreement": identity}, sensitivity=table,
                        sensitivity_source={"mode": "hand-set", "model": "emoe.core.tasks"}
                        ).to_file(path)
    return path


GROUPS = {
    "across planners (main: static, predict-every, emoe, random at 25-75%)":
        lambda row: row["experiment"] == "main",
    "across allocations (emoe and static, every allocation measured)":
        lambda row: row["planner"] in ("emoe", "static"),
    "held-out allocations (every run outside main)":
        lambda row: row["experiment"] != "main",
    "one layer cut to 2 of 8 (static, forced)":
        lambda row: row["experiment"].startswith("cut-layer-"),
    "all runs": lambda row: True,
}
METRICS = ("agreement", "quality")


def r_table(variants: dict[str, list[Replayed]]) -> str:
    lines = ["| proxy | " + " | ".join(f"{g.split(' (')[0]} (n) agreement / quality"
                                        for g in GROUPS) + " |",
             "|---|" + "---|" * len(GROUPS)]
    for name, replayed in variants.items():
        cells = []
        for keep in GROUPS.values():
            group = [r for r in replayed if keep(r.row)]
            r = correlations(group)
            cells.append(f"({len(group)}) {r['agreement']:.3f} / {r['quality']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def held_out_estimates(replayed: list[Replayed]) -> list[dict[str, float]]:
    """Per run, agreement and quality estimated by a calibration that never saw it: fitted on
    `main` for every other run, on `main` less the run itself for a run of `main`."""
    main_runs = [i for i, r in enumerate(replayed) if r.row["experiment"] == "main"]
    out = []
    for i, run in enumerate(replayed):
        train = [replayed[j] for j in main_runs if j != i]
        out.append({m: fit_line([r.proxy for r in train], [r.row[m] for r in train])(run.proxy)
                    for m in METRICS})
    return out


def error_table(replayed: list[Replayed], in_sample: AccuracyCalibration) -> str:
    """Per group: r of the proxy with the measured metric, and the calibrated estimate's error,
    in sample (the calibration fitted on every run) and held out (``held_out_estimates``)."""
    held = held_out_estimates(replayed)
    lines = ["| runs | n | metric | r | max abs error, in sample | max abs error, held out | "
             "mean abs error, held out | worst held-out run |", "|---|---|---|---|---|---|---|---|"]
    for name, keep in GROUPS.items():
        group = [(r, h) for r, h in zip(replayed, held) if keep(r.row)]
        r = correlations([g for g, _ in group])
        for metric in METRICS:
            fit = in_sample.fits[metric]
            inside = [abs(fit(g.proxy) - g.row[metric]) for g, _ in group]
            errors = [(h[metric] - g.row[metric], g) for g, h in group]
            error, worst = max(errors, key=lambda e: abs(e[0]))
            label = (f"{worst.row['experiment']} {worst.row['planner']} "
                     f"{','.join(map(str, worst.row.get('slots_per_layer', [])))}: "
                     f"{worst.row[metric]:.3f} measured, {worst.row[metric] + error:.3f} estimated")
            lines.append(f"| {name.split(' (')[0]} | {len(group)} | {metric} | "
                         f"{r[metric]:.3f} | {max(inside):.3f} | {abs(error):.3f} | "
                         f"{statistics.fmean(abs(e) for e, _ in errors):.3f} | {label} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, nargs="+", default=[REPO / ROWS],
                        help=f"`emoe eval --json` rows (default {ROWS})")
    parser.add_argument("--run-eval", action="store_true",
                        help="measure the rows again (every experiment's `emoe eval`)")
    parser.add_argument("--per-task", type=int, default=60, help="prompts per task (--run-eval)")
    parser.add_argument("--routing-trace", type=Path, default=None,
                        help="routing of eval's prompts (default: recorded into --work)")
    parser.add_argument("--work", type=Path, default=Path("out/proxy-calibration"),
                        help="where recorded routing and --run-eval rows are kept")
    args = parser.parse_args()
    os.chdir(REPO)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = [run_evals(args.work, args.per_task)] if args.run_eval else args.rows
    rows = eval_rows(paths)
    routing = args.routing_trace or eval_prompts_routing(args.work, rows)
    measured = Path(SENSITIVITY)

    def replay(weights: Path | None, how: str | Path = "replay") -> list[Replayed]:
        with EvalReplay(routing, weights, routing=how) as rp:
            return replay_all(rows, rp)

    weights = {
        "hand-set weights (emoe sim's default)": replay(handset_weights(args.work)),
        "each planner's own weights (emoe sim --sensitivity as eval ran)": replay(None),
    }
    with EvalReplay(routing, measured) as rp:
        main_variant = replay_all(rows, rp)
        calibration = calibrate(main_variant, rp, {"rows": [str(p) for p in paths]})
    weights["measured weights, the calibration's (eval's prompts' routing replayed)"] = \
        main_variant
    routings = {
        "measured weights, eval's prompts' routing replayed": main_variant,
        f"measured weights, other prompts' routing replayed ({HISTORY})":
            replay(measured, Path(HISTORY)),
        "measured weights, synthetic routing": replay(measured, "synthetic"),
    }
    load = os.getloadavg()
    print(f"# The simulator's accuracy proxy against `emoe eval` ({len(rows)} runs of "
          f"{calibration.model}; {len(rows) and rows[0]['run']['per_task'] * 5} prompts each)\n")
    print(f"rows: {', '.join(map(str, paths))}; routing of eval's prompts: {routing}\n")
    print("## Pearson r, by how the proxy is weighted\n")
    print(r_table(weights))
    print("\n## Pearson r, by where the routing comes from\n")
    print(r_table(routings))
    spread = max(abs(a.proxy - b.proxy) for a, b in zip(main_variant,
                                                      routings["measured weights, synthetic routing"]))
    print(f"\nlargest proxy difference, synthetic against eval's replayed routing: {spread:.3f}")
    print(f"\n## The calibration\n\n{calibration.describe()}\n")
    print(format_worst(calibration))
    print("\n## The calibrated estimate against measured accuracy (measured weights, eval's "
          "prompts' routing)\n")
    print(error_table(main_variant, calibration))
    mismatched = sum(list(r.slots_per_layer) != list(r.row["slots_per_layer"])
                     for r in main_variant)
    print(f"\n## Every run (measured weights, eval's prompts' routing)\n\n"
          f"{mismatched} of {len(main_variant)} runs ended with other slots per layer in the "
          f"simulator than on the engine\n")
    print(format_runs(main_variant))
    print(f"\n{time.perf_counter() - started:.0f} s wall; load average {load[0]:.2f}, "
          f"{load[1]:.2f}, {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
