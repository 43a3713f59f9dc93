"""Re-simulate a finished fidelity run under other simulator settings, against its measured side.

    .venv/bin/python benchmarks/resimulate.py out/fidelity [--scatter 0,0.1,measured] [--draws 5]
        [--token-cost none|fitted] [--arrival-cost none|fitted] [--fetch-cost cycles|compute]
        [--prefill-shape measured|none] [--rows DIR]

A run of ``benchmarks/fidelity.py`` keeps everything its simulations took from the replays: the
per-request rows measured, each policy's speed timeline, fetch cost and step scatter as the
server measured them, the policy files, the profile and the recorded routing. This script
simulates every policy of that run again with each ``--scatter`` setting (a sigma of
independent draws, or ``measured``: the server's own scatter of that replay;
``measured:mean``, ``measured:median``: with the typical step placed by assumption) and each of
``--draws`` draws of the step scatter (the run's own workload and seed; before session 8 this
script varied the seed, which redrew the workload's task mix too), and compares with the
measured values the run recorded: per setting, how many cells of each goal metric are within
the goal (``benchmarks/fidelity.py``: p50/p90 of TTFT and E2E within 10%, SLO attainment within
3 points) for one draw and for the median over the draws, and how many pairs of policies the
goodput rankings order oppositely.
``--token-cost fitted`` refits each timeline from the replay's samples with what a decode-only
step's token cost beyond the profile (``SpeedTimeline.decode_token_s``), which ``emoe fidelity``
reports and does not simulate (docs/fidelity.md, limit 16); ``--arrival-cost fitted`` refits
them with the loop's work per request accepted simulated as loop time
(``SpeedTimeline.arrival_s``, as sessions 9-14 did; since session 15 ``emoe fidelity`` reports
it and leaves it in the windows' speeds); ``--fetch-cost compute`` refits them without the
cycles of steps that fetched on a miss and simulates a fetch at its cost in the engine's
compute (as before session 10; runs before it sampled no such cycles and are refitted so
whatever is asked); ``--prefill-shape none`` refits them without the prompt steps' factors by
their tokens
(``SpeedTimeline.prefill_shape``, simulated since session 12; runs before it sampled no such
sums and are refitted so whatever is asked).

``--rows DIR`` (one ``--scatter`` setting) also writes the run as re-simulated into DIR: its
reports with every simulated side compared anew, its measured rows and the simulated ones, a
run that ``pool_replays.py`` pools with runs of the simulator as it is now.

No replay runs: the measured side is the run's own, so settings can be compared on the same
measurements. A setting chosen this way is tuned on those runs; judge it on a run it was not
chosen on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.fidelity import GOAL_POINTS, GOAL_REL, draws_within_goal  # noqa: E402
from emoe.rpc.fidelity import rank_pairs, resolved_pairs, rows_file, simulated_fetch_s  # noqa: E402
from emoe.sim.speed import PRIOR_S  # noqa: E402

CELLS = [(m, q) for m in ("ttft", "e2e") for q in ("p50", "p90")]
COLUMNS = {"ttft": "ttft_s", "e2e": "e2e_s"}


def _samples(speed: dict, window: int) -> dict[str, tuple]:
    """The counters a replay sampled, by column, keeping every ``window``-th sample (and the
    last): the same cumulative sums read ``window`` times as seldom."""
    rows = speed["samples"]["rows"]
    kept = rows[::window] + ([rows[-1]] if (len(rows) - 1) % window else [])
    return dict(zip(speed["samples"]["columns"], zip(*kept)))


def _scatter_within(samples: dict[str, tuple]):
    """The step scatter within the windows between these samples, as ``emoe fidelity`` fits
    it from its own."""
    from emoe.sim.speed import StepScatter

    def sums(kind: str) -> list[tuple]:
        return [samples[f"{kind}{moment}"] for moment in (
            "_log_sum", "_log_sq_sum", "s", "_lag_pairs", "_lag_sum", "_s", "_profiled_s")]

    return StepScatter.from_samples(*sums("cycle"), prefill=sums("prefill_cycle"))


def _scatter_of(setting: str, policy: dict, window: int = 1):
    """A sigma; ``measured``: the scatter the server measured in that replay (within windows
    of ``window`` samples: refitted from the samples where that is more than one);
    ``measured:mean`` and ``measured:median``: the same with the typical step where a draw of
    mean 1 puts it (-sigma^2 / 2) or at its window's speed (0), instead of where it was
    measured."""
    import dataclasses

    from emoe.sim.speed import StepScatter

    kind, _, centre = setting.partition(":")
    if kind != "measured":
        return float(setting)
    measured = policy["engine_speed"].get("scatter")
    if measured is None:
        raise SystemExit("--scatter measured: this run recorded no scatter (before session 7)")
    scatter = (StepScatter(**measured) if window == 1 else
               _scatter_within(_samples(policy["engine_speed"], window)))
    if centre:
        at = {"mean": None, "median": 0.0}[centre]
        scatter = dataclasses.replace(scatter, centre=at, prefill_centre=at)
    return scatter


def _path(name: str) -> Path:
    """A path a report names: runs before session 9 named theirs from the repository root."""
    return Path(name) if Path(name).is_absolute() else REPO / name


def _timeline_of(speed: dict, doc: dict, token_cost: str, arrival_cost: str,
                 fetch_cost: str, prefill_shape: str, window: int = 1,
                 prior_s: float = PRIOR_S):
    """A policy's speed timeline refitted from the counters its replay sampled, with the token
    and arrival costs as asked (a run that sampled no such sums refuses the token cost asked),
    and with the cycles that fetched on a miss and the prompt steps' shape where asked and
    sampled; its windows ``window`` samples long, each shrunk towards the replay's speed by
    ``prior_s``."""
    from emoe.core.profile import load_profile
    from emoe.sim.speed import SpeedTimeline

    samples = _samples(speed, window)

    def sums(names: tuple[str, ...], option: str):
        if names[0] not in samples:
            raise SystemExit(f"{option} fitted: this run sampled no {names[0]} (before "
                             f"session 9)")
        return [samples[k] for k in names]

    lines = arrivals = None
    floor = 0.0
    if token_cost == "fitted":
        lines = sums(("decode_streamed", "decode_streamed_sq", "decode_cycle_streamed",
                      "decode_model_streamed"), "--token-cost")
        floor = load_profile(_path(doc["profile"])).serving.token_s
    if arrival_cost == "fitted" and "arrivals" in samples:
        arrivals = sums(("arrivals", "arrival_cycle_s", "arrival_cycle_profiled_s",
                         "prefill_arrivals"), "--arrival-cost")
    fetches = None
    if fetch_cost == "cycles" and "fetch_cycle_s" in samples:
        fetches = [samples[k] for k in (
            "fetch_cycle_s", "fetch_cycle_profiled_s", "fetch_cycle_fetched",
            "fetch_cycle_arrivals", "prefill_fetch_cycle_s", "prefill_fetch_cycle_profiled_s",
            "prefill_fetch_cycle_fetched", "prefill_fetch_cycle_arrivals")]
    segments = None
    if prefill_shape == "measured" and "prefill_shape" in speed:
        segments = (speed["prefill_shape"]["tokens"], samples["prefill_segment_cycle_s"],
                    samples["prefill_segment_cycle_profiled_s"])
    return SpeedTimeline.from_samples(
        samples["t"], samples["cycle_s"], samples["cycle_profiled_s"],
        samples["prefill_cycle_s"], samples["prefill_cycle_profiled_s"], decode_lines=lines,
        token_floor_s=floor, arrivals=arrivals, fetches=fetches,
        fetch_fallback_s=simulated_fetch_s(None, _compute_fetch(speed)),
        prefill_segments=segments, prior_s=prior_s)


def _compute_fetch(speed: dict) -> float | None:
    """What a fetch on a miss cost the engine's compute as served (none measured: None)."""
    return (speed.get("fetch_cost_s") or {}).get("served")


