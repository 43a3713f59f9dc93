"""Plots of simulated runs (matplotlib, Agg backend: no display needed).

``whatif.png`` is the one figure of a study: accuracy against the GPU memory kept for weights
(non-expert weights and resident experts), coloured by capacity
(or goodput) with the Pareto front marked, each configuration's capacity (or SLO attainment)
coloured by scheduling policy, and the TTFT and TPOT distributions (CDFs) of the front.
``overview.png`` and ``slo_by_task.png`` show the key metrics per run and per task.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from emoe.core.metrics import Summary

GIB = 1024**3
CDF_LINES = 8
"""At most this many front configurations get a latency CDF line (the highest throughput)."""
SCHEDULER_COLOURS = {"fcfs": "tab:blue", "sjf": "tab:orange", "edf": "tab:green",
                     "emoe": "tab:red"}


def write_plots(results: Sequence, directory: Path, title: str = "",
                searched: bool = False) -> list[Path]:
    """Write ``whatif.png``, ``overview.png`` and ``slo_by_task.png`` for ``results``
    (``emoe.sim.search.Result``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from emoe.sim.report import labels

    directory.mkdir(parents=True, exist_ok=True)
    short, _ = labels([r.config for r in results])
    whatif = _whatif(results, short, directory, title, searched)
    summaries = [dataclasses.replace(r.outcome.summary, name=label)
                 for r, label in zip(results, short)]
    return [whatif, *_bars(summaries, directory, title)]


def _whatif(results: Sequence, names: list[str], directory: Path, title: str,
            searched: bool) -> Path:
    import matplotlib.pyplot as plt

    from emoe.sim.search import throughput_axis

    axis_name = "capacity (rate scale)" if searched else "goodput (req/s)"
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    ax = axes[0, 0]
    # drawn in rising throughput, so where points coincide the best one shows
    order = sorted(range(len(results)), key=lambda i: throughput_axis(results[i]))
    memory = [results[i].weight_memory_bytes / GIB for i in order]
    accuracy = [100 * results[i].accuracy for i in order]
    colour = [throughput_axis(results[i]) for i in order]
    results, names = [results[i] for i in order], [names[i] for i in order]
    points = ax.scatter(memory, accuracy, c=colour, cmap="viridis", s=60, zorder=3)
    fig.colorbar(points, ax=ax, label=axis_name)
    front = [(x, y, name) for r, x, y, name in zip(results, memory, accuracy, names)
             if r.pareto]
    if front:
        ax.scatter([x for x, _, _ in front], [y for _, y, _ in front], s=180,
                   facecolors="none", edgecolors="black", zorder=4)
        _label_points(ax, front)
    ax.set_xlabel("GPU memory for weights: non-expert + resident experts (GiB)")
    ax.set_ylabel("accuracy proxy (%)")
    ax.set_title("accuracy vs memory; ringed: Pareto front", fontsize=10)
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    values = [throughput_axis(r) if searched else 100 * r.outcome.summary.slo_attainment
              for r in results]
    order = sorted(range(len(results)), key=lambda i: values[i])
    ax.barh(range(len(order)), [values[i] for i in order],
            color=[SCHEDULER_COLOURS.get(results[i].config.scheduling, "tab:gray")
                   for i in order])
    ax.set_yticks(range(len(order)), [names[i] for i in order], fontsize=7)
    ax.set_xlabel(axis_name if searched else "SLO attainment (%)")
    ax.set_title("by configuration; colour: scheduling policy", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in SCHEDULER_COLOURS.values()]
    ax.legend(handles, list(SCHEDULER_COLOURS), fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)

    front = sorted(((r, n) for r, n in zip(results, names) if r.pareto),
                   key=lambda item: -throughput_axis(item[0]))
    shown = front[:CDF_LINES]
    for ax, metric, scale, unit in ((axes[1, 0], "ttft", 1.0, "TTFT (s)"),
                                    (axes[1, 1], "tpot", 1e3, "TPOT (ms)")):
        for r, name in shown:
            quantiles = r.outcome.cdf.get(metric) or []
            if quantiles and not math.isnan(quantiles[0]):
                fractions = [i / (len(quantiles) - 1) for i in range(len(quantiles))]
                ax.plot([scale * q for q in quantiles], fractions, label=name)
        _log_x(ax)
        ax.set_xlabel(unit + ", log scale")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{unit.split()[0]} CDF of the Pareto front"
                     + (f" (its {len(shown)} of highest {'capacity' if searched else 'goodput'})"
                        if len(shown) < len(front) else "")
                     + (" at capacity" if searched else ""), fontsize=10)
        ax.grid(alpha=0.3)
        if front:
            ax.legend(fontsize=7)
    fig.suptitle(f"SIMULATED: {title}" if title else "SIMULATED", fontsize=10)
    fig.tight_layout()
    path = directory / "whatif.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LABEL_LINES = 4
"""Names listed in one label of points that coincide; more are counted."""
CLOSE_PIXELS = 12
"""Points this close (in the figure, both ways) share one label."""


def _label_points(ax, points: Sequence[tuple[float, float, str]]) -> None:
    """One label per spot, listing every configuration whose point lies within a few pixels
    (points that coincide would otherwise print their names over each other), beside the spot
    on the side with more room."""
    ax.autoscale_view()
    to_pixels = ax.transData.transform
    spots: list[tuple[tuple[float, float], tuple[float, float], list[str]]] = []
    for x, y, name in points:
        px, py = to_pixels((x, y))
        for (sx, sy), _, group in spots:
            if abs(px - sx) <= CLOSE_PIXELS and abs(py - sy) <= CLOSE_PIXELS:
                group.append(name)
                break
        else:
            spots.append(((px, py), (x, y), [name]))
    low, high = ax.get_xlim()
    for _, (x, y), group in spots:
        if len(group) > LABEL_LINES:
            group = [*group[:LABEL_LINES - 1], f"and {len(group) - LABEL_LINES + 1} more"]
        right = x <= low + 2 * (high - low) / 3
        ax.annotate("\n".join(group), (x, y), fontsize=7, va="center",
                    ha="left" if right else "right", xytext=(9 if right else -9, 0),
                    textcoords="offset points", zorder=5,
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8,
                          "linewidth": 0})


def _log_x(ax) -> None:
    """A log x axis labelled in plain numbers at 1, 2 and 5 per decade (matplotlib's default
    labels every minor tick of a short range as 2x10^1, 3x10^1, ..., which overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    axis = ax.xaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _bars(summaries: Sequence[Summary], directory: Path, title: str) -> list[Path]:
    """``overview.png`` (key metrics per run) and ``slo_by_task.png``."""
    import matplotlib.pyplot as plt
    import numpy as np

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
