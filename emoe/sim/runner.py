"""One simulated run, from configuration to summary: build the scheduler, backend and world,
stream the workload through them and collect the metrics."""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emoe.core.budget import ExpertBudget, size_label
from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.metrics import MetricsCollector, Summary, SystemCounters
from emoe.core.metrics.admission import AdmissionCounters
from emoe.core.paths import resolve_path
from emoe.core.policy_file import PolicyConfig, model_shape
from emoe.core.profile import EngineProfile, load_profile
from emoe.core.request import Request
from emoe.core.scheduler import Scheduler
from emoe.core.serving import EngineLimits, serving_scheduler_policy
from emoe.core.specs import HardwareSpec, ModelSpec, get_hardware, get_model, hardware_for
from emoe.core.tasks import TaskProfile
from emoe.core.warm_start import warm_policy, warm_predictor
from emoe.core.workload import (DEFAULT_TRACE, ContextFit, TaskMix, read_trace,
                                synthetic_requests)
from emoe.sim.backend import SimBackend
from emoe.sim.client import ClientView
from emoe.sim.routing import RoutingSource, SyntheticRouting
from emoe.sim.speed import SpeedTimeline, StepScatter
from emoe.sim.world import World

GIB = 1024**3
DEFAULT_EXPERTS_PER_LAYER = 5
"""5 of Mixtral-8x7B's 8 experts per layer (56.4 GB) beside 3.2 GB of other weights leave
26 GB of an 80 GiB H100 for the KV cache; the paper reports 98.2-98.8% accuracy with 60%."""


@dataclass(frozen=True, slots=True)
class Workload:
    """Where requests come from: a trace file (the built-in one by default) or a synthetic
    stream of ``synthetic_requests`` requests at ``synthetic_rate`` per second, with Gamma
    inter-arrival gaps of coefficient of variation ``cv`` (1: Poisson)."""

    trace: Path | None = None
    synthetic_requests: int | None = None
    synthetic_rate: float = 5.0
    cv: float = 1.0
    mix: str | None = None
    rate_scale: float = 1.0
    start_s: float = 0.0
    duration_s: float | None = None
    fit: str = "reject"
    limit: int | None = None

    def describe(self) -> str:
        if self.synthetic_requests is not None:
            arrivals = "Poisson" if self.cv == 1.0 else f"Gamma (CV {self.cv:g})"
            what = (f"synthetic {arrivals} stream: {self.synthetic_requests} requests at "
                    f"{self.synthetic_rate:g} req/s")
        else:
            what = f"trace {self.trace or DEFAULT_TRACE}"
        extras = [f"task mix {self.mix}" if self.mix else "",
                  f"rate x{self.rate_scale:g}" if self.rate_scale != 1.0 else "",
                  f"window {self.start_s:g}s+{self.duration_s:g}s" if self.duration_s else "",
                  f"first {self.limit} requests" if self.limit is not None else ""]
        return ", ".join([what, *filter(None, extras)])

    def requests(self, seed: int, rate_scale: float = 1.0,
                 tasks: Mapping[str, TaskProfile] | None = None) -> Iterator[Request]:
        """The stream, its rate multiplied by ``rate_scale`` (on top of the workload's own),
        SLOs and expected lengths from ``tasks`` (default: the built-in task profiles)."""
        mix = TaskMix.parse(self.mix) if self.mix else None
        scale = self.rate_scale * rate_scale
        if self.synthetic_requests is not None:
            return synthetic_requests(rate=self.synthetic_rate * scale, cv=self.cv,
                                      num_requests=self.synthetic_requests, mix=mix, seed=seed,
                                      tasks=tasks)
        requests = read_trace(self.trace or DEFAULT_TRACE, tasks=tasks, mix=mix, seed=seed,
                              start_s=self.start_s, duration_s=self.duration_s, rate_scale=scale)
        return requests if self.limit is None else itertools.islice(requests, self.limit)

    def stats(self, seed: int) -> "WorkloadStats":
        """Request count, mean request length and arrival span (reads the stream once)."""
        count = tokens = 0
        first = last = 0.0
        for request in self.requests(seed):
            if not count:
                first = request.arrival
            count += 1
            tokens += request.input_tokens + request.output_tokens
            last = request.arrival
        if not count:
            raise ConfigError(f"workload {self.describe()}: no requests")
        return WorkloadStats(count, tokens / count, last - first)


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    requests: int
    mean_request_tokens: float
    span_s: float

    @property
    def rate(self) -> float:
        """Requests per second at rate scale 1."""
        return self.requests / self.span_s if self.span_s > 0 else math.nan


