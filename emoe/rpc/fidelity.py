"""``emoe fidelity``: how far the simulation is off, on one trace, under one or more policies.

For each policy (``--scheduler a,b --experts c,d`` as in ``emoe sim``, or ``--policy FILE``)
the same workload (trace, limit, rate scale, seed, context fit) runs twice:

- **simulated**: ``emoe sim --model CHECKPOINT --profile PROFILE --policy P``, the engine as
  served on this machine (the profile's step table, serving path and engine limits);
- **measured**: ``emoe replay`` against ``emoe serve --checkpoint CHECKPOINT --policy P
  --profile PROFILE`` started here in a child process for each policy (or ``--target``, one
  policy, a server already running it).

Both sides see the same routing by default (``--prompts tasks``): replay sends each request
as text of its task (``emoe.engine.reference.prompts``), greedily, and before the policies run
the routing of exactly those prompts is recorded on the engine (``emoe record-routing
--trace``, all experts, in ``--out-dir``) and replayed by the simulator, request by request.
Greedy routing does not depend on the batch, so the server routes as recorded wherever it
computes every chosen expert (``all``, ``lru``); under ``reroute`` a miss changes the hidden
states after it, and the served routing drifts from the recording (docs/fidelity.md).

The report gives, per policy and metric (TTFT, TPOT, E2E, queueing), p50/p90/p99 simulated and
measured with the relative error (sim - real) / real and the two-sample Kolmogorov-Smirnov
statistic; SLO attainment, goodput, expert hit rate, bytes of experts loaded and predictor
calls on both sides; the ranking of the policies by goodput on each side and whether they
agree; CDF plots. The machine's load average before and after is printed: the measured side
runs on this machine's cores, and other load slows it. The machine's speed also drifts in ways
the load average misses (a VM's neighbours): a server started with ``--profile`` times its
serving loop's cycles against the profile's model of them (``emoe.rpc.engine_speed``), and the
report gives the ratio over each replay (``engine_speed.served``; ``engine_speed.compute``:
its engine's compute alone against the step model); ``--engine-speed served`` simulates each
policy's loop at that speed, with the simulation at the profile's own speed reported beside it
(``as_profiled``). ``--engine-speed timeline`` samples the same counters every
``SPEED_SAMPLE_S`` during the replay and simulates each window at its own speed
(``emoe.sim.speed``), with the simulation at the one overall speed beside it too
(``as_served``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only; these load when a command needs them
    import pandas as pd

    from emoe.core.metrics.admission import AdmissionCounters
    from emoe.core.metrics.summary import Summary
    from emoe.core.policy_file import PolicyConfig
    from emoe.core.specs import ModelSpec
    from emoe.sim.speed import SpeedTimeline, StepScatter


METRICS = (("ttft", "ttft_s", "TTFT (s)"), ("tpot", "tpot_s", "TPOT (ms)"),
           ("e2e", "e2e_s", "E2E (s)"), ("queueing", "queueing_s", "queueing (s)"))
QUANTILES = (("p50", 50), ("p90", 90), ("p99", 99))
DEFAULT_LIMIT = 200
SPEED_SAMPLE_S = 0.5
"""How often the server's loop speed is sampled during a replay (``--engine-speed timeline``):
on the dev VM its speed over half-second windows keeps a lag-1 correlation of ~0.8."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fidelity", help="simulate a trace and replay it against a live server: how far off "
                         "is the simulation",
        description="Run the same trace under the same policies in the simulator (the "
                    "served engine modelled from its profile) and against a live emoe serve, "
                    "and report how far the simulation was off (docs/fidelity.md).")
    src = p.add_argument_group("workload (as emoe replay)")
    src.add_argument("--trace", type=Path, default=None,
                     help="request trace; default: the built-in traces/mixed-tasks-poisson.csv")
    src.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                     help=f"the first N requests (default {DEFAULT_LIMIT})")
    src.add_argument("--rate-scale", type=float, default=1.0,
                     help="multiply the arrival rate (2 = twice as fast)")
    src.add_argument("--seed", type=int, default=0, help="task mix and prompt seed")
    src.add_argument("--fit", choices=("reject", "skip", "scale"), default="reject",
                     help="requests longer than the model's context: rejected (both sides), "
                          "skipped, or scaled down to fit")
    src.add_argument("--prompts", choices=("tasks", "random"), default="tasks",
                     help="what replay sends: text of each request's task, greedy, whose "
                          "routing is recorded first and replayed by the simulator, so both "
                          "sides see the same routing (default); or random token ids, with "
                          "synthetic routing simulated")
    sys_ = p.add_argument_group("engine")
    sys_.add_argument("--checkpoint", type=Path, default=None,
                      help="model folder (default: the reference model emoe-tiny)")
    sys_.add_argument("--profile", type=Path, default=None,
                      help="`emoe profile` of this model and thread count (default: measure "
                           "one now, into --out-dir)")
    sys_.add_argument("--threads", type=int, default=None,
                      help="engine threads (default: the profile's; another count is refused)")
    sys_.add_argument("--target", default=None, metavar="HOST:PORT",
                      help="a running `emoe serve` to measure instead of starting one "
                           "(one policy: the one it runs)")
    sys_.add_argument("--engine-speed", choices=("profile", "served", "timeline"),
                      default="profile",
                      help="the engine speed simulated: as the profile measured it "
                           "(default); 'served': the speed the server's loop ran at during "
                           "each replay, its cycles against the profile's model of them, "
                           "and what a fetch on a miss cost it (GetStats engine_speed, kept by "
                           "a server started with --profile), with the simulation as profiled "
                           "reported beside it; 'timeline': that speed sampled every "
                           f"{SPEED_SAMPLE_S:g} s, each window simulated at its own, with the "
                           "simulations at the one speed and as profiled beside it. The "
                           "speeds are reported either way")
    sys_.add_argument("--step-scatter", default="0", metavar="SIGMA|measured",
                      help="draw each simulated step's time around its model, lognormal of "
                           "mean 1 (every simulation of the run): of this sigma, independently, "
                           "or 'measured': as the server's loop cycles scattered within each "
                           "half-second of the replay, their spread (prefill steps apart) and "
                           "lag-1 correlation (default 0: exactly its model; docs/fidelity.md "
                           "limit 11)")
    sys_.add_argument("--sim-draws", type=int, default=1, metavar="N",
                      help="simulate each policy N times, the step scatter drawn anew each time "
                           "for the same workload, and report every simulated number as the "
                           "median over the draws, each percentile with its range "
                           "(default 1; docs/fidelity.md limits 11 and 13)")
    pol = p.add_argument_group("policies (lists run every combination, as emoe sim)")
    pol.add_argument("--policy", type=Path, default=None,
                     help="base policy file (tasks, SLOs, budgets); --scheduler/--experts "
                          "vary it")
    pol.add_argument("--scheduler", default=None, help="scheduling policies, e.g. fcfs,emoe")
    pol.add_argument("--experts", default=None, help="expert planners, e.g. all,emoe")
    pol.add_argument("-p", "--prediction-interval", type=int, default=None, metavar="P")
    pol.add_argument("--experts-per-layer", type=int, default=None, metavar="L",
                     help="expert slots per layer for planners other than all (default: the "
                          "policy's, else 5)")
    pol.add_argument("--routing-trace", type=Path, default=None,
                     help="recorded routing for the simulated side (docs/routing-trace.md); "
                          "default: with --prompts tasks, the workload's routing recorded "
                          "now (ROUTING in --out-dir); with --prompts random, synthetic "
                          "(hit rates then differ by construction)")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, default=Path("fidelity-out"),
                     help="per-request rows of both sides, policy files, plots, the profile")
    out.add_argument("--json", type=Path, default=None, help="the report as JSON")
    out.add_argument("--no-plots", action="store_true", help="skip the CDF plots")
    out.add_argument("--start-timeout", type=float, default=180.0,
                     help="seconds a started server gets to come up")
    p.set_defaults(func=run)


