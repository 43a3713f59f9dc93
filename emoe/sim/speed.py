"""The machine's speed over a simulated run, against the profile it was measured in.

A served engine's loop cycles take some multiple of the profile's model of them, and on a
shared machine that multiple wanders: within one 24-s replay on the dev VM, one-second
windows ran x0.96-1.53 their model (lag-1 correlation 0.77), around x1.22 over the whole
replay. ``emoe fidelity --engine-speed served`` simulates the whole replay at its one overall
multiple; ``--engine-speed timeline`` at the multiple of each window, as measured during the
replay (``emoe.rpc.fidelity``): the slow patches that build the measured run's queues then
come at the same moments in the simulated one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from emoe.core.errors import ConfigError

PRIOR_S = 0.1
"""Seconds of modelled cycles a window's own speed must outweigh: a window in which the loop
was mostly idle keeps close to the run's overall speed."""


@dataclass(frozen=True, slots=True)
class SpeedTimeline:
    """From ``starts[i]`` (seconds from the run's start; the first is 0) on, the engine and the
    serving path take ``speeds[i]`` x their profile's time."""

    starts: tuple[float, ...]
    speeds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.speeds or len(self.starts) != len(self.speeds):
            raise ConfigError(f"engine speed: {len(self.starts)} window starts for "
                              f"{len(self.speeds)} speeds")
        if self.starts[0] != 0.0 or any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ConfigError("engine speed: window starts must ascend from 0, got "
                              f"{list(self.starts[:4])}...")
        for speed in self.speeds:
            if not (speed > 0 and math.isfinite(speed)):
                raise ConfigError(f"engine speed: must be a positive number, got {speed!r}")

    @classmethod
    def constant(cls, speed: float) -> SpeedTimeline:
        return cls((0.0,), (float(speed),))

    @classmethod
    def from_samples(cls, times: Sequence[float], cycle_s: Sequence[float],
                     modelled_s: Sequence[float], prior_s: float = PRIOR_S) -> SpeedTimeline:
        """From cumulative counters sampled during a run: at ``times[i]`` (seconds from its
        start) the loop's cycles had summed ``cycle_s[i]`` against ``modelled_s[i]`` of their
        model. Each window between samples runs at its own ratio, shrunk towards the run's
        overall one by ``prior_s`` seconds of modelled time; a window that closed no cycle
        (an idle loop) keeps the speed before it. The first window starts at 0, the last one
        lasts."""
        if len(times) < 2 or not (len(times) == len(cycle_s) == len(modelled_s)):
            raise ConfigError(f"engine speed: a timeline needs two or more samples of "
                              f"time, cycles and model alike, got {len(times)}")
        modelled = modelled_s[-1] - modelled_s[0]
        if modelled <= 0:
            raise ConfigError("engine speed: the loop ran no modelled cycle between the "
                              "samples")
        overall = (cycle_s[-1] - cycle_s[0]) / modelled
        starts, speeds = [], []
        for i in range(1, len(times)):
            cycles, model = cycle_s[i] - cycle_s[i - 1], modelled_s[i] - modelled_s[i - 1]
            if model <= 0:
                continue
            starts.append(0.0 if not starts else max(times[i - 1], starts[-1] + 1e-9))
            speeds.append((cycles + prior_s * overall) / (model + prior_s))
        return cls(tuple(starts), tuple(speeds))

    def window(self, t: float) -> int:
        """The window that time ``t`` falls in."""
        return max(0, bisect.bisect_right(self.starts, t) - 1)

    def next_change(self, window: int) -> float:
        """When the window after ``window`` starts (inf: never)."""
        return self.starts[window + 1] if window + 1 < len(self.starts) else math.inf

    @property
    def constant_speed(self) -> float | None:
        return self.speeds[0] if len(self.speeds) == 1 else None

    def describe(self) -> str:
        if len(self.speeds) == 1:
            return f"x{self.speeds[0]:.2f}"
        ordered = sorted(self.speeds)
        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        return (f"{len(self.speeds)} windows of ~{self.starts[1]:.1f} s, x{pct(0.1):.2f} "
                f"(p10) x{pct(0.5):.2f} (p50) x{pct(0.9):.2f} (p90)")