MISS_POLICIES = ("reroute", "drop", "fetch")
"""The engine's miss policies (``emoe serve --miss``): ``fetch`` goes with the ``lru`` planner,
``reroute`` and ``drop`` with the planners that plan their loads. The simulator models
``drop`` as ``reroute``: the same step time, and the accuracy proxy counts both as a choice not
served by its expert."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The system simulated: model, card, policies, and the rate the workload is played at.
    A ``policy_file`` replaces the policy fields (scheduling .. prediction_interval).

    The expert budget is one of ``experts_per_layer`` (L), ``expert_budget_bytes`` and
    ``expert_fraction`` (of all experts), checked in that order. ``miss_policy`` None is the
    planner's own (``fetch`` for ``lru``, else ``reroute``). ``rate_scale`` multiplies the
    workload's request rate. ``sensitivity``: a file from `emoe sensitivity` whose
    ``sensitivity_mode`` values replace the policy's sensitivity table. ``warm_start``: a
    routing trace of earlier prompts the planner starts from (``emoe.core.warm_start``).
    ``proxy_sensitivity``: an accuracy calibration (``emoe calibrate-proxy``) or a sensitivity
    file whose table weighs the accuracy proxy whatever the policy's own (default: the
    policy's). ``engine_speed``: with a served engine's profile, the serving loop's
    cycles (its engine steps and what the serving path adds) take this times the profile's
    (the machine's speed when the run is compared with a measured one), or as a
    ``SpeedTimeline``, the multiple of each window of the run; ``step_scatter``: each
    simulated step (with a served engine's profile) takes its modelled time x a lognormal
    draw of mean 1, of this sigma (0: exactly its model) or as a ``StepScatter`` (AR(1) from
    step to step, prefill steps' sigma apart), seeded by ``seed`` and ``scatter_draw`` (draw 0
    is ``seed``'s own; other draws redraw the steps of the same workload, which ``seed`` alone
    decides);
    ``fetch_cost_s``: what an expert copy costs the engine in all (default: the profile's
    copy latency + bytes / bandwidth).
    """

    model: str = "mixtral-8x7b"
    gpu: str = "h100-80gb"
    profile: Path | None = None
    scheduling: str = "emoe"
    planner: str = "emoe"
    experts_per_layer: int | None = DEFAULT_EXPERTS_PER_LAYER
    expert_budget_bytes: int | None = None
    memory_budget_bytes: int | None = None
    prediction_interval: int = 40
    policy_file: Path | None = None
    routing_trace: Path | None = None
    seed: int = 0
    expert_fraction: float | None = None
    miss_policy: str | None = None
    rate_scale: float = 1.0
    sensitivity: Path | None = None
    sensitivity_mode: str = "graded"
    warm_start: Path | None = None
    proxy_sensitivity: Path | None = None
    engine_speed: float | SpeedTimeline = 1.0
    step_scatter: float | StepScatter = 0.0
    scatter_draw: int = 0
    fetch_cost_s: float | None = None

    @property
    def name(self) -> str:
        """Every parameter of the run, e.g. ``emoe/emoe p=40 L=5/layer x1.5 mem=80GiB
        h100-80gb``; a policy file's run is named after the file."""
        rate = f"x{self.rate_scale:g}"
        if self.policy_file:
            return f"{Path(self.policy_file).stem} {rate} {self.gpu}"
        parts = [f"{self.scheduling}/{self.planner}"]
        if self.planner == "emoe":
            parts.append(f"p={self.prediction_interval}")
        if self.planner != "all":
            parts.append(f"L={self.budget_label}")
        if self.miss_policy is not None:
            parts.append(f"miss={self.miss_policy}")
        parts.append(rate)
        if self.memory_budget_bytes is not None:
            parts.append(f"mem={size_label(self.memory_budget_bytes)}")
        parts.append(self.gpu)
        return " ".join(parts)

    def speed_timeline(self) -> SpeedTimeline:
        """``engine_speed`` as a timeline (a number: one window)."""
        if isinstance(self.engine_speed, SpeedTimeline):
            return self.engine_speed
        return SpeedTimeline.constant(self.engine_speed)

    def scatter(self) -> StepScatter:
        """``step_scatter`` as a ``StepScatter`` (a number: independent draws of that sigma)."""
        if isinstance(self.step_scatter, StepScatter):
            return self.step_scatter
        return StepScatter(float(self.step_scatter))

    @property
    def budget_label(self) -> str:
        """The expert budget as given: ``5/layer``, ``40GiB`` or ``62.5%``."""
        if self.planner == "all":
            return "all"
        if self.experts_per_layer is not None:
            return f"{self.experts_per_layer}/layer"
        if self.expert_budget_bytes is not None:
            return size_label(self.expert_budget_bytes)
        if self.expert_fraction is not None:
            return f"{100 * self.expert_fraction:g}%"
        return "-"

    def normalized(self) -> "SimConfig":
        """The same system with the parameters its planner ignores reset, so that configurations
        that simulate identically compare equal: p matters only to ``emoe`` (``predict-every``
        is p = 1), the budget not to ``all``, and ``drop`` is simulated as ``reroute``."""
        if self.policy_file is not None:
            return self
        changes: dict = {}
        if self.planner != "emoe":
            changes["prediction_interval"] = 1 if self.planner == "predict-every" else 40
        if self.planner == "all":
            changes.update(experts_per_layer=None, expert_budget_bytes=None,
                           expert_fraction=None, miss_policy=None)
        elif self.miss_policy is not None:
            own = "fetch" if self.planner == "lru" else "reroute"
            if self.miss_policy not in MISS_POLICIES:
                raise UnknownNameError("miss policy", self.miss_policy, list(MISS_POLICIES))
            if (self.miss_policy == "fetch") != (own == "fetch"):
                raise ConfigError(
                    f"miss policy {self.miss_policy!r}: planner {self.planner!r} "
                    + ("fetches on a miss (use fetch)" if own == "fetch"
                       else "plans its loads itself (use reroute or drop)"))
            changes["miss_policy"] = None
        return dataclasses.replace(self, **changes) if changes else self

    def identity(self) -> tuple:
        """Equal for configurations that simulate identically: the normalized configuration
        with the expert budget resolved to experts per layer (5/layer, 62.5% and 20 experts'
        bytes are one budget on an 8-expert model)."""
        config = self.normalized()
        if config.policy_file is not None or config.planner == "all":
            return (config,)
        model, _ = config.specs()
        slots = tuple(config.policy(model).slots_per_layer(model).tolist())
        return (dataclasses.replace(config, experts_per_layer=None, expert_budget_bytes=None,
                                    expert_fraction=None), slots)

    def parameters(self, model: ModelSpec, hardware: HardwareSpec) -> dict:
        """The run's parameters as JSON-ready values (None where the planner ignores one)."""
        policy = self.policy(model)
        slots = None if policy.planner == "all" else policy.slots_per_layer(model).tolist()
        planner = policy.planner
        return {
            "name": self.name, "scheduler": policy.scheduling, "planner": planner,
            "p": policy.prediction_interval if planner in ("emoe", "predict-every") else None,
            "expert_budget": self.budget_label if self.policy_file is None else None,
            "experts_per_layer": slots,
            "expert_memory_bytes": (model.all_experts_bytes if slots is None
                                    else sum(slots) * model.expert_bytes),
            "miss_policy": self.miss_policy or ("fetch" if planner == "lru" else
                                                None if planner == "all" else "reroute"),
            "rate_scale": self.rate_scale,
            "memory_budget_bytes": policy.memory_budget_bytes or hardware.gpu_memory_bytes,
            "gpu": hardware.name, "model": model.name, "seed": self.seed,
            "policy_file": None if self.policy_file is None else str(self.policy_file),
            "warm_start": None if self.warm_start is None else str(self.warm_start),
        }

    def specs(self) -> tuple[ModelSpec, HardwareSpec]:
        """The model (a preset, or a Hugging Face model folder / config.json) and the card,
        with a profile's measured figures substituted (a profile of another model is
        refused); a profile of a served engine also sets the context it serves."""
        model = get_model(self.model)
        hardware = hardware_for(get_hardware(self.gpu), model)
        profile = self.engine_profile()
        if profile is not None:
            profile.check_model(model)
            hardware, model = profile.apply(hardware, model)
            if profile.engine is not None:
                model = dataclasses.replace(model, max_context=profile.engine.max_seq_len)
        return model, hardware

    def engine_profile(self) -> EngineProfile | None:
        return None if self.profile is None else load_profile(self.profile)

    def policy(self, model: ModelSpec) -> PolicyConfig:
        if self.policy_file is not None:
            policy = PolicyConfig.from_file(self.policy_file)
        else:
            per_layer, budget = self.experts_per_layer, self.expert_budget_bytes
            if per_layer is None and budget is None and self.expert_fraction is not None:
                if not 0.0 < self.expert_fraction <= 1.0:
                    raise ConfigError(f"expert budget {self.budget_label}: a fraction of all "
                                      "experts must be in (0%, 100%]")
                slots = ExpertBudget(fraction=self.expert_fraction).slots(
                    model.num_layers, model.num_experts, model.expert_bytes)
                budget = slots * model.expert_bytes
            if per_layer is not None:
                budget = None
            policy = PolicyConfig(scheduling=self.scheduling, planner=self.planner,
                                  prediction_interval=self.prediction_interval,
                                  experts_per_layer=per_layer, expert_budget_bytes=budget,
                                  memory_budget_bytes=self.memory_budget_bytes, model=model.name,
                                  model_shape=model_shape(model))
        if self.sensitivity is not None:  # a measured table replaces the policy's
            from emoe.core.sensitivity import load_sensitivity

            policy.sensitivity, policy.sensitivity_source = load_sensitivity(
                self.sensitivity, self.sensitivity_mode, model.num_layers, list(policy.tasks))
        return policy