def simulate_one(job: tuple) -> tuple[tuple, dict, object]:
    """One policy of one trace under one setting and draw: its goal metrics simulated, and
    its simulated side where ``rows_dir`` asks for its rows (else None)."""
    import numpy as np

    from emoe.rpc.fidelity import simulate
    from emoe.sim.runner import Workload

    (key, doc, run_dir, name, setting, draw, token_cost, arrival_cost, fetch_cost, shape,
     window, prior_s, rows_dir) = job
    policy = doc["policies"][name]
    speed = policy["engine_speed"]
    engine_speed = _timeline_of(speed, doc, token_cost, arrival_cost, fetch_cost, shape,
                                window, prior_s)
    workload = Workload(trace=_path(doc["trace"]), rate_scale=doc["rate_scale"], fit=doc["fit"],
                        limit=doc["limit"])
    routing = None if doc["routing"] == "synthetic" else _path(doc["routing"])
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = (Path(tmp) / "sim.csv" if rows_dir is None else
                     rows_dir / run_dir.name / rows_file(name, draw))
        side = simulate(run_dir / f"policy-{name.replace('/', '-')}.json",
                        _path(doc["checkpoint"]), _path(doc["profile"]), workload, doc["seed"],
                        rows_path, routing, engine_speed,
                        simulated_fetch_s(engine_speed, _compute_fetch(speed)),
                        _scatter_of(setting, policy, window), draw)

    def finite(column: str):
        values = side.rows[column].to_numpy(dtype=float)
        return values[np.isfinite(values)]

    values = {f"{m} {q}": float(np.percentile(finite(COLUMNS[m]), int(q[1:])))
              for m, q in CELLS}
    values["slo"] = side.summary.slo_attainment
    values["goodput"] = side.summary.goodput_rps
    values["elapsed"] = side.elapsed_s
    return key, values, None if rows_dir is None else side


