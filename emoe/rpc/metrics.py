"""What the service measures: per-task counts, durations and SLO attainment (GetStats) and
the same in Prometheus format on a port of its own.

Durations are measured by the server from the moment it accepts a request. GetStats keeps
the most recent ``window`` finished requests per task and identity (the request's owner) for
its percentiles, and reports one identity's requests or, for an admin, everyone's; Prometheus
keeps histograms over all requests.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from emoe.core.metrics.admission import AdmissionCounters
from emoe.core.plan import StepPlan, StepResult
from emoe.rpc.policy_info import PolicyInForce

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Outcome(enum.Enum):
    FINISHED = "finished"  # LENGTH or STOP
    ABORTED = "aborted"    # Abort, cancelled call, deadline
    FAILED = "failed"      # rejected by the scheduler, lost with a worker


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A request that reached a terminal status. Times are None when never reached."""

    task: str
    outcome: Outcome
    output_tokens: int
    queue_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    total_s: float
    slo_met: bool
    owner: str = ""


@dataclass(slots=True)
class _TaskStats:
    window: int
    submitted: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    slo_met: int = 0
    output_tokens: int = 0
    queue: deque = field(init=False)
    ttft: deque = field(init=False)
    tpot: deque = field(init=False)
    total: deque = field(init=False)

    def __post_init__(self) -> None:
        for name in ("queue", "ttft", "tpot", "total"):
            setattr(self, name, deque(maxlen=self.window))


@dataclass(frozen=True, slots=True)
class Durations:
    count: int
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float

    @classmethod
    def of(cls, *samples: deque) -> "Durations":
        a = np.fromiter((x for d in samples for x in d), dtype=float)
        if not a.size:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        p50, p90, p99 = np.percentile(a, (50, 90, 99))
        return cls(len(a), float(a.mean()), float(p50), float(p90), float(p99), float(a.max()))


@dataclass(frozen=True, slots=True)
class TaskSnapshot:
    task: str
    submitted: int
    finished: int
    aborted: int
    failed: int
    slo_met: int
    output_tokens: int
    queue: Durations
    ttft: Durations
    tpot: Durations
    total: Durations

    @property
    def slo_attainment(self) -> float:
        return self.slo_met / self.finished if self.finished else 0.0


