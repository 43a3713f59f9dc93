"""One simulated run, from configuration to summary: build the scheduler, backend and world,
stream the workload through them and collect the metrics."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from emoe.core.errors import ConfigError
from emoe.core.metrics import MetricsCollector, Summary, SystemCounters
from emoe.core.policy_file import PolicyConfig
from emoe.core.request import Request
from emoe.core.scheduler import Scheduler
from emoe.core.specs import HardwareSpec, ModelSpec, get_hardware, get_model
from emoe.core.workload import DEFAULT_TRACE, TaskMix, read_trace, synthetic_requests
from emoe.sim.backend import SimBackend
from emoe.sim.routing import RoutingSource, SyntheticRouting
from emoe.sim.world import World

GIB = 1024**3
DEFAULT_EXPERTS_PER_LAYER = 5
"""5 of Mixtral-8x7B's 8 experts per layer (56.4 GB) beside 3.2 GB of other weights leave
26 GB of an 80 GiB H100 for the KV cache; the paper reports 98.2-98.8% accuracy with 60%."""


@dataclass(frozen=True, slots=True)
class Workload:
    """Where requests come from: a trace file (the built-in one by default) or a synthetic
    Poisson stream of ``synthetic_requests`` requests at ``synthetic_rate`` per second."""

    trace: Path | None = None
    synthetic_requests: int | None = None
    synthetic_rate: float = 5.0
    mix: str | None = None
    rate_scale: float = 1.0
    start_s: float = 0.0
    duration_s: float | None = None

    def describe(self) -> str:
        if self.synthetic_requests is not None:
            what = (f"synthetic Poisson stream: {self.synthetic_requests} requests at "
                    f"{self.synthetic_rate:g} req/s")
        else:
            what = f"trace {self.trace or DEFAULT_TRACE}"
        extras = [f"task mix {self.mix}" if self.mix else "",
                  f"rate x{self.rate_scale:g}" if self.rate_scale != 1.0 else "",
                  f"window {self.start_s:g}s+{self.duration_s:g}s" if self.duration_s else ""]
        return ", ".join([what, *filter(None, extras)])

    def requests(self, seed: int) -> Iterator[Request]:
        mix = TaskMix.parse(self.mix) if self.mix else None
        if self.synthetic_requests is not None:
            return synthetic_requests(rate=self.synthetic_rate * self.rate_scale,
                                      num_requests=self.synthetic_requests, mix=mix, seed=seed)
        return read_trace(self.trace or DEFAULT_TRACE, mix=mix, seed=seed, start_s=self.start_s,
                          duration_s=self.duration_s, rate_scale=self.rate_scale)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The system simulated: model, card, policies. A ``policy_file`` replaces the policy
    fields (scheduling .. prediction_interval)."""

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
    sensitivity: Path | None = None
    sensitivity_mode: str = "graded"

    @property
    def name(self) -> str:
        if self.policy_file:
            return Path(self.policy_file).stem
        return f"{self.scheduling}/{self.planner}"

    def specs(self) -> tuple[ModelSpec, HardwareSpec]:
        model, hardware = get_model(self.model), get_hardware(self.gpu)
        if self.profile is not None:
            from emoe.core.profile import load_profile

            hardware, model = load_profile(self.profile).apply(hardware, model)
        return model, hardware

    def policy(self, model: ModelSpec) -> PolicyConfig:
        if self.policy_file is not None:
            policy = PolicyConfig.from_file(self.policy_file)
        else:
            per_layer = self.experts_per_layer if self.expert_budget_bytes is None else None
            policy = PolicyConfig(scheduling=self.scheduling, planner=self.planner,
                                  prediction_interval=self.prediction_interval,
                                  experts_per_layer=per_layer,
                                  expert_budget_bytes=self.expert_budget_bytes,
                                  memory_budget_bytes=self.memory_budget_bytes, model=model.name)
        if self.sensitivity is not None:  # a measured table replaces the policy's
            from emoe.core.sensitivity import load_sensitivity

            policy.sensitivity, policy.sensitivity_source = load_sensitivity(
                self.sensitivity, self.sensitivity_mode, model.num_layers, list(policy.tasks))
        return policy


@dataclass(frozen=True, slots=True)
class SimOutcome:
    summary: Summary
    config: SimConfig
    steps: int
    routing: str
    hits_method: str
    hardware: HardwareSpec
    model: ModelSpec
    wall_s: float


def build(config: SimConfig) -> tuple[Scheduler, SimBackend]:
    """The scheduler and simulated backend for ``config`` (errors name the bad field)."""
    model, hardware = config.specs()
    policy = config.policy(model)
    hardware = _predictor_cost(hardware, policy.predictor)
    budget = policy.memory_budget_bytes
    if budget is not None and budget > hardware.gpu_memory_bytes:
        raise ConfigError(f"memory budget: {budget / GIB:.1f} GiB exceeds the "
                          f"{hardware.gpu_memory_bytes / GIB:.1f} GiB of {hardware.name}")
    scheduler = Scheduler(model, hardware, policy)
    backend = SimBackend(model=model, hardware=hardware,
                         memory_bytes=scheduler.memory_budget_bytes,
                         routing=_routing(config, model, policy),
                         miss_mode=scheduler.planner.miss_mode,
                         slots_per_layer=scheduler.planner.slots_per_layer)
    return scheduler, backend


def _predictor_cost(hardware: HardwareSpec, predictor: str) -> HardwareSpec:
    """A learned predictor's call time as measured when it was trained (``emoe predictor
    train``, on that machine's CPU, where it runs) replaces the preset's ``predictor_s``."""
    prefix, _, path = predictor.partition(":")
    if prefix != "learned":
        return hardware
    import dataclasses
    import json

    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            seconds = float(json.loads(f.metadata()["emoe.predictor.report"])["call_seconds"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: no measured call time in the learned predictor file "
                          f"({exc})") from None
    return dataclasses.replace(
        hardware, predictor_s=seconds,
        provenance=f"{hardware.provenance}; predictor_s {seconds * 1e3:.3f} ms measured by "
                   f"`emoe predictor train` for {path}")


def _routing(config: SimConfig, model: ModelSpec, policy: PolicyConfig) -> RoutingSource:
    sensitivity = policy.layer_sensitivity(model)
    if config.routing_trace is None:
        return SyntheticRouting(model, sensitivity, seed=config.seed)
    from emoe.core.routing_trace import read_routing_trace
    from emoe.sim.routing import TraceRouting

    trace = read_routing_trace(config.routing_trace)
    return TraceRouting(model, sensitivity, trace, str(config.routing_trace))


def simulate(config: SimConfig, workload: Workload, *, out: Path | None = None,
             progress: bool = False) -> SimOutcome:
    """Run one configuration over the workload; ``out`` gets one row per request."""
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

        world = World(scheduler, backend, workload.requests(config.seed), on_end)
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
    return SimOutcome(summary=summary, config=config, steps=world.steps,
                      routing=backend.routing.label, hits_method=backend.routing.hits_method,
                      hardware=backend.hardware, model=backend.model,
                      wall_s=time.perf_counter() - started)


def _progress(name: str):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc=f"simulating {name}", unit="req", file=sys.stderr, mininterval=0.5,
                leave=False)

