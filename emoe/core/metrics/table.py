"""Plain-text tables for the terminal: one run in detail, or several runs side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence

from emoe.core.metrics.summary import LatencyStats, Summary

GIB = 1024**3


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned: the first left, the rest right (they hold numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def format_summary(s: Summary) -> str:
    """One run: counts and rates, latency percentiles, per-task attainment, system counters."""
    sys = s.system
    title = f"run {s.name!r}: " if s.name else ""
    routing = "synthetic" if sys.synthetic_routing else "recorded"
    lines = [
        f"{title}{s.requests} requests over {s.elapsed_s:.1f} s: {s.finished} finished, "
        f"{s.rejected} rejected, {s.aborted} aborted",
        f"SLO attainment {_pct(s.slo_attainment)}, goodput {_num(s.goodput_rps, 3)} req/s, "
        f"throughput {_num(s.throughput_rps, 3)} req/s, {_num(s.tokens_per_s, 1)} tok/s "
        f"({_num(s.output_tokens_per_s, 1)} generated)",
        "",
        format_table(
            ["latency", "count", "mean", "p50", "p90", "p99", "max"],
            [_latency_row("TTFT (s)", s.ttft, 1.0), _latency_row("TPOT (ms)", s.tpot, 1e3),
             _latency_row("E2E (s)", s.e2e, 1.0), _latency_row("queueing (s)", s.queueing, 1.0)]),
        "",
        format_table(
            ["task", "requests", "finished", "SLO met", "attainment"],
            [[t, str(ts.requests), str(ts.finished), str(ts.slo_met), _pct(ts.slo_attainment)]
             for t, ts in s.per_task.items()]),
        "",
        f"experts: hit rate {_pct(s.hit_rate)} ({s.expert_hits} hits, {s.expert_misses} misses),"
        f" accuracy proxy {_pct(s.accuracy_proxy)}; routing {routing}",
        f"GPU memory: peak {_gib(sys.peak_gpu_bytes)}, mean {_gib(sys.mean_gpu_bytes)}; "
        f"PCIe: {_gib(sys.pcie_bytes)} moved, busy {_num(sys.pcie_busy_s, 1)} s; "
        f"predictor: {_count(sys.predictor_invocations)} calls",
    ]
    if s.not_finished:
        lines.append("not finished: " + ", ".join(f"{reason} {n}"
                                                  for reason, n in s.not_finished.items()))
    if s.quantile_rel_error:
        lines.append(f"(percentiles from log histograms: within {_pct(s.quantile_rel_error)}"
                     " relative error)")
    return "\n".join(lines)


COMPARISON_HEADERS = ("run", "requests", "SLO %", "goodput/s", "req/s", "tok/s",
                      "TTFT p50", "TTFT p99", "TPOT p50 ms", "TPOT p99 ms", "E2E p99",
                      "hit %", "acc %", "peak GiB", "PCIe GiB", "predictor")


def format_comparison(summaries: Sequence[Summary]) -> str:
    """Several runs side by side: one row per run, key metrics as columns (times in s)."""
    rows = [[s.name or str(i), str(s.requests), _pct(s.slo_attainment, sign=False),
             _num(s.goodput_rps, 3), _num(s.throughput_rps, 3), _num(s.tokens_per_s, 1),
             _num(s.ttft.p50, 3), _num(s.ttft.p99, 3), _num(s.tpot.p50 * 1e3, 1),
             _num(s.tpot.p99 * 1e3, 1), _num(s.e2e.p99, 2), _pct(s.hit_rate, sign=False),
             _pct(s.accuracy_proxy, sign=False), _num(_in_gib(s.system.peak_gpu_bytes), 2),
             _num(_in_gib(s.system.pcie_bytes), 2), _count(s.system.predictor_invocations)]
            for i, s in enumerate(summaries)]
    return format_table(COMPARISON_HEADERS, rows)


def _latency_row(label: str, stats: LatencyStats, scale: float) -> list[str]:
    return [label, str(stats.count), *(_num(v * scale, 3) for v in
                                       (stats.mean, stats.p50, stats.p90, stats.p99, stats.max))]


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _pct(value: float | None, sign: bool = True) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}{'%' if sign else ''}"


def _in_gib(value: float | None) -> float | None:
    return None if value is None else value / GIB


def _gib(value: float | None) -> str:
    return "not measured" if value is None else f"{value / GIB:.2f} GiB"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)
