"""What a run achieved, as plain data: latency distributions, SLO attainment, throughput,
expert-cache behaviour and the system counters the backend reports."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from emoe.core.metrics.histogram import QuantileSketch


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """A latency distribution in seconds; NaN where there were no samples."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, sketch: QuantileSketch) -> LatencyStats:
        return cls(sketch.count, sketch.mean, sketch.quantile(0.5), sketch.quantile(0.9),
                   sketch.quantile(0.99), sketch.max if sketch.count else math.nan)


@dataclass(frozen=True, slots=True)
class TaskStats:
    requests: int
    finished: int
    slo_met: int

    @property
    def slo_attainment(self) -> float:
        return self.slo_met / self.requests if self.requests else math.nan


@dataclass(frozen=True, slots=True)
class SystemCounters:
    """Run-level numbers only the backend knows (the simulator or the live service).

    ``elapsed_s``: the run's duration (simulated or wall-clock); when None, the span from the
    first arrival to the last request's end is used. ``synthetic_routing``: whether expert
    hits and misses came from synthetic routing rather than recorded routing traces. The
    memory, PCIe and predictor counters are None where the caller did not measure them (a
    replay client cannot see the server's GPU).
    """

    elapsed_s: float | None = None
    peak_gpu_bytes: int | None = None
    mean_gpu_bytes: float | None = None
    pcie_bytes: int | None = None
    pcie_busy_s: float | None = None
    predictor_invocations: int | None = None
    synthetic_routing: bool = False


@dataclass(frozen=True, slots=True)
class Summary:
    """Aggregates of one run. Rates are per second of ``elapsed_s``; token rates count the
    input and generated tokens of finished requests.

    ``slo_attainment`` = SLO-meeting requests / all requests (rejected, aborted and unfinished
    ones count as misses); ``goodput_rps`` = SLO-meeting requests per second. TTFT, TPOT and
    E2E are over finished requests, queueing over admitted ones. ``hit_rate`` = expert hits /
    (hits + misses); ``accuracy_proxy`` = sensitivity-weighted share of routed expert choices
    served by the router's chosen expert (None when no weighted choice was recorded).
    ``not_finished`` counts requests that did not finish, by reason. Percentiles are exact
    when ``quantile_rel_error`` is 0, else within that relative error.
    """

    name: str
    requests: int
    finished: int
    rejected: int
    aborted: int
    slo_met: int
    elapsed_s: float
    slo_attainment: float
    throughput_rps: float
    goodput_rps: float
    output_tokens_per_s: float
    tokens_per_s: float
    ttft: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats
    queueing: LatencyStats
    expert_hits: int
    expert_misses: int
    hit_rate: float | None
    accuracy_proxy: float | None
    per_task: dict[str, TaskStats] = field(default_factory=dict)
    not_finished: dict[str, int] = field(default_factory=dict)
    system: SystemCounters = field(default_factory=SystemCounters)
    quantile_rel_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: nested stats as dicts, per-task attainment included, NaN as None."""
        out = _json_ready(dataclasses.asdict(self))
        for name, stats in self.per_task.items():
            out["per_task"][name]["slo_attainment"] = _json_ready(stats.slo_attainment)
        return out


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value