CDF_POINTS = 101
"""Quantiles kept per latency for CDF plots: q = 0, 0.01, ..., 1."""


@dataclass(frozen=True, slots=True)
class SimOutcome:
    """One simulated run. ``stopped``: ended early by ``stop_after_misses`` (the summary then
    covers the requests that had ended). ``cdf``: per latency (``ttft``, ``tpot``, ``e2e``),
    its quantiles at ``CDF_POINTS`` evenly spaced q, in seconds. ``resident_per_layer``: the
    planner's resident experts per layer when the run ended. ``admission``: what admission
    did (``AdmissionCounters``, counted as the server counts it)."""

    summary: Summary
    config: SimConfig
    steps: int
    routing: str
    hits_method: str
    hardware: HardwareSpec
    model: ModelSpec
    wall_s: float
    stopped: bool = False
    cdf: dict = dataclasses.field(default_factory=dict)
    fit: ContextFit | None = None
    resident_per_layer: tuple[int, ...] = ()
    admission: AdmissionCounters = dataclasses.field(default_factory=AdmissionCounters)


def build(config: SimConfig) -> tuple[Scheduler, SimBackend]:
    """The scheduler and simulated backend for ``config`` (errors name the bad field)."""
    config.normalized()  # checks the miss policy against the planner
    model, hardware = config.specs()
    policy = config.policy(model)
    history = _history(config, model)
    if history is not None:
        policy = warm_policy(policy, history)
    budget = policy.memory_budget_bytes
    if budget is not None and budget > hardware.gpu_memory_bytes:
        raise ConfigError(f"memory budget: {budget / GIB:.1f} GiB exceeds the "
                          f"{hardware.gpu_memory_bytes / GIB:.1f} GiB of {hardware.name}")
    profile = config.engine_profile()
    fixed_slots = False
    if profile is not None and profile.engine is not None:
        # The engine as served: the scheduler the server would build over it.
        engine = profile.engine
        slots = 0 if policy.planner == "all" else int(policy.slots_per_layer(model).sum())
        policy, fixed_slots = serving_scheduler_policy(
            policy, model, EngineLimits(engine.max_batch_size, engine.max_seq_len, slots))
    scheduler = Scheduler(model, hardware, policy, fixed_expert_slots=fixed_slots)
    if history is not None:
        warm_predictor(scheduler.planner.predictor, history)
    backend = SimBackend(model=model,  # the scheduler's hardware: the predictor's cost in
                         hardware=_fetching_at(scheduler.hardware, model, config.fetch_cost_s),
                         memory_bytes=scheduler.memory_budget_bytes,
                         routing=_routing(config, model, policy),
                         miss_mode=scheduler.planner.miss_mode,
                         slots_per_layer=scheduler.planner.slots_per_layer,
                         steps=profile.step_table if profile else None,
                         serving=profile.serving if profile else None,
                         speed=config.speed_timeline(),
                         scatter=config.scatter(),
                         seed=(config.seed if not config.scatter_draw
                               else (config.seed, config.scatter_draw)),
                         offload=(profile.offload if profile and policy.serves_with_expert_cache
                                  else None))
    return scheduler, backend


