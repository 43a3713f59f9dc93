"""``emoe sim``: simulate a trace under one or several policy configurations.

With no arguments it runs the project's main what-if study: the built-in trace on the default
card under each expert planner (and the eMoE scheduler), printing one comparison table.
Lists (``--scheduler fcfs,emoe``) run every combination. Only argparse is imported here:
everything else loads inside the handler, so the command starts fast.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DEFAULT_COMPARISON = (("fcfs", "lru"), ("fcfs", "static"), ("fcfs", "predict-every"),
                      ("fcfs", "emoe"), ("emoe", "emoe"))
"""(scheduling policy, expert planner) pairs of the default what-if study."""
GIB = 1024**3

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '80GiB', '40GB', '3.5e9' (decimal and binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; e.g. 48GiB, 40GB, 3.5e9")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers, e.g. 20,40") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim", help="simulate a request trace under scheduling and expert-loading policies",
        description=__doc__.split("\n\n")[0] + " Times, memory and hits are simulated.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("workload")
    src.add_argument("--trace", type=Path, default=None,
                     help="request trace (Azure CSV, emoe CSV/JSONL); default: the built-in "
                          "traces/mixed-tasks-poisson.csv")
    src.add_argument("--synthetic", type=int, metavar="N", default=None,
                     help="instead of a trace, N synthetic Poisson requests (streamed)")
    src.add_argument("--rate", type=float, default=5.0, help="req/s of --synthetic")
    src.add_argument("--mix", default=None,
                     help="task mix for unlabelled requests, e.g. qa=1,conversation=2")
    src.add_argument("--rate-scale", type=float, default=1.0,
                     help="multiply the arrival rate (2 = twice as fast)")
    src.add_argument("--duration", type=float, default=None, metavar="S",
                     help="simulate only the first S seconds of arrivals")
    sys_ = p.add_argument_group("system")
    sys_.add_argument("--model", default="mixtral-8x7b")
    sys_.add_argument("--gpu", default="h100-80gb")
    sys_.add_argument("--profile", type=Path, default=None,
                      help="engine profile JSON replacing the preset's coefficients "
                           "(docs/profile-format.md)")
    sys_.add_argument("--memory-budget", type=parse_size, default=None, metavar="SIZE",
                      help="GPU memory to use (default: all of it)")
    pol = p.add_argument_group("policies (comma-separated lists run every combination)")
    pol.add_argument("--scheduler", type=_names, default=None,
                     help="scheduling policies: fcfs, sjf, edf, emoe (default: the built-in "
                          "comparison)")
    pol.add_argument("--experts", type=_names, default=None,
                     help="expert planners: all, lru, static, predict-every, emoe (default: "
                          "the built-in comparison)")
    pol.add_argument("-p", "--prediction-interval", type=_ints, default=[40], metavar="P",
                     help="prompts between predictor runs (emoe planner)")
    pol.add_argument("--experts-per-layer", type=int, default=None, metavar="L",
                     help="resident experts per layer (default 5, or from --expert-budget)")
    pol.add_argument("--expert-budget", type=parse_size, default=None, metavar="SIZE",
                     help="GPU memory for experts, spread over the layers")
    pol.add_argument("--policy", type=Path, default=None,
                     help="a policy file (replaces the policy options)")
    pol.add_argument("--sensitivity", type=Path, default=None,
                     help="sensitivity file from `emoe sensitivity` (replaces the policy's "
                          "table; default: the task profiles' hand-set defaults)")
    pol.add_argument("--sensitivity-mode", choices=["graded", "binary"], default="graded",
                     help="which s of the sensitivity file")
    run = p.add_argument_group("run and output")
    run.add_argument("--routing-trace", type=Path, default=None,
                     help="recorded routing (Parquet, docs/routing-trace.md); default: synthetic")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, default=None,
                     help="per-request results, .csv/.jsonl/.parquet (one file per run: "
                          "the run name is added when several run)")
    run.add_argument("--json", type=Path, default=None, help="run summaries as JSON")
    run.add_argument("--plots", type=Path, default=None, metavar="DIR",
                     help="write comparison plots (PNG) to DIR")
    run.add_argument("--export-policy", type=Path, default=None, metavar="FILE",
                     help="write the best run's policy file (highest SLO attainment, then "
                          "accuracy proxy, then goodput) for `emoe serve --policy`")
    run.add_argument("--accuracy-calibration", type=Path, default=None, metavar="FILE",
                     help="`emoe calibrate-proxy` file: print agreement and quality estimated "
                          "from the accuracy proxy")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_sim)


def run_sim(args: argparse.Namespace) -> int:
    import json
    import sys

    from emoe.core.errors import ConfigError
    from emoe.core.metrics import format_comparison, format_summary
    from emoe.sim.runner import DEFAULT_EXPERTS_PER_LAYER, SimConfig, Workload, simulate

    if args.trace is not None and args.synthetic is not None:
        raise ConfigError("--trace and --synthetic: give one workload, not both")
    workload = Workload(trace=args.trace, synthetic_requests=args.synthetic,
                        synthetic_rate=args.rate, mix=args.mix, rate_scale=args.rate_scale,
                        duration_s=args.duration)
    base = SimConfig(model=args.model, gpu=args.gpu, profile=args.profile,
                     experts_per_layer=args.experts_per_layer or DEFAULT_EXPERTS_PER_LAYER,
                     expert_budget_bytes=args.expert_budget,
                     memory_budget_bytes=args.memory_budget, policy_file=args.policy,
                     routing_trace=args.routing_trace, seed=args.seed,
                     sensitivity=args.sensitivity, sensitivity_mode=args.sensitivity_mode)
    configs = _configs(base, args)
    model, hardware = configs[0].specs()
    calibration = None
    if args.accuracy_calibration is not None:
        from emoe.core.accuracy import AccuracyCalibration

        calibration = AccuracyCalibration.from_file(args.accuracy_calibration)

    print(f"emoe sim: SIMULATED {model.name} on {hardware.name} "
          f"({hardware.gpu_memory_bytes / GIB:.0f} GiB); workload: {workload.describe()}")
    _print_fit_note(model, hardware, args)
    outcomes = []
    for config in configs:
        out = args.out
        if out is not None and len(configs) > 1:
            out = out.with_name(f"{out.stem}-{config.name.replace('/', '-')}"
                                f"{'-p' + str(config.prediction_interval) if len(args.prediction_interval) > 1 else ''}"
                                f"{out.suffix}")
        outcome = simulate(config, workload, out=out, progress=not args.no_progress)
        outcomes.append(outcome)
    first = outcomes[0]
    print(f"routing: {first.routing}; expert hits {first.hits_method}")
    print(f"cost model: {hardware.provenance.split('. ')[0]}; every coefficient's provenance: "
          "docs/simulator.md")
    print(_accuracy_note(configs[0].policy(model), calibration))
    print()
    if len(outcomes) == 1:
        print(format_summary(first.summary))
    else:
        print(format_comparison([o.summary for o in outcomes]))
    if calibration is not None:
        print()
        print("accuracy estimated from the proxy (calibration: " + calibration.describe() + ")")
        for warning in _calibration_mismatch(calibration, model, configs[0].policy(model)):
            print(f"  warning: {warning}")
        for o in outcomes:
            if o.summary.accuracy_proxy is not None:
                estimate = calibration.predict(o.summary.accuracy_proxy)
                print(f"  {o.summary.name}: proxy {o.summary.accuracy_proxy:.3f} -> "
                      + ", ".join(f"{m} ~{v:.3f}" for m, v in estimate.items()))
    print()
    print("simulated " + ", ".join(f"{o.summary.name}: {o.steps} steps in {o.wall_s:.2f} s"
                                   for o in outcomes))
    if args.json is not None:
        args.json.write_text(json.dumps([o.summary.to_dict() for o in outcomes], indent=2) + "\n")
    if args.plots is not None:
        from emoe.sim.plots import write_plots

        written = write_plots([o.summary for o in outcomes], args.plots,
                              title=f"{model.name} on {hardware.name}, {workload.describe()}")
        print("plots: " + ", ".join(str(p) for p in written), file=sys.stdout)
    if args.export_policy is not None:
        best = max(outcomes, key=_ranking)
        best.config.policy(best.model).to_file(args.export_policy)
        print(f"policy: {best.summary.name} (best SLO attainment) written to {args.export_policy}")
    return 0


def _ranking(outcome) -> tuple[float, float, float]:
    summary = outcome.summary
    accuracy = summary.accuracy_proxy if summary.accuracy_proxy is not None else 1.0
    return (summary.slo_attainment, accuracy, summary.goodput_rps)


def _configs(base, args: argparse.Namespace) -> list:
    import dataclasses

    if args.policy is not None:
        return [base]
    if args.scheduler is None and args.experts is None:
        pairs = list(DEFAULT_COMPARISON)
    else:
        pairs = [(s, e) for s in (args.scheduler or ["emoe"]) for e in (args.experts or ["emoe"])]
    return [dataclasses.replace(base, scheduling=s, planner=e, prediction_interval=p)
            for s, e in pairs for p in args.prediction_interval]


def _accuracy_note(policy, calibration) -> str:
    """Which sensitivity weighs the accuracy proxy, and whether it is calibrated."""
    source = policy.sensitivity_source
    weights = (f"{source['mode']} s measured on {source['model']} ({source['file']})"
               if source else "hand-set task-profile defaults (not measured)")
    if calibration is None:
        return (f"accuracy proxy: sensitivity-weighted hit share, weights {weights}; "
                f"uncalibrated (--accuracy-calibration maps it to agreement and quality)")
    return f"accuracy proxy: weights {weights}; calibrated against `emoe eval` (below)"


def _calibration_mismatch(calibration, model, policy) -> list[str]:
    """Why a calibration may not transfer to this simulation."""
    out = []
    if calibration.model and calibration.model != model.name:
        out.append(f"calibrated on {calibration.model}, simulating {model.name}: the estimate "
                   f"does not transfer between models")
    measured = {p.get("sensitivity") for p in calibration.points} - {None}
    source = policy.sensitivity_source
    used = f"{source['file']} ({source['mode']})" if source else "hand-set"
    if measured and used not in measured:
        out.append(f"calibrated with sensitivity {', '.join(sorted(measured))}; this run weighs "
                   f"the proxy with {used}")
    return out


def _print_fit_note(model, hardware, args: argparse.Namespace) -> None:
    """Say so when keeping every expert resident does not fit the card (the default study
    leaves the ``all`` planner out for that reason)."""
    needed = model.non_expert_bytes + model.all_experts_bytes
    budget = args.memory_budget or hardware.gpu_memory_bytes
    if needed > budget:
        print(f"note: all experts resident (planner 'all') needs {needed / GIB:.1f} GiB of "
              f"weights alone; {hardware.name} offers {budget / GIB:.1f} GiB, so experts are "
              f"offloaded (one card, no tensor parallelism modelled)")
