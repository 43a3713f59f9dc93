"""Run metrics: per-request rows (one column list for simulator and replay), streaming
aggregates in bounded memory, a Summary for JSON and policy search, terminal tables."""

from emoe.core.metrics.admission import AdmissionCounters
from emoe.core.metrics.collector import MetricsCollector, request_row, slo_met
from emoe.core.metrics.histogram import QuantileSketch
from emoe.core.metrics.sinks import REQUEST_COLUMNS, open_sink
from emoe.core.metrics.summary import LatencyStats, Summary, SystemCounters, TaskStats
from emoe.core.metrics.table import format_comparison, format_summary, format_table

__all__ = [
    "REQUEST_COLUMNS", "AdmissionCounters", "LatencyStats", "MetricsCollector", "QuantileSketch",
    "Summary", "SystemCounters", "TaskStats", "format_comparison", "format_summary", "format_table",
    "open_sink", "request_row", "slo_met",
]
