"""Per-request metrics, collected as requests end.

Definitions (seconds; docs/trace-format.md):
    queueing = admitted_at - arrival
    TTFT     = first_token_at - arrival
    TPOT     = (finished_at - first_token_at) / (generated_tokens - 1), for generated_tokens > 1
    E2E      = finished_at - arrival
    SLO met  = finished, TTFT <= slo.ttft_s and (TPOT <= slo.tpot_s or generated_tokens <= 1)
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import Any

from emoe.core.metrics.histogram import QuantileSketch
from emoe.core.metrics.sinks import RowSink, open_sink
from emoe.core.metrics.summary import LatencyStats, Summary, SystemCounters, TaskStats
from emoe.core.request import Request, RequestStatus

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _elapsed(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def request_row(request: Request) -> dict[str, Any]:
    """One row of REQUEST_COLUMNS for a request (None where a time never happened)."""
    r = request
    finished = r.status is RequestStatus.FINISHED
    ttft = _elapsed(r.arrival, r.first_token_at)
    tpot = _tpot(r)
    return {
        "id": r.id, "task": r.task, "status": r.status.value, "reason": r.reason,
        "arrival_s": r.arrival, "admitted_at_s": r.admitted_at,
        "first_token_at_s": r.first_token_at, "finished_at_s": r.finished_at,
        "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
        "generated_tokens": r.generated_tokens,
        "queueing_s": _elapsed(r.arrival, r.admitted_at), "ttft_s": ttft, "tpot_s": tpot,
        "e2e_s": _elapsed(r.arrival, r.finished_at) if finished else None,
        "ttft_slo_s": r.slo.ttft_s, "tpot_slo_s": r.slo.tpot_s, "slo_met": slo_met(r),
        "expert_hits": r.expert_hits, "expert_misses": r.expert_misses,
        "weighted_hits": r.weighted_hits, "weighted_choices": r.weighted_choices,
    }


def _reason_kind(reason: str) -> str:
    """A reason with its numbers replaced by N, so the summary counts kinds of reasons
    ("token_ids.ids: N prompt tokens leave no room in the model's context of N tokens")."""
    return _NUMBER.sub("N", reason)


def slo_met(request: Request) -> bool:
    if request.status is not RequestStatus.FINISHED or request.first_token_at is None:
        return False
    if request.first_token_at - request.arrival > request.slo.ttft_s:
        return False
    tpot = _tpot(request)
    return tpot is None or tpot <= request.slo.tpot_s


def _tpot(request: Request) -> float | None:
    if (request.status is not RequestStatus.FINISHED or request.generated_tokens <= 1
            or request.first_token_at is None or request.finished_at is None):
        return None
    return (request.finished_at - request.first_token_at) / (request.generated_tokens - 1)


class MetricsCollector:
    """Takes each request as it ends (finished, rejected or aborted; a request still waiting
    or running at the end of a run may be added too and counts as not finished), writes its
    row to an optional sink file at once, and keeps aggregates whose memory does not grow with
    the number of requests (see QuantileSketch for the quantiles' error bound).

        with MetricsCollector("out/requests.parquet") as metrics:
            for request in ended: metrics.add(request)
            summary = metrics.summary(SystemCounters(elapsed_s=now, ...), name="emoe")
    """

    def __init__(self, sink: str | os.PathLike | None = None, *, rel_error: float = 0.005,
                 exact_limit: int = 4096):
        self._sink: RowSink | None = open_sink(sink) if sink is not None else None
        self.ttft, self.tpot, self.e2e, self.queueing = (
            QuantileSketch(rel_error, exact_limit=exact_limit) for _ in range(4))
        self.requests = self.finished = self.slo_met = 0
        self.by_status: Counter[RequestStatus] = Counter()
        self.not_finished: Counter[str] = Counter()
        self._tasks: dict[str, list[int]] = {}  # task -> [requests, finished, slo met]
        self.input_tokens = self.output_tokens = 0
        self.expert_hits = self.expert_misses = 0
        self.weighted_hits = self.weighted_choices = 0.0
        self.first_arrival = math.inf
        self.last_event = -math.inf

    def add(self, request: Request) -> None:
        r = request
        self.requests += 1
        self.by_status[r.status] += 1
        task = self._tasks.setdefault(r.task, [0, 0, 0])
        task[0] += 1
        self.first_arrival = min(self.first_arrival, r.arrival)
        self.last_event = max(self.last_event, r.arrival, r.finished_at or -math.inf)
        self.expert_hits += r.expert_hits
        self.expert_misses += r.expert_misses
        self.weighted_hits += r.weighted_hits
        self.weighted_choices += r.weighted_choices
        if r.admitted_at is not None:
            self.queueing.add(r.admitted_at - r.arrival)
        if r.status is RequestStatus.FINISHED:
            self.finished += 1
            task[1] += 1
            self.input_tokens += r.input_tokens
            self.output_tokens += r.generated_tokens
            if r.first_token_at is not None:
                self.ttft.add(r.first_token_at - r.arrival)
            if r.finished_at is not None:
                self.e2e.add(r.finished_at - r.arrival)
            tpot = _tpot(r)
            if tpot is not None:
                self.tpot.add(tpot)
            if slo_met(r):
                self.slo_met += 1
                task[2] += 1
        else:
            self.not_finished[_reason_kind(r.reason) or r.status.value] += 1
        if self._sink is not None:
            self._sink.write(request_row(r))

    def summary(self, counters: SystemCounters | None = None, *, name: str = "") -> Summary:
        counters = SystemCounters() if counters is None else counters
        elapsed = counters.elapsed_s
        if elapsed is None:
            elapsed = self.last_event - self.first_arrival if self.requests else 0.0

        def rate(count: float) -> float:
            return count / elapsed if elapsed > 0 else math.nan

        choices = self.expert_hits + self.expert_misses
        sketches = (self.ttft, self.tpot, self.e2e, self.queueing)
        return Summary(
            name=name, requests=self.requests, finished=self.finished,
            rejected=self.by_status[RequestStatus.REJECTED],
            aborted=self.by_status[RequestStatus.ABORTED], slo_met=self.slo_met,
            elapsed_s=elapsed,
            slo_attainment=self.slo_met / self.requests if self.requests else math.nan,
            throughput_rps=rate(self.finished), goodput_rps=rate(self.slo_met),
            output_tokens_per_s=rate(self.output_tokens),
            tokens_per_s=rate(self.input_tokens + self.output_tokens),
            ttft=LatencyStats.of(self.ttft), tpot=LatencyStats.of(self.tpot),
            e2e=LatencyStats.of(self.e2e), queueing=LatencyStats.of(self.queueing),
            expert_hits=self.expert_hits, expert_misses=self.expert_misses,
            hit_rate=self.expert_hits / choices if choices else None,
            accuracy_proxy=(self.weighted_hits / self.weighted_choices
                            if self.weighted_choices else None),
            per_task={t: TaskStats(*counts) for t, counts in sorted(self._tasks.items())},
            not_finished=dict(self.not_finished.most_common()),
            system=counters,
            quantile_rel_error=max((s.rel_error for s in sketches if not s.exact), default=0.0),
        )

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def __enter__(self) -> MetricsCollector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