def _fetching_at(hardware: HardwareSpec, model: ModelSpec,
                 fetch_cost_s: float | None) -> HardwareSpec:
    """The engine's copies with an expert copy costing ``fetch_cost_s`` in all (what a fetch
    on a miss cost as served, ``emoe fidelity``): the per-copy latency takes the difference
    to bytes / bandwidth. The scheduler keeps the profile's figure, as the server does."""
    if fetch_cost_s is None:
        return hardware
    if fetch_cost_s < 0 or not math.isfinite(fetch_cost_s):
        raise ConfigError(f"fetch cost: must be a non-negative number of seconds, got "
                          f"{fetch_cost_s!r}")
    latency = fetch_cost_s - model.expert_bytes / hardware.pcie_bandwidth_bytes_per_s
    return dataclasses.replace(hardware, pcie_latency_s=max(0.0, latency))


def _history(config: SimConfig, model: ModelSpec):
    """The warm start's routing trace, checked against the model's shape."""
    if config.warm_start is None:
        return None
    from emoe.core.routing_trace import read_routing_trace

    trace = read_routing_trace(config.warm_start)
    trace.check_model(model, str(config.warm_start))
    return trace


def proxy_weights(config: SimConfig, model: ModelSpec,
                  policy: PolicyConfig) -> dict[str, np.ndarray]:
    """Per task, the ``[layers]`` weights of the accuracy proxy: the policy's sensitivity,
    with the tasks of ``proxy_sensitivity`` (a calibration's embedded table, or a sensitivity
    file's graded s) replaced by that table."""
    table = policy.layer_sensitivity(model)
    if config.proxy_sensitivity is None:
        return table
    from emoe.core.accuracy import CALIBRATION_FORMAT, AccuracyCalibration, read_json
    from emoe.core.sensitivity import load_sensitivity

    path = resolve_path(config.proxy_sensitivity)
    data = read_json(path, "proxy weights")
    if isinstance(data, dict) and data.get("format") == CALIBRATION_FORMAT:
        weights = AccuracyCalibration.from_dict(data, str(config.proxy_sensitivity)).sensitivity
    else:
        weights, _ = load_sensitivity(path, "graded", model.num_layers, list(policy.tasks))
    for task, values in weights.items():
        if len(values) != model.num_layers:
            raise ConfigError(f"{config.proxy_sensitivity}: field 'sensitivity.{task}': "
                              f"{len(values)} layers; model {model.name} has {model.num_layers}")
        table[task] = np.asarray(values, dtype=np.float64)
    return table