def _measured_side(policy: dict, rows):
    """A policy's measured side as its report recorded it, for ``compare``."""
    from types import SimpleNamespace

    from emoe.core.metrics.admission import AdmissionCounters
    from emoe.rpc.fidelity import Side

    def real(key: str):
        return policy[key]["real"]

    summary = SimpleNamespace(requests=real("requests"), finished=real("finished"),
                              rejected=real("rejected"), slo_attainment=real("slo_attainment"),
                              goodput_rps=real("goodput_rps"), hit_rate=real("hit_rate"))
    admission = None
    if "admission" in policy:
        slowdown = policy["admission"]["slowdown"]["real"]
        admission = AdmissionCounters(policy["admission"]["deferred"]["real"],
                                      0.0 if slowdown is None else 1.0, slowdown or 0.0)
    return Side(summary, rows, real("bytes_loaded"), real("predictor_calls"),
                real("elapsed_s"), admission=admission)


def write_run(docs: dict, run: Path, sides: dict, setting: str, rows_dir: Path,
              settings_used: dict) -> None:
    """``rows_dir`` as a run of the simulator as re-run: each trace's report with every
    policy's simulated side compared anew with its measured one (``compare``; the speeds, the
    simulations as profiled and at the one served speed kept as the run recorded them) and the
    rankings redone; the measured rows and policy files copied beside the simulated rows, so
    that ``pool_replays.py`` reads it as a run. The report's paths (profile, routing) stay the
    run's own."""
    import shutil

    import pandas as pd

    from emoe.rpc.fidelity import compare, rankings

    for trace, doc in docs.items():
        for path in (run / trace).glob("policy-*.json"):
            shutil.copy(path, rows_dir / trace / path.name)
        doc = json.loads(json.dumps(doc))
        draws = sorted({d for (t, _, s, d) in sides if t == trace and s == setting})
        measured_met = {}
        for name, policy in doc["policies"].items():
            measured = shutil.copy(run / trace / rows_file(name), rows_dir / trace)
            rows = pd.read_csv(measured)
            measured_met[name] = rows.set_index("id")["slo_met"]
            sims = [sides[(trace, name, setting, d)] for d in draws]
            policy.update(compare(sims, _measured_side(policy, rows)))
        doc.update(rankings(doc["policies"], measured_met))
        doc["sim_draws"] = len(draws)
        doc["resimulated"] = {"run": str(run), "step_scatter": setting, **settings_used}
        (rows_dir / f"{trace}.json").write_text(json.dumps(doc, indent=2) + "\n")