# -- policies ----------------------------------------------------------------------------------

def _names(text: str | None, default: list[str]) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()] if text else default


def policies(args: argparse.Namespace, model: "ModelSpec") -> dict[str, "PolicyConfig"]:
    """name -> policy, for the model served (each written to a file the server loads)."""
    from emoe.core.policy_file import PolicyConfig, model_shape

    base = PolicyConfig.from_file(args.policy) if args.policy else PolicyConfig()
    base.check_model(model)
    out = {}
    for scheduling in _names(args.scheduler, [base.scheduling]):
        for planner in _names(args.experts, [base.planner]):
            changes: dict = {"scheduling": scheduling, "planner": planner, "model": model.name,
                             "model_shape": model_shape(model)}
            if args.prediction_interval is not None:
                changes["prediction_interval"] = args.prediction_interval
            if planner != "all" and (args.experts_per_layer is not None or (
                    base.experts_per_layer is None and base.expert_budget_bytes is None)):
                changes["experts_per_layer"] = args.experts_per_layer or 5
                changes["expert_budget_bytes"] = None
            policy = dataclasses.replace(base, **changes)
            policy.validate("policy")
            out[f"{scheduling}/{planner}"] = policy
    return out


# -- the two sides ---------------------------------------------------------------------------

@dataclass
class Side:
    """One side's run of one policy: its summary, per-request rows and counters."""

    summary: "Summary"
    rows: "pd.DataFrame"
    bytes_loaded: int | None
    predictor_calls: int | None
    elapsed_s: float
    context: str = ""  # what fitting the workload to the model's context met
    engine_speed: float | None = None  # measured: the server's loop cycles against its profile
    compute_speed: float | None = None  # measured: its engine's compute against the step model
    fetch_cost_s: float | None = None  # measured: per expert fetched on a miss, as served
    speed_timeline: SpeedTimeline | None = None  # measured: engine_speed window by window
    speed_by_kind: dict | None = None  # measured: engine_speed of prefill and decode-only steps
    step_scatter: StepScatter | None = None  # measured: how the cycles scattered within windows
    speed_samples: list | None = None  # measured: the counters those come from (``_SAMPLED``)
    admission: AdmissionCounters | None = None  # what admission did (Eq. 3's deferrals)
    fetched: int = 0  # measured: experts fetched on a miss during the replay
    decode_token_s: float | None = None  # measured: a decode token's cost beyond the profile
    arrival_s: float | None = None  # measured: the loop's work per request accepted


def simulate(policy_file: Path, checkpoint: Path, profile: Path, workload, seed: int,
             rows_path: Path, routing_trace: Path | None = None,
             engine_speed: float | SpeedTimeline = 1.0,
             fetch_cost_s: float | None = None,
             step_scatter: float | StepScatter = 0.0, draw: int = 0) -> Side:
    """One simulated side; ``draw`` redraws the step scatter of the same workload."""
    import pandas as pd

    from emoe.sim.runner import SimConfig
    from emoe.sim.runner import simulate as run_sim

    config = SimConfig(model=str(checkpoint), profile=profile, policy_file=policy_file,
                       seed=seed, routing_trace=routing_trace, engine_speed=engine_speed,
                       fetch_cost_s=fetch_cost_s, step_scatter=step_scatter,
                       scatter_draw=draw)
    outcome = run_sim(config, workload, out=rows_path)
    s = outcome.summary
    return Side(s, pd.read_csv(rows_path), s.system.pcie_bytes,
                s.system.predictor_invocations, s.elapsed_s, outcome.fit.describe(),
                admission=outcome.admission)


