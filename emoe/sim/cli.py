"""``emoe sim``: simulate a trace under one or many policy configurations.

With no arguments it runs the project's default what-if study on the built-in workload: the
scheduling policies side by side, and the expert planners at three budgets, in one table and
one figure. Every knob takes a comma-separated list and every combination runs (identical
systems once), in parallel. ``--search capacity`` finds each configuration's highest request
rate that meets an SLO target, and the Pareto front over capacity, accuracy and memory. Only
argparse is imported here: everything else loads inside the handler, so the command starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

SCHEDULERS = ("fcfs", "sjf", "edf", "emoe")
STUDY_PLANNERS = ("lru", "static", "predict-every", "emoe")
STUDY_BUDGETS = ("4/layer", "5/layer", "6/layer")
"""The default study: every scheduling policy with the emoe planner at 5 experts per layer (the
scheduler's effect), and the emoe scheduler with every offloading planner at 4, 5 and 6 experts
per layer (the planners' accuracy/memory trade-off)."""
GIB = 1024**3


def parse_size(text: str) -> int:
    """Bytes from '80GiB', '40GB', '3.5e9' (decimal and binary units; emoe.core.budget)."""
    from emoe.core.budget import parse_size as size
    from emoe.core.errors import ConfigError

    try:
        return size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers, e.g. 1,1.5,2") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers > 0")
    return values


def _sizes(text: str) -> list[int]:
    return [parse_size(v) for v in _names(text)]


def parse_budget(text: str) -> dict:
    """An expert budget in any spelling of ``emoe.core.budget`` (``5/layer``, ``62.5%``,
    ``0.625``, ``40GiB``): the SimConfig fields it sets."""
    from emoe.core.budget import ExpertBudget
    from emoe.core.errors import ConfigError

    try:
        budget = ExpertBudget.parse(text, flag=None)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if budget.per_layer is not None:
        return {"experts_per_layer": budget.per_layer}
    if budget.fraction is not None:
        return {"expert_fraction": budget.fraction}
    return {"expert_budget_bytes": budget.bytes}


def _budgets(text: str) -> list[dict]:
    return [parse_budget(v) for v in _names(text)]


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
                          "traces/mixed-tasks-bursty.csv")
    src.add_argument("--synthetic", type=int, metavar="N", default=None,
                     help="instead of a trace, N synthetic requests (streamed)")
    src.add_argument("--rate", type=float, default=5.0, help="req/s of --synthetic")
    src.add_argument("--arrival", choices=("poisson", "gamma"), default=None,
                     help="inter-arrival gaps of --synthetic (default poisson; gamma: --cv)")
    src.add_argument("--cv", type=float, default=None,
                     help="coefficient of variation of gamma gaps (default 2; 1 is Poisson)")
    src.add_argument("--mix", default=None,
                     help="task mix for unlabelled requests, e.g. qa=1,conversation=2")
    src.add_argument("--duration", type=float, default=None, metavar="S",
                     help="simulate only the first S seconds of arrivals")
    src.add_argument("--fit", choices=("reject", "skip", "scale"), default="reject",
                     help="requests whose prompt + output exceed the model's context: rejected "
                          "with the server's reason, skipped, or scaled down to fit (as "
                          "`emoe replay --fit`)")
    pol = p.add_argument_group("configurations (comma-separated lists run every combination)")
    pol.add_argument("--scheduler", type=_names, default=None,
                     help="scheduling policies: fcfs, sjf, edf, emoe (default: the study)")
    pol.add_argument("--experts", "--planner", dest="experts", type=_names, default=None,
                     help="expert planners: all, lru, static, predict-every, emoe (default: "
                          "the study)")
    pol.add_argument("-p", "--prediction-interval", type=_ints, default=[40], metavar="P",
                     help="prompts between predictor runs (emoe planner)")
    pol.add_argument("--expert-budget", type=_budgets, default=None, metavar="B",
                     help="experts resident: 5/layer, 62.5%% or 0.625 of all experts, or a "
                          "size (40GiB) spread over the layers (default 5/layer)")
    pol.add_argument("--experts-per-layer", type=_ints, default=None, metavar="L",
                     help="the same as --expert-budget L/layer")
    pol.add_argument("--miss", type=_names, default=None,
                     help="miss policy: reroute, drop (simulated as reroute), fetch (lru); "
                          "default: the planner's own")
    pol.add_argument("--rate-scale", type=_floats, default=[1.0], metavar="X",
                     help="multiply the arrival rate (2 = twice as fast); with --search: the "
                          "first probe")
    pol.add_argument("--memory-budget", type=_sizes, default=None, metavar="SIZE",
                     help="GPU memory to use (default: all of the card)")
    pol.add_argument("--gpu", type=_names, default=["h100-80gb"],
                     help="GPU presets: a100-40gb, h100-80gb, h200-141gb")
    pol.add_argument("--model", default="mixtral-8x7b",
                     help="a preset (mixtral-8x7b, mixtral-8x22b, qwen1.5-moe-a2.7b, "
                          "olmoe-1b-7b) or a Hugging Face model folder or its config.json "
                          "(Mixtral, Qwen2-MoE, OLMoE): the spec is computed from the config")
    pol.add_argument("--profile", type=Path, default=None,
                     help="engine profile JSON replacing the preset's coefficients "
                          "(docs/profile-format.md)")
    pol.add_argument("--policy", type=Path, default=None,
                     help="a policy file (replaces the policy options)")
    pol.add_argument("--sensitivity", type=Path, default=None,
                     help="sensitivity file from `emoe sensitivity` (replaces the policy's "
                          "table; default: the task profiles' hand-set defaults)")
    pol.add_argument("--sensitivity-mode", choices=["graded", "binary"], default="graded",
                     help="which s of the sensitivity file")
    search = p.add_argument_group("search and choice")
    search.add_argument("--search", choices=("capacity",), default=None,
                        help="capacity: per configuration, the highest rate scale meeting "
                             "--slo-target (bisection, each probe a whole simulation)")
    search.add_argument("--slo-target", type=float, default=0.9,
                        help="SLO attainment a capacity must reach")
    search.add_argument("--capacity-tolerance", type=float, default=0.05, metavar="TOL",
                        help="stop bisecting when the bracket's ratio is within 1 + TOL")
    search.add_argument("--best", default=None,
                        choices=("capacity", "goodput", "slo", "accuracy", "memory"),
                        help="rule for the best configuration (default: capacity with "
                             "--search, else slo; memory: least GPU memory for weights)")
    search.add_argument("--accuracy-floor", type=float, default=0.0, metavar="A",
                        help="the best configuration's accuracy proxy must be at least A")
    run = p.add_argument_group("run and output")
    run.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                     help="worker processes (default: all cores; 1: in this process)")
    run.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the configurations on Ray: a cluster's ADDRESS, or a local Ray "
                          "started for the run (needs the ray extra)")
    run.add_argument("--routing-trace", type=Path, default=None,
                     help="recorded routing (Parquet, docs/routing-trace.md); default: synthetic")
    run.add_argument("--warm-start", type=Path, default=None, metavar="TRACE",
                     help="routing trace of earlier prompts the planner starts from: warms the "
                          "predictor, sets each task's expected output length, pins static "
                          "(as `emoe eval --calibration`)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, default=None,
                     help="per-request results, .csv/.jsonl/.parquet (one file per "
                          "configuration: its name is added when several run)")
    run.add_argument("--json", type=Path, default=None,
                     help="one row per configuration: its parameters and results")
    run.add_argument("--plots", type=Path, default=None, metavar="DIR",
                     help="write plots (PNG) to DIR")
    run.add_argument("--export-policy", type=Path, default=None, metavar="FILE",
                     help="write the best configuration's policy file (--best, "
                          "--accuracy-floor) for `emoe serve --policy`")
    run.add_argument("--accuracy-calibration", type=Path, default=None, metavar="FILE",
                     help="`emoe calibrate-proxy` file: its sensitivity table weighs the "
                          "accuracy proxy, and agreement and quality are estimated from it")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_sim)