def measured_met(docs: dict, run: Path) -> dict:
    """Per trace, the pairs of policies the measurement resolves (``resolved_pairs``)."""
    import pandas as pd

    return {trace: resolved_pairs({
        name: pd.read_csv(run / trace / rows_file(name))
        .set_index("id")["slo_met"] for name in doc["policies"]}) for trace, doc in docs.items()}


def evaluate(docs: dict, sims: dict, setting: str, draws: list[int], resolved: dict) -> dict:
    """Goal cells within the goal, of the policies without ``lru`` and of those with it apart,
    for draw ``draws[0]`` and for the median over ``draws``, each policy's errors, and the
    pairs the rankings order oppositely per trace (and of those, the pairs the measurement
    resolves)."""
    out = {}
    for label, chosen in (("one draw", draws[:1]), (f"median of {len(draws)}", draws)):
        within: dict[str, dict[str, list[bool]]] = {"without_lru": {}, "lru": {}}
        errors: dict[str, list[float]] = {}
        per_policy: dict[str, dict[str, float]] = {}
        opposite = {}
        for trace, doc in docs.items():
            reports = {}
            for name, policy in doc["policies"].items():
                sim = {k: statistics.median(sims[(trace, name, setting, s)][k] for s in chosen)
                       for k in sims[(trace, name, setting, chosen[0])]}
                group = within["lru" if "lru" in name else "without_lru"]
                mine = per_policy[f"{trace} {name}"] = {}
                for m, q in CELLS:
                    real = policy["metrics"][m]["real"][q]
                    err = mine[f"{m} {q}"] = (sim[f"{m} {q}"] - real) / real
                    errors.setdefault(f"{m} {q}", []).append(err)
                    group.setdefault(f"{m} {q}", []).append(abs(err) <= GOAL_REL)
                points = mine["slo"] = 100 * (sim["slo"] - policy["slo_attainment"]["real"])
                errors.setdefault("slo", []).append(points)
                group.setdefault("slo", []).append(abs(points) <= GOAL_POINTS)
                reports[name] = {
                    "goodput_rps": {"sim": sim["goodput"], "real": policy["goodput_rps"]["real"]},
                    "elapsed_s": {"sim": sim["elapsed"], "real": policy["elapsed_s"]["real"]},
                    "slo_attainment": {"sim": sim["slo"],
                                       "real": policy["slo_attainment"]["real"]}}
            opposite[trace] = [(p, p in resolved[trace])
                               for p in rank_pairs(reports)["opposite"]]
        out[label] = {**{f"within_{group}": {k: [sum(v), len(v)] for k, v in cells.items()}
                         for group, cells in within.items()},
                      "median_abs_error": {k: statistics.median(abs(e) for e in v)
                                           for k, v in errors.items()},
                      "errors": per_policy, "opposite": opposite}
    return out


def draw_against_draws(docs: dict, sims: dict, setting: str, draws: list[int]) -> dict:
    """Per goal metric, the cells ``draws_within_goal`` expects, of the policies without
    ``lru`` and with it apart: what a simulator that modelled the replay exactly would meet,
    as far as the step scatter alone moves the cells."""
    met: dict[str, dict[str, float]] = {"without_lru": {}, "lru": {}}
    for trace, doc in docs.items():
        for name in doc["policies"]:
            group = met["lru" if "lru" in name else "without_lru"]
            for metric in [f"{m} {q}" for m, q in CELLS] + ["slo"]:
                values = [sims[(trace, name, setting, d)][metric] for d in draws]
                group[metric] = (group.get(metric, 0.0)
                                 + draws_within_goal(values, points=metric == "slo"))
    return met


