"""What ``emoe sim`` prints and writes for a set of results: tables, the Pareto front, the
freed-memory rows, the best configuration, and the JSON rows."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emoe.core.metrics import format_comparison, format_summary, format_table
from emoe.sim.runner import SimConfig, WorkloadStats
from emoe.sim.search import OBJECTIVES, CapacitySearch, Result, freed_memory, pick_best, ratio

GIB = 1024**3


def gpus(configs: Sequence[SimConfig]) -> str:
    names = []
    for gpu in dict.fromkeys(c.gpu for c in configs):
        _, hardware = next(c for c in configs if c.gpu == gpu).specs()
        names.append(f"{hardware.name} ({hardware.gpu_memory_bytes / GIB:.0f} GiB)")
    return ", ".join(names)


def stats_of(summary) -> WorkloadStats:
    """The workload's size and mean request length as a complete run saw them."""
    tokens = summary.tokens_per_s * summary.elapsed_s if summary.finished else 0.0
    return WorkloadStats(summary.requests, tokens / max(summary.finished, 1), summary.elapsed_s)


def progress_bar(total: int):
    """A tqdm bar over configurations on stderr, shown only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="configurations", unit="cfg", file=sys.stderr, leave=False)


def labels(configs: Sequence[SimConfig]) -> tuple[list[str], list[str]]:
    """Short run labels (the parameters that vary) and the parameters every run shares."""
    tokens = [c.name.split(" ") for c in configs]
    values: dict[str, set[str]] = {}
    for row in tokens:
        for token in row[1:]:
            values.setdefault(_kind(token), set()).add(token)
    constant = {kind for kind, seen in values.items() if len(seen) == 1}
    short = [" ".join([row[0], *(t for t in row[1:] if _kind(t) not in constant)])
             for row in tokens]
    order = [kind for kind in _KINDS if kind in constant]
    return short, [next(iter(values[kind])) for kind in order]


_KINDS = ("p", "L", "miss", "rate", "mem", "gpu")
"""The parameters of a run name after ``scheduler/planner``, in order."""


def _kind(token: str) -> str:
    if "=" in token:
        return token.split("=", 1)[0]
    return "rate" if token.startswith("x") and token[1:2].isdigit() else "gpu"


def print_results(results: Sequence[Result], stats: WorkloadStats,
                  search: CapacitySearch | None, single: bool) -> None:
    if single:
        print(format_summary(results[0].outcome.summary))
        return
    short, shared = labels([r.config for r in results])
    if shared:
        print("every configuration: " + ", ".join(shared))
    marked = [f"{label} *" if r.pareto else label for label, r in zip(short, results)]
    if search is None:
        print(format_comparison([dataclasses.replace(r.outcome.summary, name=label)
                                 for label, r in zip(marked, results)]))
        print("* Pareto front over (goodput, accuracy proxy, GPU memory for weights)")
        return
    rows = []
    for label, r in zip(marked, results):
        s = r.outcome.summary
        met, missed = r.bracket
        capacity = ("< " + _num(search.low, 3) if not met else
                    f">= {met:g}" if missed is None else f"{met:g}")
        rows.append([label, capacity, _num(r.capacity * stats.rate, 3), _pct(s.slo_attainment),
                     _num(s.goodput_rps, 3), _num(s.ttft.p99, 2), _num(s.tpot.p99 * 1e3, 0),
                     _pct(s.accuracy_proxy), _gib(r.weight_memory_bytes),
                     _gib(s.system.peak_gpu_bytes), _gib(s.system.pcie_bytes),
                     str(len(r.probes))])
    print(format_table(["configuration", "capacity x", "req/s", "SLO %", "goodput/s",
                        "TTFT p99", "TPOT p99 ms", "acc %", "weights GiB", "peak GiB",
                        "PCIe GiB", "probes"], rows))
    print(f"capacity: the highest rate scale (x the trace's {stats.rate:.3g} req/s) meeting "
          f"SLO attainment >= {100 * search.slo_target:g}%, within "
          f"{100 * search.tolerance:g}%; the other columns are the run at that rate")
    print("* Pareto front over (capacity, accuracy proxy, GPU memory for weights)")


def freed_memory_rows(results: Sequence[Result], stats: WorkloadStats) -> list[dict[str, Any]]:
    """Per result: ``freed_memory`` against all experts resident on the same card, plus the
    throughput ratio against the best all-resident run on that card and memory budget
    (capacity when searched; None without an all-resident run)."""
    baselines: dict[tuple, float] = {}
    for r in results:
        if r.config.planner == "all" and r.capacity is not None:
            key = _card(r)
            baselines[key] = max(baselines.get(key, 0.0), r.capacity)
    rows = []
    for r in results:
        row = freed_memory(r.config, r.outcome.model, r.outcome.hardware,
                           stats.mean_request_tokens)
        row["throughput_vs_all_resident"] = (None if r.capacity is None else
                                             ratio(r.capacity, baselines.get(_card(r))))
        rows.append(row)
    return rows


def _card(result: Result) -> tuple:
    hardware = result.outcome.hardware
    return (hardware.name, result.config.memory_budget_bytes or hardware.gpu_memory_bytes)


def format_freed_memory(rows: Sequence[dict[str, Any]], searched: bool) -> str:
    """One row per expert budget and card: what the experts left on the host buy."""
    seen: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["expert_memory_bytes"], row["kv_cache_bytes"])
        best = seen.get(key)
        gain = row["throughput_vs_all_resident"]
        if best is None or (gain or 0) > (best["throughput_vs_all_resident"] or 0):
            seen[key] = row
    table = []
    for row in sorted(seen.values(), key=lambda r: r["expert_memory_bytes"]):
        gain = row["throughput_vs_all_resident"]
        table.append([_gib(row["expert_memory_bytes"]), _gib(row["freed_bytes"]),
                      _gib(row["kv_cache_bytes"]), _count(row["max_prompt_tokens"]),
                      _times(row["max_prompt_tokens"], row["max_prompt_tokens_all_resident"]),
                      _count(row["max_batch"]),
                      _times(row["max_batch"], row["max_batch_all_resident"]),
                      "-" if gain is None else f"{gain:.2f}x"])
    lines = ["freed expert memory, against all experts resident on the same card:",
             format_table(["experts GiB", "freed GiB", "KV GiB", "longest prompt",
                           "vs all", "batch (mean req)", "vs all", "throughput vs all"],
                          table)]
    if any(r["kv_cache_bytes_all_resident"] is None for r in rows):
        lines.append("'does not fit': with all experts resident no KV cache fits on that card "
                     "(a larger one does,\n  e.g. --gpu h200-141gb)")
    if not searched:
        lines.append("throughput vs all: measured at capacity, with --search capacity")
    lines.append("longest prompt: tokens of KV room with one output token; batch: requests of "
                 "the workload's mean\n  length whose KV fits at once (the scheduler also caps "
                 "running requests at max_num_seqs)")
    return "\n".join(lines)


def print_best(results: Sequence[Result], objective: str, floor: float) -> Result | None:
    best = pick_best(results, objective, floor)
    rule = OBJECTIVES[objective][0] + (f", accuracy proxy >= {floor:g}" if floor else "")
    if best is None:
        print(f"best by rule ({rule}): none meets the accuracy floor")
    else:
        print(f"best by rule ({rule}): {best.config.name}")
    return best


def rows(results: Sequence[Result], freed: Sequence[dict[str, Any]],
         stats: WorkloadStats, calibration: Any = None) -> list[dict[str, Any]]:
    """One JSON-ready row per configuration: its parameters, the headline results (at the
    capacity when searched), the freed-memory figures and the full summary; with an accuracy
    calibration, ``accuracy_estimate`` (agreement and quality estimated from the proxy)."""
    out = []
    for r, free in zip(results, freed):
        s = r.outcome.summary
        row = r.config.parameters(r.outcome.model, r.outcome.hardware)
        row.update({
            "capacity": r.capacity, "capacity_bracket": list(r.bracket),
            "slo_target": r.slo_target,
            "request_rate": (r.capacity * stats.rate if r.capacity is not None else None),
            "slo_attainment": _json(s.slo_attainment), "goodput": _json(s.goodput_rps),
            "throughput_rps": _json(s.throughput_rps), "accuracy": s.accuracy_proxy,
            "peak_memory_bytes": s.system.peak_gpu_bytes,
            "weight_memory_bytes": r.weight_memory_bytes, "pcie_bytes": s.system.pcie_bytes,
            "pareto": r.pareto, "stopped_early": r.outcome.stopped,
            "probes": [dataclasses.asdict(p) for p in r.probes],
            "freed_memory": dict(free),
            "accuracy_estimate": (calibration.predict(s.accuracy_proxy)
                                  if calibration is not None and s.accuracy_proxy is not None
                                  else None),
            "summary": s.to_dict(),
        })
        out.append(row)
    return out


def write_json(path: Path, results: Sequence[Result], freed: Sequence[dict[str, Any]],
               stats: WorkloadStats, calibration: Any = None) -> None:
    path.write_text(json.dumps(_finite(rows(results, freed, stats, calibration)), indent=2)
                    + "\n")


def _finite(value: Any) -> Any:
    """JSON has no infinity or NaN: None in their place, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def _count(value: int | None) -> str:
    return "does not fit" if value is None else f"{value:,}"


def _times(value: int | None, baseline: int | None) -> str:
    if baseline is None:
        return "does not fit" if value is not None else "-"
    return "-" if value is None else f"{value / baseline:.1f}x"