@dataclass(slots=True)
class ExpertCounters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    predictor_calls: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ServiceMetrics:
    """Records request outcomes and steps; serves GetStats and a Prometheus registry.

    ``load`` returns (waiting, running, resident experts, resident expert bytes) now; it is
    read when Prometheus scrapes and when stats are asked for.
    """

    def __init__(self, tasks: list[str], load: Callable[[], tuple[int, int, int, int]],
                 window: int = 10_000):
        self._started = time.monotonic()
        self._window = window
        self._task_names = list(tasks)
        self._tasks: dict[tuple[str, str], _TaskStats] = {}  # (owner, task) ->
        self._attained: dict[str, list[int]] = {}  # task -> [SLO met, finished]
        self.experts = ExpertCounters()
        self.admission = AdmissionCounters()
        self.load = load
        self.registry = CollectorRegistry()
        r = self.registry
        self._waiting = Gauge("emoe_requests_waiting", "Requests accepted, not yet scheduled",
                              registry=r)
        self._waiting.set_function(lambda: self.load()[0])
        self._running = Gauge("emoe_requests_running", "Requests in the running batch", registry=r)
        self._running.set_function(lambda: self.load()[1])
        self._resident = Gauge("emoe_experts_resident", "Experts resident in GPU memory", registry=r)
        self._resident.set_function(lambda: self.load()[2])
        self._expert_bytes = Gauge("emoe_expert_memory_bytes", "GPU memory held by resident experts",
                                   registry=r)
        self._expert_bytes.set_function(lambda: self.load()[3])
        self._requests = Counter("emoe_requests", "Requests that reached a terminal status",
                                 ("task", "outcome"), registry=r)
        self._slo_met = Counter("emoe_slo_met", "Finished requests that met their SLO", ("task",),
                                registry=r)
        self._attainment = Gauge("emoe_slo_attainment", "SLO attainment of finished requests",
                                 ("task",), registry=r)
        self._ttft = Histogram("emoe_ttft_seconds", "Time to first token", ("task",),
                               buckets=LATENCY_BUCKETS, registry=r)
        self._tpot = Histogram("emoe_tpot_seconds", "Mean time per output token after the first",
                               ("task",), buckets=TPOT_BUCKETS, registry=r)
        self._e2e = Histogram("emoe_e2e_latency_seconds", "Accepted to finished", ("task",),
                              buckets=LATENCY_BUCKETS, registry=r)
        self._queue = Histogram("emoe_queue_seconds", "Accepted to first scheduled", ("task",),
                                buckets=LATENCY_BUCKETS, registry=r)
        self._expert_hits = Counter("emoe_expert_hits", "Router choices served by a resident expert",
                                    registry=r)
        self._expert_misses = Counter("emoe_expert_misses", "Router choices of a non-resident expert",
                                      registry=r)
        self._expert_loads = Counter("emoe_expert_loads", "Experts copied to GPU memory", registry=r)
        self._expert_evictions = Counter("emoe_expert_evictions", "Experts evicted from GPU memory",
                                         registry=r)
        self._hit_rate = Gauge("emoe_expert_hit_rate", "Expert hits / (hits + misses) since start",
                               registry=r)
        self._hit_rate.set_function(lambda: self.experts.hit_rate)
        self._predictor_calls = Counter("emoe_predictor_calls", "Expert-predictor runs planned",
                                        registry=r)
        self._deferred = Counter(
            "emoe_admission_deferred", "Waiting requests that fitted in memory but the policy "
            "held back (Eq. 3), summed over steps", registry=r)
        self._slowdown = Gauge(
            "emoe_admission_slowdown", "Measured / modelled step time that Eq. 3 costed the "
            "last admission with (0: the policy uses no estimate)", registry=r)
        self._policy = Info("emoe_policy", "The policy in force (names, sources)", registry=r)
        self._policy_values = Gauge("emoe_policy_value", "The policy in force (numbers)",
                                    ("setting",), registry=r)
        self._policy_slots = Gauge("emoe_policy_experts_per_layer",
                                   "Expert slots per layer of the policy in force", ("layer",),
                                   registry=r)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    def _task(self, task: str, owner: str) -> _TaskStats:
        stats = self._tasks.get((owner, task))
        if stats is None:
            stats = self._tasks[owner, task] = _TaskStats(self._window)
            if task not in self._task_names:
                self._task_names.append(task)
        return stats

    def submitted(self, task: str, owner: str = "") -> None:
        self._task(task, owner).submitted += 1

    def finished(self, record: RequestRecord) -> None:
        stats = self._task(record.task, record.owner)
        task = record.task
        self._requests.labels(task, record.outcome.value).inc()
        if record.outcome is Outcome.FAILED:
            stats.failed += 1
            return
        if record.outcome is Outcome.ABORTED:
            stats.aborted += 1
            return
        stats.finished += 1
        stats.output_tokens += record.output_tokens
        stats.total.append(record.total_s)
        self._e2e.labels(task).observe(record.total_s)
        if record.queue_s is not None:
            stats.queue.append(record.queue_s)
            self._queue.labels(task).observe(record.queue_s)
        if record.ttft_s is not None:
            stats.ttft.append(record.ttft_s)
            self._ttft.labels(task).observe(record.ttft_s)
        if record.tpot_s is not None:
            stats.tpot.append(record.tpot_s)
            self._tpot.labels(task).observe(record.tpot_s)
        if record.slo_met:
            stats.slo_met += 1
            self._slo_met.labels(task).inc()
        met_finished = self._attained.setdefault(task, [0, 0])  # all identities
        met_finished[0] += record.slo_met
        met_finished[1] += 1
        self._attainment.labels(task).set(met_finished[0] / met_finished[1])

    def policy(self, p: PolicyInForce) -> None:
        self._policy.info({"scheduling": p.scheduling, "planner": p.planner,
                           "predictor": p.predictor, "miss_policy": p.miss_policy,
                           "sensitivity_source": p.sensitivity_source, "source": p.source,
                           "tuned_for": p.tuned_for})
        for name in ("prediction_interval", "expert_budget_bytes", "memory_budget_bytes",
                     "max_num_seqs", "max_batch_tokens"):
            self._policy_values.labels(name).set(getattr(p, name))
        for layer, slots in enumerate(p.experts_per_layer):
            self._policy_slots.labels(str(layer)).set(slots)

    def step(self, plan: StepPlan, result: StepResult, seconds: float) -> None:
        """A step: its plan, its result, and the seconds from the plan to the step's end."""
        self.admission.record(plan, seconds)
        self._deferred.inc(plan.deferred)
        if plan.slowdown is not None:
            self._slowdown.set(plan.slowdown)
        hits = sum(o.expert_hits for o in result.outputs)
        misses = sum(o.expert_misses for o in result.outputs)
        e = self.experts
        e.hits += hits
        e.misses += misses
        loads = len(plan.load) + len(result.fetched_on_miss)  # planned + fetched on a miss
        evictions = len(plan.evict) + len(result.evicted_on_miss)
        e.loads += loads
        e.evictions += evictions
        self._expert_hits.inc(hits)
        self._expert_misses.inc(misses)
        self._expert_loads.inc(loads)
        self._expert_evictions.inc(evictions)
        if plan.run_predictor:
            e.predictor_calls += 1
            self._predictor_calls.inc()

    def tasks(self, owner: str | None = None) -> list[TaskSnapshot]:
        """Per task, the requests of ``owner`` (None: of every identity)."""
        snapshots = []
        for task in self._task_names:
            parts = [s for (o, t), s in self._tasks.items()
                     if t == task and (owner is None or o == owner)]
            snapshots.append(TaskSnapshot(
                task, *(sum(getattr(s, name) for s in parts) for name in
                        ("submitted", "finished", "aborted", "failed", "slo_met", "output_tokens")),
                *(Durations.of(*(getattr(s, name) for s in parts))
                  for name in ("queue", "ttft", "tpot", "total"))))
        return snapshots
