"""The one loop on the real engine: the core scheduler plans, the torch engine executes.

``OffloadSession`` builds, from a model and a ``SessionConfig``: the offloaded experts (host
store + slot pool of the budget; none for the ``all`` planner, which is the plain model), the
continuous-batching ``Engine`` that carries out each plan's expert loads/evictions through
them, and a ``Scheduler`` configured with the planner. ``run`` feeds it requests and drives

    plan = scheduler.next_step(now, max_iterations=1)
    result = engine.execute(plan)            # the experts fold in hits, fetches, load waits
    scheduler.on_step_done(result)

A routing calibration (a routing trace of other prompts) is a warm start
(``emoe.core.warm_start``, the same as ``emoe sim --warm-start``): it warms the predictor of
``emoe`` and ``predict-every`` with its prompts' and generated tokens' routing, sets each
task's expected output length (Eq. 2's W_o) to the trace's measured mean, and pins
``static``'s experts, as a deployment would from its own history.

Memory given to the scheduler: non-expert weights + the slot pool + the engine's KV cache.
The slot pool is fixed; the scheduler is told so (``fixed_expert_slots``), and its planner
never plans more resident experts than the pool's slots (the ``emoe`` first prompt fills every
slot rather than loading every expert).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


from emoe.core.budget import ExpertBudget, ExpertBudgetError
from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.experts import MissMode, PLANNERS
from emoe.core.policy_file import PolicyConfig
from emoe.core.profile import EngineProfile
from emoe.core.request import Request
from emoe.core.routing_trace import RoutingTrace
from emoe.core.scheduler import Scheduler
from emoe.core.specs import HardwareSpec, ModelSpec
from emoe.core.warm_start import warm_policy, warm_predictor
from emoe.engine.engine import Engine
from emoe.engine.model import MoEModel
from emoe.engine.offload.executor import MissPolicy, OffloadedExperts
from emoe.engine.offload.memory import MemoryReport, measure_memory
from emoe.engine.routing import RoutingRecorder
from emoe.engine.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class SessionRequest:
    request_id: str
    task: str
    prompt_ids: list[int]
    max_new_tokens: int
    ignore_eos: bool = False


@dataclass(slots=True)
class SessionConfig:
    """The policy fields an offloaded run is built from (the rest are ``PolicyConfig``'s
    defaults). ``sensitivity`` (task -> per-layer s) and its ``sensitivity_source`` replace the
    task profiles' hand-set defaults; ``experts_per_layer`` forces the slots per layer."""

    planner: str = "all"
    budget: str = "100%"
    miss: str | None = None          # default: fetch for lru, reroute otherwise
    prediction_interval: int = 40
    scheduling: str = "fcfs"
    max_batch_size: int = 8
    max_seq_len: int | None = None
    prefill_chunk: int = 512
    device: str = "cpu"
    predictor: str = "frequency"
    sensitivity: dict[str, list[float]] | None = None
    sensitivity_source: dict | None = None
    slot_allocation: str = "sensitivity"
    experts_per_layer: list[int] | None = None
    adaptive_interval: bool = False
    random_seed: int = 0


@dataclass(slots=True)
class RequestRecord:
    task: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    expert_hits: int = 0
    expert_misses: int = 0
    weighted_hits: float = 0.0
    weighted_choices: float = 0.0


@dataclass(slots=True)
class RunStats:
    """What a run did: per request its tokens and hits; time split by step kind."""

    requests: dict[str, RequestRecord]
    steps: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0          # tokens produced in decode-only steps
    decode_s: float = 0.0           # wall time of decode-only steps
    wall_s: float = 0.0
    load_wait_s: float = 0.0
    bytes_loaded: int = 0
    fetches: int = 0
    predictor_calls: int = 0       # steps whose plan ran the expert predictor

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def hit_rate(self) -> float:
        hits = sum(r.expert_hits for r in self.requests.values())
        total = hits + sum(r.expert_misses for r in self.requests.values())
        return hits / total if total else 1.0