async def measure(target: str, requests, fit: str, seed: int, rows_path: Path,
                  expert_bytes: int, prompts=None, token_s: float = 0.0) -> Side:
    """Replay against ``target``; ``prompts`` (task prompts) are sent greedily, else random
    ids with the server's default sampling. ``token_s``: the profile's serving cost of a
    token streamed (``_timeline``)."""
    import pandas as pd

    from emoe.core.metrics import MetricsCollector, SystemCounters
    from emoe.core.workload import ContextFit
    from emoe.rpc.client import EmoeClient
    from emoe.rpc.convert import admission_from_proto
    from emoe.rpc.engine_speed import fetch_cost_s
    from emoe.rpc.replay import GrpcTarget, replay

    async with EmoeClient(target) as client:
        stats = await client.stats()
        before, speed_before = stats.experts, stats.engine_speed
        admitted_before = admission_from_proto(stats.admission)
        fitted = ContextFit(0, fit)
        sender = GrpcTarget(client, temperature=None if prompts is None else 0.0)
        began = time.monotonic()  # the replay's clock starts one server-info call later
        samples = [_speed_sample(0.0, speed_before)]
        sampler = asyncio.create_task(_sample_speed(client, began, samples))
        try:
            with MetricsCollector(rows_path) as metrics:
                elapsed = await replay(requests, sender, metrics, seed=seed, fit=fitted,
                                       prompts=prompts)
        finally:
            sampler.cancel()
        stats = await client.stats()
        after, speed_after = stats.experts, stats.engine_speed
        admission = admission_from_proto(stats.admission).since(admitted_before)
        samples.append(_speed_sample(time.monotonic() - began, speed_after))
        summary = metrics.summary(SystemCounters(elapsed_s=elapsed), name="measured")
    loads = after.loads - before.loads
    def delta(name: str) -> float:
        return getattr(speed_after, name) - getattr(speed_before, name)

    def ratio(measured: str, modelled: str) -> float | None:
        return delta(measured) / delta(modelled) if delta(modelled) > 0 else None

    compute = ratio("compute_s", "profiled_s")
    decode_model = delta("cycle_profiled_s") - delta("prefill_cycle_profiled_s")
    by_kind = {"prefill": ratio("prefill_cycle_s", "prefill_cycle_profiled_s"),
               "decode": ((delta("cycle_s") - delta("prefill_cycle_s")) / decode_model
                          if decode_model > 0 else None)}
    fetched = int(delta("fetched"))
    fetch = None if compute is None else fetch_cost_s(
        compute, fetched, delta("fetch_compute_s"), delta("fetch_profiled_s"))
    timeline, scatter, decode_token_s, arrival_s = _timeline(
        samples, token_s, simulated_fetch_s(None, fetch),
        tuple(speed_after.prefill_segment_tokens))
    return Side(summary, pd.read_csv(rows_path), loads * expert_bytes,
                after.predictor_calls - before.predictor_calls, elapsed, fitted.describe(),
                ratio("cycle_s", "cycle_profiled_s"), compute, fetch, timeline, by_kind, scatter,
                samples, admission, fetched, decode_token_s, arrival_s)



_SAMPLED = ("cycle_s", "cycle_profiled_s", "prefill_cycle_s", "prefill_cycle_profiled_s",
            "cycle_log_sum", "cycle_log_sq_sum", "cycles", "cycle_lag_pairs", "cycle_lag_sum",
            "prefill_cycle_log_sum", "prefill_cycle_log_sq_sum", "prefill_cycles",
            "prefill_cycle_lag_pairs", "prefill_cycle_lag_sum", "decode_streamed",
            "decode_streamed_sq", "decode_cycle_streamed", "decode_model_streamed", "arrivals",
            "arrival_cycle_s", "arrival_cycle_profiled_s", "prefill_arrivals",
            "fetch_cycle_s", "fetch_cycle_profiled_s", "fetch_cycle_fetched",
            "fetch_cycle_arrivals", "prefill_fetch_cycle_s", "prefill_fetch_cycle_profiled_s",
            "prefill_fetch_cycle_fetched", "prefill_fetch_cycle_arrivals")
"""GetStats ``engine_speed`` counters sampled during a replay: the cycles' time against their
model, the sums ``StepScatter.from_samples`` takes (of all cycles, then of those with a
prompt chunk), the decode-only cycles' sums on their tokens streamed, the requests the
loop accepted and the cycles it accepted them in, then the cycles of steps that fetched on a
miss (of those with a prompt chunk apart)."""


_SEGMENTS = ("prefill_segment_cycle_s", "prefill_segment_cycle_profiled_s")
"""GetStats ``engine_speed`` sums of the prompt steps' cycles by segment of the profile's table,
sampled too (a list each, after ``_SAMPLED``)."""


def _speed_sample(t: float, speed) -> tuple:
    """The loop's cycle counters (GetStats ``engine_speed``) at ``t``."""
    return ((t,) + tuple(getattr(speed, name) for name in _SAMPLED)
            + tuple(list(getattr(speed, name)) for name in _SEGMENTS))


async def _sample_speed(client, began: float, samples: list) -> None:
    """Append the cycle counters, at seconds since ``began``, every ``SPEED_SAMPLE_S``."""
    while True:
        await asyncio.sleep(SPEED_SAMPLE_S)
        samples.append(_speed_sample(time.monotonic() - began,
                                     (await client.stats()).engine_speed))


def _timeline(samples: list, token_s: float, fetch_s: float | None,
              segment_tokens: tuple[int, ...] = ()
              ) -> tuple[SpeedTimeline | None, StepScatter | None, float | None, float | None]:
    """The loop's speed window by window with what a fetch on a miss cost it (``fetch_s``
    where its cycles cannot tell) and how its prompt steps ran by their tokens against the
    table's points ``segment_tokens``, how its cycles scattered within the windows, what a
    token streamed in a decode-only step cost beyond the profile (no less than the profile's
    ``token_s`` less) and the loop's work per request accepted, the last two reported and not
    simulated (docs/fidelity.md, limit 16 and "The loop's work per request accepted")."""
    from emoe.sim.speed import SpeedTimeline, StepScatter

    times, cycles, modelled, prefill_cycles, prefill_modelled, *sums = zip(*samples)
    arrivals, fetches = sums[14:18], sums[18:26]
    segments = (segment_tokens, *sums[26:28]) if len(sums) >= 28 else None
    fetch_modelled = fetches[1]
    if modelled[-1] <= modelled[0] and (fetch_s is None or fetch_modelled[-1] <= fetch_modelled[0]):
        return None, None, None, None  # a server without --profile: no cycles against a model
    timeline = SpeedTimeline.from_samples(times, cycles, modelled, prefill_cycles,
                                          prefill_modelled, fetches=fetches,
                                          fetch_fallback_s=fetch_s, prefill_segments=segments)
    if modelled[-1] <= modelled[0]:
        return timeline, None, None, None  # every step fetched: no scatter nor costs measured
    fitted = SpeedTimeline.from_samples(times, cycles, modelled, prefill_cycles,
                                        prefill_modelled, decode_lines=sums[10:14],
                                        token_floor_s=token_s, arrivals=arrivals,
                                        prefill_segments=segments)
    return (timeline,
            StepScatter.from_samples(*sums[:5], cycles, modelled,
                                     prefill=(*sums[5:10], prefill_cycles, prefill_modelled)),
            fitted.decode_token_s, fitted.arrival_s)