def sampling_error(docs: dict, run: Path, resamples: int = 1000) -> dict:
    """How much each measured percentile rests on the few requests around it: the median, over
    the policies without ``lru``, of the half-width of its 90% bootstrap interval relative to
    it (resampling the measured requests)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    widths: dict[str, list[float]] = {}
    for trace, doc in docs.items():
        for name in doc["policies"]:
            if "lru" in name:
                continue
            rows = pd.read_csv(run / trace / rows_file(name))
            for m, q in CELLS:
                values = rows[COLUMNS[m]].to_numpy(dtype=float)
                values = values[np.isfinite(values)]
                picks = rng.integers(0, len(values), (resamples, len(values)))
                drawn = np.percentile(values[picks], int(q[1:]), axis=1)
                low, high = np.percentile(drawn, [5, 95])
                widths.setdefault(f"{m} {q}", []).append(
                    (high - low) / 2 / np.percentile(values, int(q[1:])))
    return {k: float(np.median(v)) for k, v in widths.items()}


def main() -> int:
    from emoe.core.metrics import format_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a benchmarks/fidelity.py --out folder")
    parser.add_argument("--scatter", default="0,0.1,measured",
                        help="comma-separated settings: a sigma, 'measured', "
                             "'measured:mean' or 'measured:median'")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--token-cost", choices=("none", "fitted"), default="none",
                        help="a decode-only step's token cost beyond the profile: none (as "
                             "the run simulated), or fitted from the run's samples")
    parser.add_argument("--arrival-cost", choices=("fitted", "none"), default="none",
                        help="the loop's work per request accepted: none, left in the "
                             "windows' speeds (as emoe fidelity simulates it since session "
                             "15), or fitted from the run's samples and simulated as loop "
                             "time (as sessions 9-14 did, where they sampled them)")
    parser.add_argument("--fetch-cost", choices=("cycles", "compute"), default="cycles",
                        help="a fetch on a miss: fitted from the replay's cycles that fetched, "
                             "which then count towards the speeds (as the run simulated, where "
                             "it sampled them), or its cost in the engine's compute")
    parser.add_argument("--prefill-shape", choices=("measured", "none"), default="measured",
                        help="prompt steps by their tokens against the profile's table: as "
                             "the replay's cycles ran (as the run simulated, where it sampled "
                             "them), or none")
    parser.add_argument("--window", type=int, default=1,
                        help="samples per speed window: 1 as the run sampled them, k to read "
                             "the same counters k times as seldom")
    parser.add_argument("--prior", type=float, default=PRIOR_S,
                        help="seconds of modelled cycles each window's speed is shrunk towards "
                             f"the replay's by (default {PRIOR_S:g}: as emoe fidelity does)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", type=Path, metavar="DIR",
                        help="with one --scatter setting: also write the run as re-simulated "
                             "into DIR (reports, measured and simulated rows), a run that "
                             "pool_replays.py pools with runs of the simulator as it is")
    args = parser.parse_args()
    if args.window < 1:
        raise SystemExit(f"--window: a whole number of samples, 1 or more, got {args.window}")
    if not args.prior >= 0:
        raise SystemExit(f"--prior: seconds, 0 or more, got {args.prior}")
    docs = {path.stem: doc for path in sorted(args.run.glob("*.json"))
            if "policies" in (doc := json.loads(path.read_text()))}
    if not docs:
        raise SystemExit(f"{args.run}: no fidelity reports (built-in.json, azure-code.json)")
    settings = args.scatter.split(",")
    if args.rows is not None:
        if len(settings) != 1:
            raise SystemExit(f"--rows: one --scatter setting, got {args.scatter!r}")
        if args.rows.resolve() == args.run.resolve():
            raise SystemExit("--rows: a folder other than the run's own")
        for trace in docs:
            (args.rows / trace).mkdir(parents=True, exist_ok=True)
    draws = list(range(args.draws))
    jobs = [((trace, name, setting, draw), doc, args.run / trace, name, setting, draw,
             args.token_cost, args.arrival_cost, args.fetch_cost, args.prefill_shape,
             args.window, args.prior, args.rows)
            for trace, doc in docs.items() for name in doc["policies"]
            for setting in settings for draw in (draws if setting != "0" else draws[:1])]
    with ProcessPoolExecutor(args.workers) as pool:
        done = list(pool.map(simulate_one, jobs))
    sims = {key: values for key, values, _ in done}
    if args.rows is not None:
        write_run(docs, args.run, {key: side for key, _, side in done}, settings[0],
                  args.rows, {"token_cost": args.token_cost,
                              "arrival_cost": args.arrival_cost,
                              "fetch_cost": args.fetch_cost,
                              "prefill_shape": args.prefill_shape, "window": args.window,
                              "prior_s": args.prior})
        print(f"the run as re-simulated: {args.rows}")
    for (trace, name, setting, draw), values in list(sims.items()):  # deterministic: one run
        if setting == "0":
            for s in draws[1:]:
                sims[(trace, name, setting, s)] = values
    resolved = measured_met(docs, args.run)
    results = {setting: evaluate(docs, sims, setting, draws, resolved)
               for setting in settings}
    metrics = [f"{m} {q}" for m, q in CELLS] + ["slo"]
    rows = []
    for setting, by_label in results.items():
        for label, r in by_label.items():
            for group in ("without_lru", "lru"):
                cells = r[f"within_{group}"]
                if not cells:
                    continue
                rows.append([setting, label, group.replace("_", " "), *(
                    f"{cells[k][0]}/{cells[k][1]} ({r['median_abs_error'][k]:.0%})"
                    if k != "slo" else
                    f"{cells[k][0]}/{cells[k][1]} ({r['median_abs_error'][k]:.1f} pts)"
                    for k in metrics),
                    "; ".join(f"{t} {len(o)} ({sum(res for _, res in o)})"
                              for t, o in r["opposite"].items())])
    print(f"{args.run}: cells within the goal, of the policies without lru and with it apart "
          f"(median |error| over all policies)")
    print(format_table(["step scatter", "draws", "policies", "TTFT p50", "TTFT p90", "E2E p50",
                        "E2E p90", "SLO", "pairs opposite (resolved by the measurement)"],
                       rows))
    for setting in settings:
        if len(draws) < 3 or setting == "0":
            continue
        ceiling = results[setting]["draw_against_draws"] = draw_against_draws(
            docs, sims, setting, draws)
        print(f"{setting}: one draw against the median of the other {len(draws) - 1}, cells "
              f"within the goal (what the step scatter alone leaves of it): " + "; ".join(
                  f"{group.replace('_', ' ')} " + ", ".join(
                      f"{k.upper()} {v:.1f}" for k, v in cells.items())
                  for group, cells in ceiling.items()))
    noise = sampling_error(docs, args.run)
    print("the measured percentiles' own sampling error (median half-width of a 90% bootstrap "
          "interval, without lru): " + ", ".join(f"{k.upper()} {v:.0%}" for k, v in noise.items()))
    results["measured_sampling_error"] = noise
    name = "resimulated" + "".join(f"-{kind}-{value}" for kind, value, default in (
        ("token", args.token_cost, "none"), ("arrival", args.arrival_cost, "none"),
        ("fetch", args.fetch_cost, "cycles"), ("shape", args.prefill_shape, "measured"),
        ("window", args.window, 1), ("prior", args.prior, PRIOR_S))
        if value != default) + ".json"
    (args.run / name).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