class OffloadSession:
    """A model on the real engine under one expert planner, budget and miss policy."""

    def __init__(self, model: MoEModel, config: SessionConfig, model_name: str = "model",
                 calibration: RoutingTrace | None = None, profile: EngineProfile | None = None):
        if config.planner not in PLANNERS:
            raise UnknownNameError("expert planner", config.planner, list(PLANNERS))
        cfg = model.config
        dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        self.config = config
        self.spec: ModelSpec = cfg.to_model_spec(model_name, dtype=dtype)
        budget = ExpertBudget.parse(config.budget)
        slots = budget.num_slots(cfg.num_layers, cfg.num_experts, self.spec.expert_bytes)
        if config.planner == "all" and slots < cfg.num_layers * cfg.num_experts:
            raise ExpertBudgetError(f"--expert-budget {config.budget}: planner 'all' keeps every "
                                    f"expert resident and needs 100%")
        miss_mode = PLANNERS[config.planner].miss_mode
        miss = MissPolicy.parse(config.miss) if config.miss else (
            MissPolicy.FETCH if miss_mode is MissMode.FETCH else MissPolicy.REROUTE)
        if (miss is MissPolicy.FETCH) != (miss_mode is MissMode.FETCH) and miss_mode is not MissMode.NONE:
            raise ConfigError(f"--miss {miss.value}: planner {config.planner!r} "
                              + ("fetches on a miss (use --miss fetch)" if miss_mode is MissMode.FETCH
                                 else "plans loads itself; use --miss reroute or drop"))
        self.policy = PolicyConfig(
            scheduling=config.scheduling, planner=config.planner, predictor=config.predictor,
            prediction_interval=config.prediction_interval,
            expert_budget_bytes=slots * self.spec.expert_bytes,
            experts_per_layer=config.experts_per_layer,
            max_batch_tokens=max(config.prefill_chunk, config.max_batch_size),
            max_num_seqs=config.max_batch_size, model=model_name,
            sensitivity=dict(config.sensitivity or {}),
            sensitivity_source=config.sensitivity_source,
            slot_allocation=config.slot_allocation,
            adaptive_interval=config.adaptive_interval, random_seed=config.random_seed)
        if calibration is not None:
            self.policy = warm_policy(self.policy, calibration)
        self.experts: OffloadedExperts | None = None
        if config.planner != "all":
            self.experts = OffloadedExperts.install(
                model, budget, miss, device=config.device,
                slots_per_layer=self.policy.slots_per_layer(self.spec))
        else:
            model.to(config.device)
        self.model = model
        self.engine = Engine(model, max_batch_size=config.max_batch_size,
                             max_seq_len=config.max_seq_len, prefill_chunk=config.prefill_chunk,
                             expert_handler=self.experts)
        capacity = slots * self.spec.expert_bytes
        self.policy.memory_budget_bytes = (self.spec.non_expert_bytes + capacity
                                           + self.engine.cache.nbytes)
        self.hardware = _hardware(self.policy.memory_budget_bytes, profile, self.spec)
        self.scheduler = Scheduler(self.spec, self.hardware, self.policy,
                                   fixed_expert_slots=self.experts is not None)
        if calibration is not None:
            warm_predictor(self.scheduler.planner.predictor, calibration)
        self.sensitivity = self.policy.layer_sensitivity(self.spec)
        self._ids = 0

    def run(self, requests: Sequence[SessionRequest], recorder: RoutingRecorder | None = None,
            arrivals_per_step: int | None = 1) -> RunStats:
        """Run ``requests`` to completion with greedy decoding.

        Requests arrive in order, ``arrivals_per_step`` before each engine step (None: all at
        once), as a live stream would trickle in. Any value is safe for every planner.
        """
        stats = RunStats(requests={})
        tasks, prompt_lengths = {}, {}
        pending = list(reversed(requests))
        for r in requests:
            if r.task not in self.policy.tasks:
                raise UnknownNameError("task", r.task, list(self.policy.tasks),
                                       where=f"request {r.request_id!r}")
            stats.requests[r.request_id] = RequestRecord(r.task)
            tasks[r.request_id], prompt_lengths[r.request_id] = r.task, len(r.prompt_ids)
        if self.experts is not None:
            self.experts.tasks, self.experts.sensitivity = tasks, self.sensitivity
        start = time.perf_counter()
        while pending or self.scheduler.has_work:
            for _ in range(len(pending) if arrivals_per_step is None else arrivals_per_step):
                if pending:
                    self._arrive(pending.pop(), time.perf_counter() - start)
            plan = self.scheduler.next_step(time.perf_counter() - start, max_iterations=1)
            for rid, reason in plan.rejected:
                stats.requests[rid].finish_reason = f"rejected: {reason}"
                self.engine.abort(rid)
            if plan.empty:
                if not pending and self.scheduler.num_waiting and not self.scheduler.num_running:
                    raise ConfigError("scheduler admits nothing: the requests do not fit the "
                                      "engine's KV cache and expert budget")
                continue
            stats.predictor_calls += plan.run_predictor
            t0 = time.perf_counter()
            result = self.engine.execute(plan)
            if recorder is not None:
                recorder.end_step(plan, tasks, prompt_lengths)
            step_s = time.perf_counter() - t0
            self.scheduler.on_step_done(result)
            stats.steps += 1
            stats.load_wait_s += result.load_wait_s
            if not plan.prefill:
                stats.decode_steps += 1
                stats.decode_tokens += len(plan.decode)
                stats.decode_s += step_s
            for out in result.outputs:
                record = stats.requests[out.request_id]
                record.token_ids.extend(out.token_ids)
                record.expert_hits += out.expert_hits
                record.expert_misses += out.expert_misses
                record.weighted_hits += out.weighted_hits
                record.weighted_choices += out.weighted_choices
                if out.finished:
                    record.finish_reason = out.finish_reason
        stats.wall_s = time.perf_counter() - start
        if self.experts is not None:
            stats.bytes_loaded = self.experts.cache.bytes_loaded
            stats.fetches = self.experts.fetches
        return stats

    def memory(self) -> MemoryReport:
        """Bytes held on the device for experts, the KV cache and the rest."""
        cache = self.experts.cache if self.experts is not None else None
        return measure_memory(self.model, [self.engine.cache.k, self.engine.cache.v], cache)

    def _arrive(self, r: SessionRequest, now: float) -> None:
        self.scheduler.add_request(Request(
            id=r.request_id, arrival=now, task=r.task, input_tokens=len(r.prompt_ids),
            output_tokens=r.max_new_tokens, slo=self.policy.tasks[r.task].slo))
        self.engine.add_request(r.request_id, r.prompt_ids,
                                SamplingParams(max_new_tokens=r.max_new_tokens,
                                               ignore_eos=r.ignore_eos))


def _hardware(memory_bytes: int, profile: EngineProfile | None, model: ModelSpec) -> HardwareSpec:
    """The scheduler's cost model for this engine: a measured profile, else placeholders that
    only SLO-aware admission (scheduling ``emoe``) reads."""
    placeholder = HardwareSpec(
        name="engine", gpu_memory_bytes=memory_bytes, pcie_bandwidth_bytes_per_s=1e10,
        pcie_latency_s=1e-5, step_overhead_s=1e-3, prefill_s_per_token=1e-4,
        decode_s_per_token=1e-3,
        provenance="placeholder coefficients [assumed]; pass an `emoe profile` file to measure")
    if profile is None:
        return placeholder
    hardware, _ = profile.apply(placeholder, model)
    return dataclasses.replace(hardware, gpu_memory_bytes=memory_bytes)