def run_sim(args: argparse.Namespace) -> int:
    import time

    from emoe.core.errors import ConfigError
    from emoe.sim import report
    from emoe.sim.parallel import default_jobs, run_tasks
    from emoe.sim.search import CapacitySearch, Task, distinct, mark_pareto, run_task

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: must be >= 1")
    if not 0.0 <= args.accuracy_floor <= 1.0:
        raise ConfigError(f"--accuracy-floor {args.accuracy_floor:g}: must be in [0, 1]")
    workload = _workload(args)
    search = None
    if args.search == "capacity":
        if len(args.rate_scale) > 1:
            raise ConfigError("--search capacity searches the rate scale: give one "
                              "--rate-scale (the first probe), not a list")
        search = CapacitySearch(slo_target=args.slo_target, tolerance=args.capacity_tolerance,
                                start=args.rate_scale[0])
    requested = _configs(args)
    unique = distinct(requested)
    configs, stats = unique, None
    if search is not None:
        stats = workload.stats(args.seed)
        configs = _with_all_resident_baselines(unique)
    model, hardware = configs[0].specs()
    calibration = None
    if args.accuracy_calibration is not None:
        from emoe.core.accuracy import AccuracyCalibration
        from emoe.core.paths import resolve_path

        calibration = AccuracyCalibration.from_file(resolve_path(args.accuracy_calibration))
    jobs = 1 if args.ray is None and len(configs) == 1 else (args.jobs or default_jobs())
    where = (f"Ray ({args.ray})" if args.ray is not None
             else f"{min(jobs, len(configs))} local process(es)")
    print(f"emoe sim: SIMULATED {model.name} on {report.gpus(configs)}; workload: "
          f"{workload.describe()}" + (f" ({stats.requests} requests, {stats.rate:.3g} req/s)"
                                      if stats else ""))
    _print_fit_note(model, configs)
    what = ("capacity search (bisection on the rate scale, SLO attainment >= "
            f"{100 * search.slo_target:g}%)" if search else "run")
    merged, added = len(requested) - len(unique), len(configs) - len(unique)
    print(f"{len(configs)} configuration(s), one {what} each, on {where}"
          + (f"; {merged} requested combination(s) simulate identically to another and were "
             "merged" if merged else "")
          + (f"; {added} all-experts-resident baseline(s) added" if added else ""))

    single = len(configs) == 1 and search is None
    tasks = [Task(config=c, workload=workload, search=search,
                  total_requests=stats.requests if stats else 0,
                  out=_out_path(args.out, c, single),
                  progress=single and not args.no_progress) for c in configs]
    started = time.perf_counter()
    bar = None if single or args.no_progress else report.progress_bar(len(tasks))
    try:
        results = run_tasks(run_task, tasks, jobs=jobs, ray_address=args.ray,
                            on_done=(lambda n: bar.update(n - bar.n)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - started
    mark_pareto(results)
    first = results[0].outcome
    print(f"routing: {first.routing}; expert hits {first.hits_method}")
    if args.warm_start is not None:
        print(f"warm start: the planner starts from the routing history {args.warm_start} "
              f"(predictor observed it, output lengths per task measured on it, static pinned "
              f"by it)")
    print(first.fit.describe())
    print(f"cost model: {first.hardware.provenance.split('. ')[0]}; every coefficient's "
          "provenance: docs/simulator.md")
    print(_accuracy_note(configs[0].policy(model), calibration, args.accuracy_calibration,
                         model.name))
    print()
    if stats is None:
        stats = report.stats_of(results[0].outcome.summary)
    report.print_results(results, stats, search, single)
    if calibration is not None:
        print()
        print(f"accuracy estimated from the proxy (calibration {args.accuracy_calibration}: "
              f"{calibration.describe()})")
        for warning in _calibration_mismatch(calibration, model, first):
            print(f"  warning: {warning}")
        for r in results:
            proxy = r.outcome.summary.accuracy_proxy
            if proxy is not None:
                estimate = calibration.predict(proxy)
                print(f"  {r.config.name}: proxy {proxy:.3f} -> "
                      + ", ".join(f"{m} ~{v:.3f}" for m, v in estimate.items()))
    freed = report.freed_memory_rows(results, stats)
    print()
    print(report.format_freed_memory(freed, search is not None))
    objective = args.best or ("capacity" if search else "slo")
    best = report.print_best(results, objective, args.accuracy_floor)
    simulations = sum(max(1, len(r.probes)) for r in results)
    steps = sum(r.outcome.steps for r in results)
    print(f"simulated {simulations} run(s) of {len(results)} configuration(s) in {wall:.2f} s "
          f"wall ({steps} steps in the reported runs)")
    if args.json is not None:
        report.write_json(args.json, results, freed, stats, calibration)
        print(f"results: {args.json}")
    if args.plots is not None:
        from emoe.sim.plots import write_plots

        written = write_plots(results, args.plots, title=f"{model.name}, "
                              f"{workload.describe()}", searched=search is not None)
        print("plots: " + ", ".join(str(p) for p in written))
    if args.export_policy is not None:
        if best is None:
            print(f"emoe sim: no configuration meets the accuracy floor "
                  f"{args.accuracy_floor:g}; no policy written", file=sys.stderr)
            return 1
        best.outcome.config.policy(best.outcome.model).to_file(args.export_policy)
        print(f"policy: {best.config.name} written to {args.export_policy}")
    return 0


def _workload(args: argparse.Namespace):
    from emoe.core.errors import ConfigError
    from emoe.sim.runner import Workload

    if args.trace is not None and args.synthetic is not None:
        raise ConfigError("--trace and --synthetic: give one workload, not both")
    if (args.arrival is not None or args.cv is not None) and args.synthetic is None:
        raise ConfigError("--arrival/--cv shape --synthetic arrivals; a trace has its own")
    arrival = args.arrival or ("gamma" if args.cv is not None else "poisson")
    cv = 1.0 if arrival == "poisson" else (2.0 if args.cv is None else args.cv)
    if arrival == "poisson" and args.cv not in (None, 1.0):
        raise ConfigError(f"--cv {args.cv:g}: Poisson arrivals have CV 1; use --arrival gamma")
    trace = args.trace
    if trace is None and args.synthetic is None:
        from emoe.core.workload import STUDY_TRACE

        trace = STUDY_TRACE
    return Workload(trace=trace, synthetic_requests=args.synthetic, synthetic_rate=args.rate,
                    cv=cv, mix=args.mix, duration_s=args.duration, fit=args.fit)


def _configs(args: argparse.Namespace) -> list:
    """Every combination of the lists, in order (the default study where no policy is given)."""
    import itertools

    from emoe.sim.runner import DEFAULT_EXPERTS_PER_LAYER, SimConfig

    budgets = (args.expert_budget or []) + [{"experts_per_layer": L}
                                            for L in args.experts_per_layer or []]
    base = SimConfig(model=args.model, profile=args.profile, policy_file=args.policy,
                     routing_trace=args.routing_trace, seed=args.seed, experts_per_layer=None,
                     sensitivity=args.sensitivity, sensitivity_mode=args.sensitivity_mode,
                     warm_start=args.warm_start, proxy_sensitivity=args.accuracy_calibration)
    if args.policy is not None:
        pairs = [(None, None, {})]
    elif args.scheduler is None and args.experts is None:
        chosen = budgets or [parse_budget(b) for b in STUDY_BUDGETS]
        default = budgets[:1] or [{"experts_per_layer": DEFAULT_EXPERTS_PER_LAYER}]
        pairs = ([(s, "emoe", b) for s in SCHEDULERS for b in default]
                 + [("emoe", e, b) for e in STUDY_PLANNERS for b in chosen])
    else:
        budgets = budgets or [{"experts_per_layer": DEFAULT_EXPERTS_PER_LAYER}]
        pairs = [(s, e, b) for s in (args.scheduler or ["emoe"])
                 for e in (args.experts or ["emoe"]) for b in budgets]
    configs = []
    for (scheduler, planner, budget), p, miss, rate, memory, gpu in itertools.product(
            pairs, args.prediction_interval, args.miss or [None], args.rate_scale,
            args.memory_budget or [None], args.gpu):
        policy = {} if args.policy is not None else dict(
            scheduling=scheduler, planner=planner, prediction_interval=p, miss_policy=miss,
            memory_budget_bytes=memory, **budget)
        configs.append(dataclasses.replace(base, rate_scale=rate, gpu=gpu, **policy))
    return configs


def _with_all_resident_baselines(configs: list) -> list:
    """In a capacity search, add ``<scheduler>/all`` on each card where all experts fit, so the
    freed-memory table can compare throughput against them."""
    from emoe.sim.search import distinct

    extra = []
    for config in configs:
        if config.policy_file is not None or config.planner == "all":
            continue
        model, hardware = config.specs()
        budget = config.memory_budget_bytes or hardware.gpu_memory_bytes
        if model.non_expert_bytes + model.all_experts_bytes < budget:
            extra.append(dataclasses.replace(config, planner="all"))
    return distinct(configs + extra)


def _out_path(out: Path | None, config, single: bool) -> Path | None:
    if out is None or single:
        return out
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", config.name).strip("-")
    return out.with_name(f"{out.stem}-{slug}{out.suffix}")


def _accuracy_note(policy, calibration, path, model_name: str) -> str:
    """Which sensitivity weighs the accuracy proxy, and which calibration maps it (or which
    calibration the repository ships for the model, when none is given)."""
    import os

    from emoe.core.paths import REPOSITORY

    source = policy.sensitivity_source
    planner = (f"{source['mode']} s measured on {source['model']} ({source['file']})"
               if source else "hand-set task-profile defaults (not measured)")
    if calibration is None:
        shipped = f"traces/accuracy-calibration-{model_name}.json"
        hint = (f"--accuracy-calibration {shipped} maps it to agreement and quality"
                if os.path.exists(os.path.join(REPOSITORY, shipped)) else
                "--accuracy-calibration maps it to agreement and quality")
        return (f"accuracy proxy: sensitivity-weighted hit share, weights {planner}; "
                f"uncalibrated: no calibration used ({hint})")
    return (f"accuracy proxy: weights {calibration.weights()} from the calibration {path} "
            f"(the planner's sensitivity: {planner}); estimates below")


def _calibration_mismatch(calibration, model, outcome) -> list[str]:
    """Why a calibration may not transfer to this simulation."""
    out = []
    if calibration.model and calibration.model != model.name:
        out.append(f"calibrated on {calibration.model}, simulating {model.name}: the estimate "
                   f"does not transfer between models")
    if calibration.routing.startswith("replayed") and outcome.hits_method.startswith("computed"):
        out.append("calibrated on replayed routing; this run's routing is synthetic, whose "
                   "proxy differs from replayed routing's (by up to 0.09 on emoe-tiny, "
                   "docs/offloading.md): give --routing-trace")
    return out


def _print_fit_note(model, configs: list) -> None:
    """Say so when keeping every expert resident does not fit a card (the default study
    leaves the ``all`` planner out for that reason)."""
    needed = model.non_expert_bytes + model.all_experts_bytes
    for gpu in dict.fromkeys(c.gpu for c in configs):
        config = next(c for c in configs if c.gpu == gpu)
        _, hardware = config.specs()
        budget = config.memory_budget_bytes or hardware.gpu_memory_bytes
        if needed > budget:
            print(f"note: all experts resident (planner 'all') needs {needed / GIB:.1f} GiB of "
                  f"weights alone; {hardware.name} offers {budget / GIB:.1f} GiB, so experts "
                  f"are offloaded (one card, no tensor parallelism modelled)")
