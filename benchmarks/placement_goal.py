"""Issue 10's goal, checked on the reference model: emoe against every planner that does not
fetch (static, predict-every, random) at 25-75% of experts, in agreement and in quality; at 50%
agreement >= 0.90; at 60% quality >= 97% of all-experts quality.

    .venv/bin/python benchmarks/placement_goal.py                 # runs `emoe eval` (100/task)
    .venv/bin/python benchmarks/placement_goal.py --rows rows.json  # checks an earlier run

Runs (without ``--rows``):

    emoe eval emoe/engine/reference/emoe-tiny --calibration traces/routing-emoe-tiny.parquet \\
        --sensitivity traces/sensitivity-emoe-tiny.json --per-task 100 --threads 1 --json ROWS

and prints one line per budget and baseline: emoe's margin in agreement and quality (a
negative margin inside ``--noise`` reads "matches"), then the two absolute targets.
Accuracy numbers do not depend on machine load; the run takes ~10 min on a quiet 2-core box.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("static", "predict-every", "random")


def run_eval(per_task: int, rows: Path) -> None:
    subprocess.run([sys.executable, "-m", "emoe", "eval",
                    str(ROOT / "emoe/engine/reference/emoe-tiny"),
                    "--calibration", str(ROOT / "traces/routing-emoe-tiny.parquet"),
                    "--sensitivity", str(ROOT / "traces/sensitivity-emoe-tiny.json"),
                    "--per-task", str(per_task), "--threads", "1",
                    "--policy", "static", "--policy", "random", "--policy", "predict-every",
                    "--policy", "emoe", "--json", str(rows)],
                   check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, help="`emoe eval --json` rows to check")
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.03,
                        help="margins above -NOISE count as matching (default 0.03: about two "
                             "standard errors of a 500-prompt mean)")
    args = parser.parse_args()
    if args.rows is None:
        args.rows = Path(tempfile.mkdtemp()) / "rows.json"
        run_eval(args.per_task, args.rows)
    rows = {(r["planner"], r["budget_label"]): r for r in json.loads(args.rows.read_text())}
    everything = rows[("all", "100%")]
    budgets = [b for p, b in rows if p == "emoe"]
    print(f"rows: {args.rows}; all experts: quality {everything['quality']:.3f}\n")
    print("| budget | vs | emoe agreement | theirs | margin | emoe quality | theirs | margin | "
          "verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for budget in budgets:
        emoe = rows[("emoe", budget)]
        for baseline in BASELINES:
            other = rows.get((baseline, budget))
            if other is None:
                continue
            da, dq = emoe["agreement"] - other["agreement"], emoe["quality"] - other["quality"]
            verdict = ("beats" if min(da, dq) > args.noise else
                       "matches" if min(da, dq) >= -args.noise else "LOSES")
            ok &= verdict != "LOSES"
            print(f"| {budget} | {baseline} | {emoe['agreement']:.3f} | {other['agreement']:.3f} "
                  f"| {da:+.3f} | {emoe['quality']:.3f} | {other['quality']:.3f} | {dq:+.3f} "
                  f"| {verdict} |")
    print()
    for budget, metric, target, label in (("50%", "agreement", 0.90, ">= 0.90"),
                                          ("60%", "quality", 0.97 * everything["quality"],
                                           f">= 97% of {everything['quality']:.3f}")):
        row = rows.get(("emoe", budget))
        if row is None:
            continue
        met = row[metric] >= target
        ok &= met
        print(f"emoe at {budget}: {metric} {row[metric]:.3f} ({label}: "
              f"{'met' if met else 'NOT met'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
