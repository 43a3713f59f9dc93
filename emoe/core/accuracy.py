"""The accuracy proxy, calibrated: from a sensitivity-weighted hit share to measured accuracy.

The simulator cannot run the model, so it reports an accuracy *proxy*: the share of router
choices served by their own expert, each layer weighted by the task's sensitivity s (a fetched
miss counts as served). ``emoe eval`` measures the same proxy on the real engine next to greedy
agreement and task quality, for each planner, budget and per-layer allocation. A calibration
fits ``metric ~ intercept + slope * proxy`` (least squares) over such runs and keeps the
Pearson r, so the simulator can print an agreement and a quality estimate and say how far to
trust them. The fit holds for the model, the sensitivity table and the task mix it was
measured with; the file records them.

    emoe calibrate-proxy eval-rows.json [more.json ...] -o calibration.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emoe.core.errors import ConfigError

CALIBRATION_FORMAT = "emoe-accuracy-calibration"
CALIBRATION_VERSION = 1
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
    """Per metric, a linear fit of the metric on the proxy, with the runs it came from."""

    model: str
    fits: dict[str, LinearFit]
    points: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def predict(self, proxy: float) -> dict[str, float]:
        return {metric: fit(proxy) for metric, fit in self.fits.items()}

    def describe(self) -> str:
        fits = "; ".join(f"{m} = {f.intercept:+.3f} + {f.slope:.3f} x proxy (r = {f.r:.3f})"
                         for m, f in self.fits.items())
        return f"{len(self.points)} `emoe eval` runs of {self.model or 'the model'}: {fits}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
                "model": self.model, "fits": {m: asdict(f) for m, f in self.fits.items()},
                "points": self.points, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> "AccuracyCalibration":
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise ConfigError(f"{where}: field 'format': expected {CALIBRATION_FORMAT!r}")
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
        return cls(model=str(data.get("model", "")), fits=fits,
                   points=list(data.get("points", [])),
                   provenance=dict(data.get("provenance", {})))

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> "AccuracyCalibration":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read calibration file: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        return cls.from_dict(data, where=str(path))


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
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


def fit_calibration(rows: Sequence[dict[str, Any]], model: str = "",
                    provenance: dict[str, Any] | None = None) -> AccuracyCalibration:
    """Fit from ``emoe eval --json`` rows (each with ``proxy``, ``agreement``, ``quality``)."""
    points = []
    for i, row in enumerate(rows):
        try:
            points.append({"planner": str(row["planner"]), "budget": float(row["budget"]),
                           "slots_per_layer": list(row.get("slots_per_layer", [])),
                           "sensitivity": str(row.get("sensitivity", "hand-set")),
                           "proxy": float(row["proxy"]), "agreement": float(row["agreement"]),
                           "quality": float(row["quality"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"eval row {i}: planner, budget, proxy, agreement and quality "
                              f"are needed ({exc})") from None
    if len(points) < 3 or len({p["proxy"] for p in points}) < 2:
        raise ConfigError(f"calibration: {len(points)} runs with distinct proxies; at least 3 "
                          f"runs and 2 distinct proxy values are needed")
    xs = [p["proxy"] for p in points]
    fits = {m: fit_line(xs, [p[m] for p in points]) for m in METRICS}
    return AccuracyCalibration(model=model, fits=fits, points=points,
                               provenance=dict(provenance or {}))


# ---------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rows", nargs="+", type=Path, help="`emoe eval --json` files")
    p.add_argument("-o", "--output", type=Path, required=True, help="calibration file to write")
    p.add_argument("--model", default="", help="the model the runs are of (recorded)")


def run(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for path in args.rows:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a list of `emoe eval --json` rows is needed")
        rows += [r for r in data if r.get("planner") not in ("all", "lru")]
    calibration = fit_calibration(rows, args.model,
                                  {"rows": [str(p) for p in args.rows],
                                   "excluded": "planners all and lru (exact by construction)"})
    calibration.to_file(args.output)
    print(f"calibration: {calibration.describe()}; wrote {args.output}")
    return 0
