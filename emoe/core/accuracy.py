"""The accuracy proxy, calibrated: from the simulator's weighted hit share to measured accuracy.

The simulator cannot run the model, so it reports an accuracy *proxy*: the share of router
choices served by their own expert, each layer weighted by the task's sensitivity s (a fetched
miss counts as served). A calibration says what a proxy value means on a model:
``emoe calibrate-proxy`` (emoe/sim/calibrate.py) replays in the simulator the runs ``emoe eval``
measured (same model, prompts, planner, budget, per-layer slots and warm start), and fits
``metric ~ intercept + slope * proxy`` (least squares) of eval's measured agreement and task
quality on the *simulator's* proxy, keeping the Pearson r.

The calibration embeds the sensitivity table its proxy was weighted with. A simulation that
uses the calibration weighs its proxy with that table, whatever sensitivity its planner uses:
the fit holds for those weights only (and for the model, the task mix and the replayed routing
it was measured with; the file records them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emoe.core.errors import ConfigError

CALIBRATION_FORMAT = "emoe-accuracy-calibration"
CALIBRATION_VERSION = 2
METRICS = ("agreement", "quality")


@dataclass(frozen=True, slots=True)
class LinearFit:
    intercept: float
    slope: float
    r: float

    def __call__(self, proxy: float) -> float:
        return min(1.0, max(0.0, self.intercept + self.slope * proxy))


@dataclass(slots=True)
class AccuracyCalibration:
    """Per metric, a linear fit of the metric on the simulator's proxy; the sensitivity table
    that weighs the proxy; the runs it came from (``points``: each with ``proxy``, the
    simulator's, and what eval measured)."""

    model: str
    fits: dict[str, LinearFit]
    sensitivity: dict[str, list[float]]
    sensitivity_source: dict[str, Any] = field(default_factory=dict)
    routing: str = ""
    points: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def predict(self, proxy: float) -> dict[str, float]:
        return {metric: fit(proxy) for metric, fit in self.fits.items()}

    def describe(self) -> str:
        fits = "; ".join(f"{m} = {f.intercept:+.3f} + {f.slope:.3f} x proxy (r = {f.r:.3f})"
                         for m, f in self.fits.items())
        return (f"{len(self.points)} `emoe eval` runs of {self.model or 'the model'} replayed in "
                f"the simulator: {fits}")

    def weights(self) -> str:
        """Which sensitivity weighs the proxy, in words."""
        source = self.sensitivity_source
        if not source:
            return "the calibration's sensitivity table"
        return (f"{source.get('mode', 'graded')} s measured on {source.get('model', '?')} "
                f"({source.get('file', 'file not recorded')})")

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
                "model": self.model, "proxy": "simulator", "routing": self.routing,
                "fits": {m: asdict(f) for m, f in self.fits.items()},
                "sensitivity": self.sensitivity, "sensitivity_source": self.sensitivity_source,
                "points": self.points, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> "AccuracyCalibration":
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise ConfigError(f"{where}: field 'format': expected {CALIBRATION_FORMAT!r}")
        if data.get("version") == 1:
            raise ConfigError(f"{where}: field 'version': version 1 was fitted on the engine's "
                              f"own proxy, not the simulator's; refit it with `emoe "
                              f"calibrate-proxy` (docs/offloading.md)")
        if data.get("version") != CALIBRATION_VERSION:
            raise ConfigError(f"{where}: field 'version': this emoe reads version "
                              f"{CALIBRATION_VERSION}, got {data.get('version')!r}")
        try:
            fits = {m: LinearFit(float(f["intercept"]), float(f["slope"]), float(f["r"]))
                    for m, f in data["fits"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{where}: field 'fits': {{metric: {{intercept, slope, r}}}} is "
                              f"needed ({exc})") from None
        if not fits or set(fits) - set(METRICS):
            raise ConfigError(f"{where}: field 'fits': metrics are {', '.join(METRICS)}")
        sensitivity = data.get("sensitivity")
        if not isinstance(sensitivity, dict) or not sensitivity or not all(
                isinstance(v, list) and all(isinstance(x, (int, float)) and x >= 0 for x in v)
                for v in sensitivity.values()):
            raise ConfigError(f"{where}: field 'sensitivity': {{task: [s per layer >= 0]}} is "
                              f"needed (the table that weighs the proxy)")
        return cls(model=str(data.get("model", "")), fits=fits,
                   sensitivity={t: [float(x) for x in v] for t, v in sensitivity.items()},
                   sensitivity_source=dict(data.get("sensitivity_source") or {}),
                   routing=str(data.get("routing", "")),
                   points=list(data.get("points", [])),
                   provenance=dict(data.get("provenance", {})))

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> "AccuracyCalibration":
        return cls.from_dict(read_json(path, "calibration file"), where=str(path))


def read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return LinearFit(my - slope * mx, slope, pearson(xs, ys))


def fit_calibration(points: Sequence[Mapping[str, Any]], sensitivity: Mapping[str, Sequence[float]],
                    model: str = "", sensitivity_source: Mapping[str, Any] | None = None,
                    routing: str = "", provenance: Mapping[str, Any] | None = None
                    ) -> AccuracyCalibration:
    """Fit from runs each with ``proxy`` (the simulator's, weighted by ``sensitivity``) and
    eval's measured ``agreement`` and ``quality``; every other key of a point is kept."""
    kept = []
    for i, point in enumerate(points):
        try:
            kept.append({**point, "proxy": float(point["proxy"]),
                         "agreement": float(point["agreement"]),
                         "quality": float(point["quality"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"run {i}: proxy, agreement and quality are needed ({exc})") from None
    if len(kept) < 3 or len({p["proxy"] for p in kept}) < 2:
        raise ConfigError(f"calibration: {len(kept)} runs with distinct proxies; at least 3 "
                          f"runs and 2 distinct proxy values are needed")
    xs = [p["proxy"] for p in kept]
    fits = {m: fit_line(xs, [p[m] for p in kept]) for m in METRICS}
    return AccuracyCalibration(model=model, fits=fits,
                               sensitivity={t: [float(v) for v in s]
                                            for t, s in sensitivity.items()},
                               sensitivity_source=dict(sensitivity_source or {}),
                               routing=routing, points=kept, provenance=dict(provenance or {}))