def _step_scatter(value: str) -> float | str:
    """``--step-scatter``: a sigma in [0, 1) or 'measured'."""
    from emoe.core.errors import ConfigError

    if value == "measured":
        return value
    try:
        sigma = float(value)
    except ValueError:
        sigma = math.nan
    if not 0.0 <= sigma < 1.0:
        raise ConfigError(f"--step-scatter: a sigma in [0, 1) or 'measured', got {value!r}")
    return sigma


# -- comparison ------------------------------------------------------------------------------

def _values(rows, column: str):
    import numpy as np

    values = rows[column].to_numpy(dtype=float)
    return values[np.isfinite(values)]


def _rel(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or not math.isfinite(sim) or not math.isfinite(real) \
            or real == 0:
        return None
    return (sim - real) / real


BOOTSTRAP_RESAMPLES = 1000


def _bootstrap(values, statistic, seed: int = 0):
    """``statistic`` (of an array of resamples, one per row: the statistic per row) over
    ``BOOTSTRAP_RESAMPLES`` resamples of ``values`` with replacement: its 5th and 95th
    percentiles, the measured value's 90% interval."""
    import numpy as np

    rng = np.random.default_rng(seed)
    resampled = values[rng.integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))]
    return np.percentile(statistic(resampled), [5, 95], axis=-1)


def compare(sims: list[Side], real: Side) -> dict:
    """Per metric: p50/p90/p99 simulated and measured, relative errors, KS statistic; the rest.
    Several simulated draws (``--sim-draws``) give each number as its median over the draws,
    with each percentile's range over them (``sim_range``) and its value in each draw
    (``sim_draws``, SLO attainment's too). Each measured percentile and the
    measured SLO attainment come with their 90% bootstrap interval over the measured requests
    (``real_ci90``): how much of an error the measurement itself cannot tell from none.
    ``sim_cdf_at_real`` says where each measured percentile lies in the simulated distribution
    (the share of simulated requests at or below it): where a percentile sits on a flat stretch
    of the distribution (a few requests held back for seconds), a few requests more or less move
    its value by tens of percent while this moves by as many points."""
    import numpy as np
    from scipy.stats import ks_2samp

    def median(values: list):
        """None when no draw has one; a count stays a whole number."""
        values = [v for v in values if v is not None]
        if not values:
            return None
        middle = float(np.median(values))
        return round(middle) if all(isinstance(v, int) for v in values) else middle

    report: dict = {"metrics": {}, "sim_draws": len(sims)}
    for key, column, _ in METRICS:
        b = _values(real.rows, column)
        draws = [_values(sim.rows, column) for sim in sims]
        entry: dict = {"sim": {}, "real": {}, "rel_error": {}, "real_ci90": {},
                       "sim_cdf_at_real": {}, "count": {"sim": len(draws[0]), "real": len(b)}}
        ranges: dict = {}
        per_draw: dict = {}
        intervals = (_bootstrap(b, lambda x: np.percentile(x, [p for _, p in QUANTILES],
                                                           axis=-1)) if len(b) else None)
        for i, (q, pct) in enumerate(QUANTILES):
            at = [float(np.percentile(a, pct)) for a in draws if len(a)]
            s = median(at)
            r = float(np.percentile(b, pct)) if len(b) else None
            entry["sim"][q], entry["real"][q], entry["rel_error"][q] = s, r, _rel(s, r)
            entry["real_ci90"][q] = (None if intervals is None else
                                     [float(intervals[0][i]), float(intervals[1][i])])
            ranges[q] = [min(at), max(at)] if at else None
            per_draw[q] = at
            entry["sim_cdf_at_real"][q] = (None if r is None else median(
                [float(np.mean(a <= r)) for a in draws if len(a)]))
        if len(sims) > 1:
            entry["sim_range"] = ranges
            entry["sim_draws"] = per_draw
        entry["ks"] = median([float(ks_2samp(a, b).statistic) for a in draws
                              if len(a) and len(b)])
        report["metrics"][key] = entry
    r = real.summary

    def pair(values: list, b, *, points: bool = False) -> dict:
        a = median(values)
        out = {"sim": a, "real": b}
        if points:
            out["diff_points"] = None if a is None or b is None else 100 * (a - b)
        else:
            out["rel_error"] = _rel(a, b)
        return out

    def each(read) -> list:
        return [read(sim) for sim in sims]

    first = sims[0].summary
    report["requests"] = {"sim": first.requests, "real": r.requests}
    report["finished"] = {"sim": first.finished, "real": r.finished}
    report["rejected"] = {"sim": first.rejected, "real": r.rejected}
    report["slo_attainment"] = pair(each(lambda s: s.summary.slo_attainment), r.slo_attainment,
                                    points=True)
    if len(sims) > 1:
        report["slo_attainment"]["sim_draws"] = each(lambda s: s.summary.slo_attainment)
    met = real.rows["slo_met"].to_numpy(dtype=bool) if "slo_met" in real.rows else None
    if met is not None and len(met) and r.slo_attainment is not None:
        low, high = _bootstrap(met.astype(float), lambda x: x.mean(axis=-1))
        shift = r.slo_attainment - float(met.mean())  # the summary's own denominator
        report["slo_attainment"]["real_ci90"] = [float(low) + shift, float(high) + shift]
    report["goodput_rps"] = pair(each(lambda s: s.summary.goodput_rps), r.goodput_rps)
    report["hit_rate"] = pair(each(lambda s: s.summary.hit_rate), r.hit_rate, points=True)
    report["bytes_loaded"] = pair(each(lambda s: s.bytes_loaded), real.bytes_loaded)
    report["predictor_calls"] = pair(each(lambda s: s.predictor_calls), real.predictor_calls)
    report["elapsed_s"] = pair(each(lambda s: s.elapsed_s), real.elapsed_s)
    if real.admission is not None and all(s.admission is not None for s in sims):
        report["admission"] = {
            "deferred": pair(each(lambda s: s.admission.deferred), real.admission.deferred),
            "slowdown": pair(each(lambda s: s.admission.slowdown), real.admission.slowdown)}
    return report


def ranking(reports: dict[str, dict], side: str) -> list[str]:
    """Policies by goodput, then SLO attainment, best first (ties: by name)."""
    def key(name: str):
        r = reports[name]
        return (-(r["goodput_rps"][side] or 0.0), -(r["slo_attainment"][side] or 0.0), name)
    return sorted(reports, key=key)


