"""What-if search over simulated configurations.

- ``distinct``: the grid with configurations that simulate identically merged.
- ``capacity_search``: per configuration, the highest rate scale whose SLO attainment meets a
  target, by bisection on the rate (each probe a whole simulation; a probe stops as soon as its
  misses make the target unreachable, which decides it exactly).
- ``pareto``: the non-dominated configurations in (capacity or goodput, accuracy, GPU memory
  for weights).
- ``pick_best``: the best configuration under a rule (an objective and an accuracy floor).
- ``freed_memory``: what the expert memory a budget frees buys against all experts resident.

Every function here is deterministic: the same inputs give the same answer whatever process
or machine runs it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from emoe.core.errors import ConfigError
from emoe.core.specs import HardwareSpec, ModelSpec
from emoe.sim.runner import SimConfig, SimOutcome, Workload, simulate


def distinct(configs: Sequence[SimConfig]) -> list[SimConfig]:
    """The configurations in order, each simulated system once (``SimConfig.identity``), with
    the parameters its planner ignores reset (``SimConfig.normalized``)."""
    seen: set[tuple] = set()
    unique = []
    for config in configs:
        identity = config.identity()
        if identity not in seen:
            seen.add(identity)
            unique.append(config.normalized())
    return unique


@dataclass(frozen=True, slots=True)
class CapacitySearch:
    """Bisection on the rate scale: start at ``start``, double (or halve) until the target is
    met and missed, then take geometric midpoints until the bracket's ratio is at most
    ``1 + tolerance``. Rates stay in [``low``, ``high``]."""

    slo_target: float = 0.9
    tolerance: float = 0.05
    start: float = 1.0
    low: float = 1 / 32
    high: float = 64.0

    def __post_init__(self) -> None:
        if not 0.0 < self.slo_target <= 1.0:
            raise ConfigError(f"--slo-target {self.slo_target:g}: must be in (0, 1]")
        if not self.tolerance > 0.0:
            raise ConfigError(f"--capacity-tolerance {self.tolerance:g}: must be > 0")
        if not 0.0 < self.low <= self.start <= self.high < math.inf:
            raise ConfigError(f"capacity search: need 0 < low {self.low:g} <= start "
                              f"{self.start:g} <= high {self.high:g}")


@dataclass(frozen=True, slots=True)
class Probe:
    """One simulation of a search: its rate scale, its SLO attainment (over the requests that
    had ended, if it was stopped early), whether it met the target, and whether it was
    stopped early (the target already out of reach)."""

    rate_scale: float
    slo_attainment: float
    meets: bool
    stopped: bool


@dataclass(slots=True)
class Result:
    """One configuration's answer. ``outcome`` is the run at the capacity when searched (a
    complete run; when even ``low`` misses the target, that probe, ``outcome.stopped`` if it
    was ended early), else the run itself.
    ``capacity`` is the highest rate scale found to meet the target (0.0: none did; None: not
    searched) and ``bracket`` the (met, missed) rates around it (None where not found)."""

    config: SimConfig
    outcome: SimOutcome
    probes: list[Probe] = field(default_factory=list)
    capacity: float | None = None
    bracket: tuple[float | None, float | None] = (None, None)
    slo_target: float | None = None
    pareto: bool = False

    @property
    def accuracy(self) -> float:
        proxy = self.outcome.summary.accuracy_proxy
        return 1.0 if proxy is None else proxy

    @property
    def peak_memory_bytes(self) -> int:
        return self.outcome.summary.system.peak_gpu_bytes or 0

    @property
    def weight_memory_bytes(self) -> int:
        """GPU memory the configuration keeps for weights: the non-expert weights and its
        expert memory (every expert for ``all``); the rest of its budget is KV cache."""
        model = self.outcome.model
        policy = self.config.policy(model)
        experts = (model.all_experts_bytes if policy.planner == "all"
                   else int(policy.slots_per_layer(model).sum()) * model.expert_bytes)
        return model.non_expert_bytes + experts


ProbeFn = Callable[..., SimOutcome]


def capacity_search(config: SimConfig, workload: Workload, search: CapacitySearch,
                    total_requests: int, probe: ProbeFn = simulate) -> Result:
    """The highest rate scale (within ``search.tolerance``) at which ``config`` meets the SLO
    target on ``workload`` (``total_requests`` requests), assuming attainment falls as the
    rate rises. ``probe`` runs one simulation (``simulate``'s signature)."""
    needed = math.ceil(search.slo_target * total_requests - 1e-9)
    allowed_misses = total_requests - needed
    probes: list[Probe] = []
    met: float | None = None
    missed: float | None = None
    at_capacity: SimOutcome | None = None
    rate = search.start
    while True:
        outcome = probe(dataclasses.replace(config, rate_scale=rate), workload,
                        stop_after_misses=allowed_misses)
        meets = not outcome.stopped and outcome.summary.slo_met >= needed
        probes.append(Probe(rate, outcome.summary.slo_attainment, meets, outcome.stopped))
        if meets:
            met, at_capacity = rate, outcome
        else:
            missed = rate
        if met is None:
            if rate <= search.low:
                break
            rate = max(_round(rate / 2), search.low)
        elif missed is None:
            if rate >= search.high:
                break
            rate = min(_round(rate * 2), search.high)
        else:
            if missed / met <= 1.0 + search.tolerance:
                break
            rate = _round(math.sqrt(met * missed))
            if not met < rate < missed:  # rounding closed the bracket
                break
    if at_capacity is None:
        # nothing met the target: report the lowest probe (if it was stopped early, its
        # summary covers the requests that had ended)
        at_capacity = outcome
    return Result(config=config, outcome=at_capacity, probes=probes,
                  capacity=0.0 if met is None else met, bracket=(met, missed),
                  slo_target=search.slo_target)


def _round(rate: float) -> float:
    """Four significant digits: readable rate scales in run names."""
    return float(f"{rate:.4g}")


def pareto(points: Sequence[Sequence[float]], maximise: Sequence[bool]) -> list[bool]:
    """For each point, whether no other point is at least as good on every axis and better on
    one (``maximise[i]``: higher is better on axis i, else lower). Equal points are all kept."""
    signs = [1.0 if up else -1.0 for up in maximise]
    scored = [[s * v for s, v in zip(signs, p)] for p in points]
    front = []
    for i, a in enumerate(scored):
        dominated = any(all(b_k >= a_k for a_k, b_k in zip(a, b)) and b != a
                        for j, b in enumerate(scored) if j != i)
        front.append(not dominated)
    return front


def throughput_axis(result: Result) -> float:
    """The Pareto front's first axis: the capacity when searched, else goodput (req/s)."""
    if result.capacity is not None:
        return result.capacity
    return _finite(result.outcome.summary.goodput_rps)


def mark_pareto(results: Sequence[Result]) -> None:
    """Set ``pareto`` on each result: (capacity or goodput, accuracy proxy, GPU memory for
    weights). Memory is what the configuration sets aside for the model, not its measured
    peak: a configuration that serves less holds less KV cache, which is no saving."""
    points = [(throughput_axis(r), r.accuracy, float(r.weight_memory_bytes)) for r in results]
    for result, on_front in zip(results, pareto(points, (True, True, False))):
        result.pareto = on_front


OBJECTIVES: dict[str, tuple[str, Callable[[Result], float]]] = {
    "capacity": ("highest capacity", lambda r: r.capacity if r.capacity is not None
                 else -math.inf),
    "goodput": ("highest goodput", lambda r: _finite(r.outcome.summary.goodput_rps)),
    "slo": ("highest SLO attainment", lambda r: _finite(r.outcome.summary.slo_attainment)),
    "accuracy": ("highest accuracy proxy", lambda r: r.accuracy),
    "memory": ("least GPU memory for weights", lambda r: -float(r.weight_memory_bytes)),
}


def pick_best(results: Sequence[Result], objective: str,
              accuracy_floor: float = 0.0) -> Result | None:
    """The result with the best ``objective`` among those whose accuracy proxy is at least
    ``accuracy_floor``; ties go to higher accuracy, then to less memory, then to the first.
    None when no result meets the floor."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"--best {objective!r}: valid: {', '.join(OBJECTIVES)}")
    score = OBJECTIVES[objective][1]
    eligible = [r for r in results if r.accuracy >= accuracy_floor - 1e-12]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (score(r), r.accuracy, -r.weight_memory_bytes,
                                        -r.peak_memory_bytes))


def _finite(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def freed_memory(config: SimConfig, model: ModelSpec, hardware: HardwareSpec,
                 mean_request_tokens: float) -> dict[str, Any]:
    """What a configuration's expert budget frees, against all experts resident on the same
    card and memory budget: the KV cache room, the longest prompt that fits (with one output
    token), and how many requests of the workload's mean length (input + output) fit at once.
    ``*_all_resident`` values are None when all experts do not fit beside the other weights."""
    policy = config.policy(model)
    budget = policy.memory_budget_bytes or hardware.gpu_memory_bytes
    experts = (model.all_experts_bytes if policy.planner == "all"
               else int(policy.slots_per_layer(model).sum()) * model.expert_bytes)
    per_token = model.kv_bytes_per_token

    def room(expert_bytes: int) -> int | None:
        kv = budget - model.non_expert_bytes - expert_bytes
        return kv if kv >= 2 * per_token else None

    kv, kv_all = room(experts), room(model.all_experts_bytes)

    def prompt(kv_bytes: int | None) -> int | None:
        return None if kv_bytes is None else kv_bytes // per_token - 1

    def batch(kv_bytes: int | None) -> int | None:
        return None if kv_bytes is None else int(kv_bytes // (mean_request_tokens * per_token))

    return {
        "expert_memory_bytes": experts,
        "freed_bytes": model.all_experts_bytes - experts,
        "kv_cache_bytes": kv, "kv_cache_bytes_all_resident": kv_all,
        "max_prompt_tokens": prompt(kv), "max_prompt_tokens_all_resident": prompt(kv_all),
        "max_batch": batch(kv), "max_batch_all_resident": batch(kv_all),
        "mean_request_tokens": mean_request_tokens,
    }


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline; None when either is missing, inf when only the baseline is 0."""
    if value is None or baseline is None:
        return None
    if baseline == 0:
        return math.inf if value > 0 else None
    return value / baseline


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work for a worker: a configuration's run, or its capacity search
    (``search``), on ``workload`` of ``total_requests`` requests; ``out``: per-request rows
    (of the run at the capacity, when searched)."""

    config: SimConfig
    workload: Workload
    search: CapacitySearch | None = None
    total_requests: int = 0
    out: Any = None
    progress: bool = False


def run_task(task: Task) -> Result:
    """Carry out a ``Task`` (a top-level function, so worker processes and Ray can run it)."""
    if task.search is None:
        outcome = simulate(task.config, task.workload, out=task.out, progress=task.progress)
        return Result(config=task.config, outcome=outcome)
    result = capacity_search(task.config, task.workload, task.search, task.total_requests)
    if task.out is not None:
        simulate(result.outcome.config, task.workload, out=task.out)
    return result
