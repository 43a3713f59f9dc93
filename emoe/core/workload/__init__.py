"""Request workloads: trace readers (Azure LLM trace, generic CSV/JSONL), synthetic
arrivals, task-mix assignment, windowing, rate scaling and fitting to a model's context.
Everything streams Requests in arrival order. Formats: docs/trace-format.md."""

from emoe.core.workload.default_trace import (DEFAULT_TRACE, STUDY_TRACE, make_default_trace,
                                              make_study_trace)
from emoe.core.workload.fit import FIT_MODES, ContextFit
from emoe.core.workload.reader import (
    AZURE_COLUMNS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    read_azure,
    read_generic_csv,
    read_generic_jsonl,
    read_trace,
    write_trace,
)
from emoe.core.workload.synthetic import DEFAULT_INPUT_LENGTHS, LengthDist, synthetic_requests
from emoe.core.workload.taskmix import TaskMix
from emoe.core.workload.transforms import scale_rate, window

__all__ = [
    "AZURE_COLUMNS", "ContextFit", "DEFAULT_INPUT_LENGTHS", "DEFAULT_TRACE", "FIT_MODES",
    "LengthDist", "OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "STUDY_TRACE", "TaskMix",
    "make_default_trace", "make_study_trace", "read_azure", "read_generic_csv",
    "read_generic_jsonl", "read_trace", "scale_rate", "synthetic_requests", "window",
    "write_trace",
]