def _order(reports: dict[str, dict], side: str, a: str, b: str) -> int:
    """+1 when ``a`` has the higher goodput on ``side``, -1 when ``b`` has, 0 when they tie:
    within one SLO-meeting request over the run (the resolution of a goodput)."""
    ra, rb = reports[a], reports[b]
    ga, gb = ra["goodput_rps"][side] or 0.0, rb["goodput_rps"][side] or 0.0
    elapsed = max(ra["elapsed_s"][side] or 0.0, rb["elapsed_s"][side] or 0.0)
    if elapsed <= 0 or abs(ga - gb) * elapsed < 1.0:
        return 0
    return 1 if ga > gb else -1


def rank_pairs(reports: dict[str, dict]) -> dict:
    """Every pair of policies: ordered alike by both sides, tied on one side, or opposite.
    The rankings agree when no pair is ordered oppositely."""
    names = sorted(reports)
    out = {"same": [], "tied": [], "opposite": []}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            s, r = _order(reports, "sim", a, b), _order(reports, "real", a, b)
            kind = "tied" if 0 in (s, r) and s != r else ("same" if s == r else "opposite")
            out[kind].append(f"{a} vs {b}")
    return out


def resolved_pairs(met: dict) -> list[str]:
    """The pairs of policies (``a vs b``, as ``rank_pairs``) whose measured SLO attainment
    differs by more than the measurement resolves. ``met``: per policy, a boolean Series by
    request id. Over the requests both replays ran, b met their SLO under the first policy
    only and c under the second only; the pair is resolved when |b - c| > 2 sqrt(b + c), a
    sign test at ~95%. The replays share their requests and arrivals, so their goodputs
    order as their SLO-meeting counts do but for a few percent of elapsed time."""
    names = sorted(met)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = met[a].index.intersection(met[b].index)
            x, y = met[a].loc[both].astype(bool), met[b].loc[both].astype(bool)
            only_a, only_b = int((x & ~y).sum()), int((y & ~x).sum())
            if abs(only_a - only_b) > 2 * math.sqrt(only_a + only_b):
                out.append(f"{a} vs {b}")
    return out


def rankings(reports: dict[str, dict], measured_met: dict) -> dict:
    """A report's ranking keys: each side's ranking by goodput, every pair ordered alike, tied
    or opposite and the pairs the measurement resolves (``resolved_pairs`` of ``measured_met``),
    and whether the rankings agree, on every pair and on those the measurement resolves."""
    pairs = rank_pairs(reports)
    pairs["resolved"] = resolved_pairs(measured_met)
    return {"ranking": {"sim": ranking(reports, "sim"), "real": ranking(reports, "real"),
                        "pairs": pairs},
            "rank_agreement": not pairs["opposite"],
            "rank_agreement_resolved": not any(p in pairs["resolved"] for p in pairs["opposite"])}


def rows_file(policy: str, draw: int | None = None) -> str:
    """The name of a policy's per-request rows in its trace's folder: the measured ones
    (``draw`` None) or those of its simulated draw ``draw``."""
    stem = policy.replace("/", "-")
    if draw is None:
        return f"{stem}-real.csv"
    return f"{stem}-sim-draw{draw}.csv" if draw else f"{stem}-sim.csv"


def _count_pairs(n: int) -> int:
    return n * (n - 1) // 2


# -- output ----------------------------------------------------------------------------------

def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def format_report(name: str, report: dict) -> str:
    from emoe.core.metrics import format_table

    rows = []
    for key, _, label in METRICS:
        m = report["metrics"][key]
        scale = 1e3 if key == "tpot" else 1.0
        cells = [label]
        for q, _ in QUANTILES:
            cells.append(f"{_fmt(m['sim'][q], scale)} / {_fmt(m['real'][q], scale)} "
                         f"({_pct(m['rel_error'][q])})")
        cells.append(_fmt(m["ks"], digits=2))
        cells.append("/".join("-" if m["sim_cdf_at_real"][q] is None else
                              f"{100 * m['sim_cdf_at_real'][q]:.0f}" for q, _ in QUANTILES))
        rows.append(cells)
    slo, hit = report["slo_attainment"], report["hit_rate"]
    lines = [
        f"policy {name}: {report['requests']['real']} requests, {report['finished']['real']} "
        f"finished and {report['rejected']['real']} rejected measured "
        f"({report['finished']['sim']} and {report['rejected']['sim']} simulated)",
        format_table(["metric", "p50 sim / real (err)", "p90 sim / real (err)",
                      "p99 sim / real (err)", "KS", "measured at sim %"], rows),
        f"SLO attainment sim {_fmt(slo['sim'], 100, 1)}% real {_fmt(slo['real'], 100, 1)}% "
        f"({_fmt(slo['diff_points'], 1, 1)} points); goodput sim "
        f"{_fmt(report['goodput_rps']['sim'])} real {_fmt(report['goodput_rps']['real'])} req/s",
        f"experts: hit rate sim {_fmt(hit['sim'], 100, 1)}% real {_fmt(hit['real'], 100, 1)}%; "
        f"bytes loaded sim {report['bytes_loaded']['sim']} real "
        f"{report['bytes_loaded']['real']}; predictor calls sim "
        f"{report['predictor_calls']['sim']} real {report['predictor_calls']['real']}",
    ]
    if report.get("sim_draws", 1) > 1:
        spans = ", ".join(
            f"{label} {q} {_fmt(span[0])}-{_fmt(span[1])}"
            for key, label in (("ttft", "TTFT"), ("e2e", "E2E"), ("queueing", "queueing"))
            for q in ("p50", "p90")
            if (span := report["metrics"][key]["sim_range"][q]) is not None)
        lines.append(f"simulated: the median of {report['sim_draws']} draws of the step "
                     f"scatter; over the draws (s): {spans}")
    admission = report.get("admission")
    if admission is not None and (admission["slowdown"]["sim"] is not None
                                  or admission["slowdown"]["real"] is not None):
        deferred, slowdown = admission["deferred"], admission["slowdown"]
        lines.append(
            f"admission: Eq. 3 held back a waiting request {deferred['sim']} times simulated, "
            f"{deferred['real']} measured (summed over steps); it costed the steps at "
            f"x{_fmt(slowdown['sim'])} their model simulated, x{_fmt(slowdown['real'])} "
            f"measured (time-weighted)")
    speed = report.get("engine_speed")
    if speed is None:
        return "\n".join(lines)
    if "as_served" in report:
        lines.append("simulated window by window at the server's loop speed as sampled")
    elif "as_profiled" in report:
        lines.append(f"simulated at x{speed['simulated']:.2f} the profile's speed")
    for label, beside in ((f"at x{speed['served'] or 1:.2f} throughout", report.get("as_served")),
                          ("at x1.00", report.get("as_profiled"))):
        if beside is not None:
            errors = ", ".join(
                f"{key.upper()} {q} {_pct(beside['metrics'][key]['rel_error'][q])}"
                for key in ("ttft", "e2e") for q in ("p50", "p90"))
            lines.append(f"  {label}: {errors}, SLO attainment "
                         f"{_fmt(beside['slo_attainment']['diff_points'], 1, 1)} points")
    return "\n".join(lines)


