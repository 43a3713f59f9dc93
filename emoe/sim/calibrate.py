"""``emoe calibrate-proxy``: the simulator's accuracy proxy against what ``emoe eval`` measured.

Every row of ``emoe eval --json`` files (a planner at a budget; ``run`` holds the command's
settings) is replayed in the simulator as eval ran it:

- the model: eval's checkpoint folder as ``--model``;
- the workload: eval's prompts, from a routing trace of them (``emoe record-routing`` with
  eval's ``--seed``, ``--per-task`` and ``--max-new-tokens``): their tasks, prompt lengths and
  all-experts output lengths in eval's order, one arrival every ``ARRIVAL_GAP_S`` (eval adds one
  per engine step), their recorded routing replayed token by token;
- the engine: eval's batch of KV slots, the model's context, a fixed expert pool (the
  scheduler the server builds over it, ``emoe.core.serving``);
- the planner: eval's planner, slots, forced per-layer slots, sensitivity, slot allocation,
  predictor and interval, and eval's ``--calibration`` trace as the warm start; ``random``
  once per draw (seeds 0, 1, ...), averaged as eval averages them.

The simulator's proxy of every run is weighted by one measured sensitivity table
(``--sensitivity``), whatever the run's planner used: a proxy weighted by each planner's own
table is not one quantity (with the hand-set defaults it reads 0.96 for a run whose agreement
is 0.54). The fit of eval's agreement and quality on that proxy is the calibration
``emoe sim --accuracy-calibration`` reads (``emoe.core.accuracy``). ``all`` and ``lru`` rows
are left out: every choice is served by its expert, so their proxy is 1 by construction.

    emoe record-routing emoe/engine/reference/emoe-tiny -o eval-prompts.parquet \\
        --seed 1 --per-task 100 --max-new-tokens 24
    emoe calibrate-proxy rows.json --routing-trace eval-prompts.parquet \\
        --sensitivity traces/sensitivity-emoe-tiny.json -o calibration.json
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rows", nargs="+", type=Path, help="`emoe eval --json` files")
    p.add_argument("--routing-trace", type=Path, required=True,
                   help="routing trace of eval's prompts: emoe record-routing CHECKPOINT -o FILE "
                        "--seed S --per-task N --max-new-tokens M, as eval ran")
    p.add_argument("--sensitivity", type=Path, required=True,
                   help="sensitivity file (`emoe sensitivity`) whose graded s weighs the "
                        "proxy of every run")
    p.add_argument("-o", "--output", type=Path, required=True, help="calibration file to write")


def run(args: argparse.Namespace) -> int:
    import sys

    from emoe.sim.eval_replay import (ARRIVAL_GAP_S, EvalReplay, calibrate, eval_rows,
                                      format_runs, format_worst, replay_all)

    rows = eval_rows(args.rows)
    with EvalReplay(args.routing_trace, args.sensitivity) as replay:
        replayed = replay_all(rows, replay, lambda s: print(f"calibrate-proxy: {s}",
                                                            file=sys.stderr))
        calibration = calibrate(replayed, replay, {
            "rows": [str(p) for p in args.rows], "warm_start": "each row's eval --calibration",
            "arrival_gap_s": ARRIVAL_GAP_S,
            "excluded": "planners all and lru (exact by construction)",
            "command": "emoe " + " ".join(getattr(args, "argv", []))})
    calibration.to_file(args.output)
    print(format_runs(replayed))
    print()
    print(f"calibration: {calibration.describe()}; proxy weights: {calibration.weights()}")
    print()
    print(format_worst(calibration))
    mismatched = [r for r in replayed if r.row.get("slots_per_layer")
                  and list(r.slots_per_layer) != list(r.row["slots_per_layer"])]
    if mismatched:
        print(f"\nnote: {len(mismatched)} run(s) ended with other slots per layer in the "
              f"simulator than on the engine (columns 'slots')")
    print(f"wrote {args.output}")
    return 0