def _routing(config: SimConfig, model: ModelSpec, policy: PolicyConfig) -> RoutingSource:
    sensitivity = proxy_weights(config, model, policy)
    if config.routing_trace is None:
        return SyntheticRouting(model, sensitivity, seed=config.seed)
    from emoe.core.routing_trace import read_routing_trace
    from emoe.sim.routing import TraceRouting

    trace = read_routing_trace(config.routing_trace)
    return TraceRouting(model, sensitivity, trace, str(config.routing_trace))


def simulate(config: SimConfig, workload: Workload, *, out: Path | None = None,
             progress: bool = False, stop_after_misses: int | None = None) -> SimOutcome:
    """Run one configuration over the workload; ``out`` gets one row per request.
    ``stop_after_misses``: end the run once more requests than this have missed their SLO or
    can no longer meet it (``certain_misses``): a capacity probe that cannot meet its target."""
    started = time.perf_counter()
    scheduler, backend = build(config)
    bar = _progress(config.name) if progress else None
    with MetricsCollector(out) as metrics:
        if bar is None:
            on_end = metrics.add
        else:
            def on_end(request: Request) -> None:
                metrics.add(request)
                if metrics.requests % 1024 == 0:
                    bar.update(1024)

        stop = None
        if stop_after_misses is not None:
            live = backend.live

            def stop(now: float) -> bool:
                misses = metrics.requests - metrics.slo_met
                return (misses > stop_after_misses
                        or misses + certain_misses(live.values(), now) > stop_after_misses)

        fit = ContextFit(backend.model.max_context, workload.fit)
        requests = fit(workload.requests(config.seed, config.rate_scale, scheduler.tasks))
        cost = backend.cost
        client = None if cost.serving is None else ClientView(cost.serving_at, on_end)
        world = World(scheduler, backend, requests, on_end, stop=stop, client=client)
        try:
            elapsed = world.run()
        finally:
            if bar is not None:
                bar.close()
        memory, link = backend.memory, backend.link
        counters = SystemCounters(
            elapsed_s=elapsed, peak_gpu_bytes=memory.peak, mean_gpu_bytes=memory.mean(elapsed),
            pcie_bytes=link.bytes_copied, pcie_busy_s=link.busy_s(elapsed),
            predictor_invocations=backend.predictor_invocations,
            synthetic_routing=backend.routing.synthetic)
        summary = metrics.summary(counters, name=config.name)
        cdf = {name: metrics_sketch.quantiles(CDF_QS) for name, metrics_sketch in
               (("ttft", metrics.ttft), ("tpot", metrics.tpot), ("e2e", metrics.e2e))}
    return SimOutcome(summary=summary, config=config, steps=world.steps,
                      routing=backend.routing.label, hits_method=backend.routing.hits_method,
                      hardware=backend.hardware, model=backend.model,
                      wall_s=time.perf_counter() - started, stopped=world.stopped, cdf=cdf,
                      fit=fit, resident_per_layer=tuple(
                          int(n) for n in scheduler.planner.resident.sum(axis=1)),
                      admission=world.admission)


CDF_QS = [i / (CDF_POINTS - 1) for i in range(CDF_POINTS)]


def certain_misses(requests: Iterable[Request], now: float) -> int:
    """How many of these live requests will miss their SLO whatever happens after ``now``:
    no first token yet and past the TTFT SLO, a first token that came too late, or so long
    since the first token that even finishing now would exceed the TPOT SLO (a simulated
    request generates exactly ``output_tokens``; a 1e-9 relative margin keeps the division's
    rounding on the safe side)."""
    count = 0
    for r in requests:
        first, slo = r.first_token_at, r.slo
        if first is None:
            count += now - r.arrival > slo.ttft_s
        elif first - r.arrival > slo.ttft_s:
            count += 1
        elif r.output_tokens > 1:
            count += now - first > slo.tpot_s * (r.output_tokens - 1) * (1 + 1e-9)
    return count


def _progress(name: str):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc=f"simulating {name}", unit="req", file=sys.stderr, mininterval=0.5,
                leave=False)