def write_cdfs(name: str, sim: Side, real: Side, directory: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, column, label) in zip(axes, METRICS):
        scale = 1e3 if key == "tpot" else 1.0
        for side, rows, style in (("simulated", sim.rows, "--"), ("measured", real.rows, "-")):
            values = np.sort(_values(rows, column)) * scale
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), style, label=side)
        ax.set_title(label)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SIMULATED vs MEASURED: {name}", fontsize=10)
    fig.tight_layout()
    path = directory / f"cdf-{name.replace('/', '-')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from emoe.core.errors import ConfigError
    from emoe.core.model_config import model_spec_from
    from emoe.core.paths import resolve_path
    from emoe.core.profile import load_profile
    from emoe.core.workload import read_trace
    from emoe.core.workload.default_trace import DEFAULT_TRACE
    from emoe.rpc.local import REFERENCE_CHECKPOINT
    from emoe.rpc.serve_process import ServeProcess, serve_args
    from emoe.sim.runner import SimConfig, Workload

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    if args.rate_scale <= 0:
        raise ConfigError(f"--rate-scale: must be > 0, got {args.rate_scale}")
    step_scatter = _step_scatter(args.step_scatter)
    if args.sim_draws < 1:
        raise ConfigError(f"--sim-draws: must be >= 1, got {args.sim_draws}")
    if args.sim_draws > 1 and step_scatter == 0:
        raise ConfigError("--sim-draws: draws differ only in the step scatter; give "
                          "--step-scatter SIGMA or measured")
    load_before = os.getloadavg()
    print(f"emoe fidelity: load average before {_load(load_before)} (other work on this "
          f"machine slows the measured side)", flush=True)
    checkpoint = Path(resolve_path(args.checkpoint or REFERENCE_CHECKPOINT)).resolve()
    model = model_spec_from(checkpoint)
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    profile_path = args.profile or await asyncio.to_thread(  # it serves in its own loop
        _measure_profile, checkpoint, args.threads, out_dir / "profile.json")
    profile = load_profile(profile_path)
    profile.check_model(model)
    if profile.engine is None or profile.step_table is None or profile.serving is None:
        raise ConfigError(f"{profile_path}: no engine, step_table or serving section: profile "
                          "the served engine with `emoe profile` (without --no-serving)")
    engine = profile.engine
    if args.threads is not None:
        profile.check_threads(args.threads, "--threads")
    trace = args.trace or DEFAULT_TRACE
    chosen = policies(args, model)
    if args.target and len(chosen) > 1:
        raise ConfigError("--target: a running server has one policy; give one --scheduler "
                          "and one --experts (the ones it runs)")
    if args.target:
        await _check_target(args.target, model.name, next(iter(chosen.values())))
    workload = Workload(trace=trace, rate_scale=args.rate_scale, fit=args.fit, limit=args.limit)
    print(f"model {model.name} ({checkpoint}); profile {profile_path} ({engine.threads} "
          f"thread(s), {engine.max_batch_size} KV slots of {engine.max_seq_len} tokens); "
          f"workload: {workload.describe()}, seed {args.seed}, --fit {args.fit}", flush=True)
    prompts, routing_trace = None, args.routing_trace
    if args.prompts == "tasks":
        from emoe.engine.reference.prompts import TaskPrompts

        prompts = TaskPrompts.for_checkpoint(checkpoint, args.seed)
        if routing_trace is None:
            routing_trace = _record_routing(checkpoint, workload, next(iter(chosen.values())),
                                            engine, args.seed, out_dir)
    print(f"prompts: {_PROMPTS[args.prompts]}; simulated routing: "
          f"{routing_trace or 'synthetic (hit rates differ by construction)'}", flush=True)

    served_model, hardware = SimConfig(model=str(checkpoint), profile=profile_path).specs()
    fetch_model_s = (hardware.pcie_latency_s
                     + served_model.expert_bytes / hardware.pcie_bandwidth_bytes_per_s)
    reports: dict[str, dict] = {}
    profiled: dict[str, dict] = {}  # the same, simulated at the profile's speed
    one_speed: dict[str, dict] = {}  # with --engine-speed timeline: at the replay's one speed
    plots: list[str] = []
    measured_met: dict = {}  # per policy, which requests met their SLO as measured
    for name, policy in chosen.items():
        stem = name.replace("/", "-")
        policy_file = out_dir / f"policy-{stem}.json"
        policy.to_file(policy_file)
        requests = read_trace(trace, tasks=policy.tasks, seed=args.seed,
                              rate_scale=args.rate_scale)
        if args.limit is not None:
            requests = itertools.islice(requests, args.limit)
        rows = out_dir / rows_file(name)
        expert_bytes = profile.memory.get("expert_bytes", model.expert_bytes)
        if args.target:
            print(f"{name}: measuring against {args.target} ...", flush=True)
            real = await measure(args.target, requests, args.fit, args.seed, rows,
                                 expert_bytes, prompts, profile.serving.token_s)
        else:
            server_args = serve_args(checkpoint, engine.threads, engine.max_batch_size,
                                     engine.max_seq_len, policy=policy_file, profile=profile_path)
            print(f"{name}: measuring against emoe serve {' '.join(server_args)} ...",
                  flush=True)
            async with ServeProcess(server_args, timeout_s=args.start_timeout) as server:
                real = await measure(server.target, requests, args.fit, args.seed, rows,
                                     expert_bytes, prompts, profile.serving.token_s)
        if args.engine_speed != "profile" and (real.engine_speed is None
                                                or real.speed_timeline is None):
            raise ConfigError(f"--engine-speed {args.engine_speed}: the server reported no "
                              f"steps against a profile (is it started with --profile "
                              f"{profile_path}?)")
        speed, simulated, fetch_cost = _as_served(real, args.engine_speed, fetch_model_s)
        scatter = step_scatter
        if scatter == "measured":
            if real.step_scatter is None:
                raise ConfigError(f"--step-scatter measured: the server reported no cycles "
                                  f"against a profile (is it started with --profile "
                                  f"{profile_path}?)")
            scatter = real.step_scatter
        sims = [simulate(policy_file, checkpoint, profile_path, workload, args.seed,
                         out_dir / rows_file(name, draw),
                         routing_trace, simulated, fetch_cost, scatter, draw)
                for draw in range(args.sim_draws)]
        sim = sims[0]
        reports[name] = compare(sims, real)
        reports[name]["engine_speed"] = speed
        measured_met[name] = real.rows.set_index("id")["slo_met"]
        if args.engine_speed != "profile":
            as_profiled = simulate(policy_file, checkpoint, profile_path, workload, args.seed,
                                   out_dir / f"{stem}-sim-profile.csv", routing_trace,
                                   step_scatter=scatter)
            profiled[name] = compare([as_profiled], real)
            reports[name]["as_profiled"] = profiled[name]
        if args.engine_speed == "timeline":
            as_served = simulate(policy_file, checkpoint, profile_path, workload, args.seed,
                                 out_dir / f"{stem}-sim-served.csv", routing_trace,
                                 real.engine_speed, fetch_cost, scatter)
            one_speed[name] = compare([as_served], real)
            reports[name]["as_served"] = one_speed[name]
        if len(reports) == 1:
            print(f"simulated {sim.context}\nmeasured {real.context}")
        print(format_report(name, reports[name]), flush=True)
        print(flush=True)
        if not args.no_plots:
            plots.append(str(write_cdfs(name, sim, real, out_dir)))

    ranked = rankings(reports, measured_met)
    by_sim, by_real, pairs = (ranked["ranking"][k] for k in ("sim", "real", "pairs"))
    agree = ranked["rank_agreement"]
    resolved_opposite = [p for p in pairs["opposite"] if p in pairs["resolved"]]
    load_after = os.getloadavg()
    if len(reports) > 1:
        print(f"ranking by goodput: simulated {' > '.join(by_sim)}; measured "
              f"{' > '.join(by_real)}: {'they agree' if agree else 'they DISAGREE'} "
              f"({len(pairs['same'])} pairs ordered alike, {len(pairs['opposite'])} "
              f"oppositely{': ' + ', '.join(pairs['opposite']) if pairs['opposite'] else ''}, "
              f"{len(pairs['tied'])} tied on one side within one request); the measurement "
              f"resolves {len(pairs['resolved'])} of the {_count_pairs(len(reports))} pairs "
              f"(a sign test over the requests, ~95%), {len(resolved_opposite)} of those "
              f"ordered oppositely" + (f": {', '.join(resolved_opposite)}"
                                       if resolved_opposite else ""))
        for label, beside in (("at the replay's one speed", one_speed),
                              ("as profiled (x1.00)", profiled)):
            if len(beside) == len(reports):
                opposite = rank_pairs(beside)["opposite"]
                print(f"simulated {label}: {len(opposite)} pairs ordered oppositely"
                      + (f": {', '.join(opposite)}" if opposite else ""))
    print(f"load average after {_load(load_after)} (before {_load(load_before)})")
    if plots:
        print("CDF plots: " + ", ".join(plots))
    if args.json is not None:
        document = {
            "checkpoint": str(checkpoint), "model": model.name, "profile": str(profile_path),
            "trace": str(trace), "limit": args.limit, "rate_scale": args.rate_scale,
            "seed": args.seed, "fit": args.fit, "target": args.target,
            "prompts": args.prompts,
            "routing": str(routing_trace) if routing_trace else "synthetic",
            "load_average": {"before": list(load_before), "after": list(load_after)},
            "engine_speed": args.engine_speed, "step_scatter": step_scatter,
            "sim_draws": args.sim_draws,
            "policies": reports, **ranked,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"report: {args.json}")
    return 0


