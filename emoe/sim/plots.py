"""Comparison plots of several simulated runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from emoe.core.metrics import Summary

GIB = 1024**3


def write_plots(summaries: Sequence[Summary], directory: Path, title: str = "") -> list[Path]:
    """Write ``overview.png`` (key metrics per run) and ``slo_by_task.png``; returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in summaries]
    x = np.arange(len(names))
    panels = [
        ("SLO attainment (%)", [100 * s.slo_attainment for s in summaries]),
        ("TTFT p90 (s)", [s.ttft.p90 for s in summaries]),
        ("TPOT p90 (ms)", [1e3 * s.tpot.p90 for s in summaries]),
        ("accuracy proxy (%)", [100 * (s.accuracy_proxy if s.accuracy_proxy is not None
                                       else math.nan) for s in summaries]),
        ("peak GPU memory (GiB)", [s.system.peak_gpu_bytes / GIB for s in summaries]),
        ("PCIe traffic (GiB)", [s.system.pcie_bytes / GIB for s in summaries]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (label, values) in zip(axes.flat, panels):
        bars = ax.bar(x, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if _spans_decades(values):
            ax.set_yscale("log")
            label += ", log scale"
        ax.set_title(label)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"SIMULATED: {title}" if title else "SIMULATED", fontsize=10)
    fig.tight_layout()
    overview = directory / "overview.png"
    fig.savefig(overview, dpi=110)
    plt.close(fig)

    tasks = sorted({t for s in summaries for t in s.per_task})
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks) * max(1, len(names)) / 3), 4.5))
    width = 0.8 / max(1, len(names))
    for i, s in enumerate(summaries):
        values = [100 * s.per_task[t].slo_attainment if t in s.per_task else math.nan
                  for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, values, width, label=s.name)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(names) - 1) / 2, tasks)
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title("SIMULATED: SLO attainment by task", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    by_task = directory / "slo_by_task.png"
    fig.savefig(by_task, dpi=110)
    plt.close(fig)
    return [overview, by_task]


def _spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    """Whether the positive values span more than ``decades`` orders of magnitude, so that a
    linear axis would flatten all but the largest bars."""
    positive = [v for v in values if v > 0 and not math.isnan(v)]
    return len(positive) > 1 and math.log10(max(positive) / min(positive)) > decades