_PROMPTS = {"tasks": "task text of each request's task (the reference model's tasks), greedy",
            "random": "random token ids, the server's default sampling"}
ROUTING = "routing.parquet"


def _record_routing(checkpoint: Path, workload, policy, engine, seed: int,
                    out_dir: Path) -> Path:
    """The routing of the workload's task prompts on this engine, all experts resident
    (``emoe record-routing --trace``), into ``out_dir``; reused while the workload, seed and
    model are the same."""
    from emoe.core.workload import ContextFit

    path = out_dir / ROUTING
    key = {"checkpoint": str(checkpoint), "workload": workload.describe(), "fit": workload.fit,
           "seed": seed, "context": engine.max_seq_len, "tasks": sorted(policy.tasks)}
    stamp = path.with_suffix(".json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == key:
        print(f"routing of the task prompts: {path} (recorded earlier for this workload)")
        return path
    import torch

    from emoe.engine.routing import record_workload

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(engine.threads)
    try:
        fit = ContextFit(engine.max_seq_len, workload.fit)
        count = record_workload(checkpoint, fit(workload.requests(seed, tasks=policy.tasks)),
                                path, seed=seed, max_batch_size=engine.max_batch_size,
                                max_seq_len=engine.max_seq_len, device=engine.device)
    finally:
        torch.set_num_threads(threads)
    stamp.write_text(json.dumps(key) + "\n")
    print(f"recorded the routing of {count} task prompts on the engine ({engine.threads} "
          f"thread(s), all experts, greedy) into {path} in {time.perf_counter() - started:.0f} s",
          flush=True)
    return path


def simulated_fetch_s(timeline: SpeedTimeline | None, compute_s: float | None) -> float | None:
    """What a simulation window by window takes for an expert fetched on a miss: the cost the
    loop's cycles gave (``timeline.fetch_s``, where fitted), else the compute's (``compute_s``,
    no less than 0; None: the profile's)."""
    if timeline is not None and timeline.fetch_fitted:
        return timeline.fetch_s
    return None if compute_s is None else max(0.0, compute_s)


def _as_served(real: Side, mode: str, fetch_model_s: float
               ) -> tuple[dict, float | SpeedTimeline, float | None]:
    """What the server measured during the replay (its loop's speed against the profile's
    model of a cycle, overall and window by window; its engine's compute against the step
    model; what a fetch on a miss cost), and what the simulation takes from it: nothing
    (``mode`` profile), the loop's one speed and the fetch cost (served), or its speed window
    by window and the fetch cost its cycles gave, where they could (timeline)."""
    speed: dict = {"served": real.engine_speed, "compute": real.compute_speed,
                   "simulated": 1.0}
    simulated: float | SpeedTimeline = 1.0
    if real.engine_speed is not None:
        if mode != "profile":
            speed["simulated"] = simulated = real.engine_speed
        compute = "" if real.compute_speed is None else (
            f"; its engine's compute x{real.compute_speed:.2f} the step model")
        speed["by_kind"] = by_kind = real.speed_by_kind or {}
        kinds = ", ".join(f"{kind} steps' x{value:.2f}" for kind, value in by_kind.items()
                          if value is not None)
        print(f"speed during the replay: the server's loop cycles took "
              f"x{real.engine_speed:.2f} the profile's model of them"
              f"{f' ({kinds})' if kinds else ''}{compute}", flush=True)
    timeline = real.speed_timeline
    if timeline is not None:
        speed["timeline"] = {"sample_s": SPEED_SAMPLE_S, "starts": list(timeline.starts),
                             "speeds": list(timeline.speeds),
                             "prefill_speeds": list(timeline.prefill_speeds or timeline.speeds),
                             "arrival_s": timeline.arrival_s, "fetch_s": timeline.fetch_s}
        speed["samples"] = {"columns": ["t", *_SAMPLED, *_SEGMENTS], "rows": real.speed_samples}
        shape = timeline.prefill_shape
        if shape is not None:
            speed["prefill_shape"] = {"tokens": list(shape.tokens), "factors": list(shape.factors)}
        print(f"its speed sampled every {SPEED_SAMPLE_S:g} s: {timeline.describe()}",
              flush=True)
        if mode == "timeline":
            simulated = timeline
    if real.decode_token_s is not None:
        speed["decode_token_s"] = real.decode_token_s
        print(f"a token streamed in a decode-only step cost {real.decode_token_s * 1e6:+.0f} us "
              f"beyond the profile's, as the cycles grew with their tokens within the windows "
              f"(not simulated)", flush=True)
    if real.arrival_s is not None:
        speed["arrival_s"] = real.arrival_s
        print(f"the loop's work per request accepted {real.arrival_s * 1e6:.0f} us, as the "
              f"cycles in which it accepted requests ran beyond the window's others (not "
              f"simulated)", flush=True)
    scatter = real.step_scatter
    if scatter is not None:
        speed["scatter"] = dataclasses.asdict(scatter)
        print(f"its cycles scattered around their model within each window: "
              f"{scatter.describe()}", flush=True)
    print("simulated: each window at its own speed" if mode == "timeline"
          else f"simulated at x{simulated:.2f}", flush=True)
    fetch_cost = None
    cycles_fetch = (timeline.fetch_s if timeline is not None and timeline.fetch_fitted
                    else None)
    if real.fetch_cost_s is not None:
        if mode == "timeline":
            fetch_cost = simulated_fetch_s(timeline, real.fetch_cost_s)
        elif mode != "profile":
            fetch_cost = max(0.0, real.fetch_cost_s)
        fetch_simulated = fetch_model_s if fetch_cost is None else fetch_cost
        speed["fetch_cost_s"] = {"served": real.fetch_cost_s, "cycles": cycles_fetch,
                                 "profile": fetch_model_s, "simulated": fetch_simulated}
        in_cycles = ("" if cycles_fetch is None else
                     f", {cycles_fetch * 1e6:.0f} us in its loop's cycles (beyond their model "
                     f"at the speed of the window's decode-only cycles without a fetch)")
        print(f"an expert fetched on a miss cost {real.fetch_cost_s * 1e6:.0f} us as served "
              f"(its steps' compute beyond the step model at its compute speed){in_cycles}; "
              f"the profile's: {fetch_model_s * 1e6:.0f} us; simulated: "
              f"{fetch_simulated * 1e6:.0f} us", flush=True)
    elif real.fetched > 0:
        speed["fetch_cost_s"] = {"served": None, "cycles": None, "profile": fetch_model_s,
                                 "simulated": fetch_model_s}
        print(f"{real.fetched} experts fetched on a miss, but every step fetched one: with no "
              f"step without a fetch to give the engine's compute speed, a fetch's cost as "
              f"served is unknown; simulated at the profile's {fetch_model_s * 1e6:.0f} us",
              flush=True)
    return speed, simulated, fetch_cost


def _load(values) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _measure_profile(checkpoint: Path, threads: int | None, path: Path) -> Path:
    """No profile given: measure one now, as ``emoe profile`` would."""
    import torch

    from emoe.core.profile import write_profile
    from emoe.engine.checkpoint import load_model
    from emoe.engine.profile import profile_model
    from emoe.rpc.serving_profile import measure_serving

    if threads:
        torch.set_num_threads(threads)
    print(f"no --profile: measuring one ({checkpoint.name}, {torch.get_num_threads()} "
          f"thread(s)) into {path} ...", flush=True)
    profile = profile_model(load_model(checkpoint), checkpoint.name)
    serving, how = measure_serving(checkpoint, profile)
    write_profile(dataclasses.replace(profile, serving=serving,
                                      provenance=f"{profile.provenance}; serving: {how}"), path)
    return path


async def _check_target(target: str, model_name: str, policy) -> None:
    """A running server must serve the model and the policy compared, else the comparison
    means nothing; it must also answer within seconds."""
    from emoe.core.errors import ConfigError
    from emoe.rpc.client import EmoeClient

    async with EmoeClient(target) as client:
        try:
            await client.wait_serving(timeout=5.0)
            info = await client.server_info(timeout=5.0)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - any failure: not up
            raise ConfigError(f"--target {target}: no emoe serve answering there within 5 s "
                              f"({type(exc).__name__}: {exc})") from None
    served = info.policy_in_force
    if info.model.name != model_name:
        raise ConfigError(f"--target {target}: serves model {info.model.name!r}, the "
                          f"simulation models {model_name!r}")
    if (served.scheduling, served.planner) != (policy.scheduling, policy.planner):
        raise ConfigError(f"--target {target}: runs {served.scheduling}/{served.planner}, the "
                          f"simulation {policy.scheduling}/{policy.planner}; give the same "
                          "--scheduler/--experts (or --policy) as the server")
