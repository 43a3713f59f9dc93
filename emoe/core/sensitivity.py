"""Measured layer sensitivity: how much a task loses when a MoE layer's routing goes wrong.

``emoe sensitivity`` (emoe/engine/sensitivity.py) runs a task's prompts on the real engine with
every expert resident, then again with one layer (single-layer ablation) or the first j layers
(the paper's progressive method, from the input side) restricted to ``m`` resident experts,
tokens rerouted to the best resident ones. Each run is one ``Measurement``: the task's loss
against the all-experts output (``metric``: greedy-token agreement or task quality) and the
share of the restricted layers' router choices that fell outside the kept experts (``miss``).
A ``SensitivityProfile`` holds the measurements with their provenance and derives per task
and layer:

- ``binary`` s in {0, 1} (the paper): progressive: the input-side layers that can all be
  restricted together with a loss <= ``threshold`` are insensitive (0), the rest 1;
  single-layer: a layer is sensitive when restricting it alone loses more than ``threshold``.
  Both use the smallest slot count measured.
- ``graded`` s >= 0: the loss per unit of missed routing mass, fitted by least squares through
  the origin over the slot counts measured for that layer alone (``loss ~ s * miss``). Its unit
  makes layers comparable, so Eq. 2 with graded s ranks experts of different layers by the
  loss their absence causes: what the per-layer slot allocation (``emoe.core.allocation``)
  needs. Without single-layer measurements, the progressive runs' successive loss differences
  stand in for each layer's own.

The file (``"format": "emoe-sensitivity"``) is JSON; every error names the file and field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emoe.core.errors import ConfigError
from emoe.core.paths import resolve_path

SENSITIVITY_FORMAT = "emoe-sensitivity"
SENSITIVITY_VERSION = 1
METHODS = ("single-layer", "progressive")
METRICS = ("agreement", "quality")
MODES = ("graded", "binary")


@dataclass(frozen=True, slots=True)
class Measurement:
    """One run: ``task``'s prompts with ``layers`` restricted to ``slots`` resident experts.

    ``agreement``: share of the all-experts greedy tokens reproduced; ``quality``: the task's
    own metric (the all-experts quality is the profile's ``baseline``); ``miss``: share of the
    restricted layers' router choices, over the all-experts run's tokens, outside the kept
    experts.
    """

    task: str
    method: str
    layers: tuple[int, ...]
    slots: int
    agreement: float
    quality: float
    miss: float


@dataclass(slots=True)
class SensitivityProfile:
    """Measurements of one model's layer sensitivity per task, with provenance."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    metric: str = "agreement"
    threshold: float = 0.05
    baseline: dict[str, float] = field(default_factory=dict)   # task -> all-experts quality
    measurements: list[Measurement] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"sensitivity: metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"sensitivity: threshold {self.threshold}: a loss in [0, 1]")

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(m.task for m in self.measurements))

    def loss(self, m: Measurement) -> float:
        """The measurement's loss in ``metric`` against all experts (clipped at 0)."""
        if self.metric == "agreement":
            return max(0.0, 1.0 - m.agreement)
        return max(0.0, self.baseline.get(m.task, 1.0) - m.quality)

    def _runs(self, task: str, method: str) -> list[Measurement]:
        return [m for m in self.measurements if m.task == task and m.method == method]

    def binary(self, task: str) -> list[float]:
        """s in {0, 1} per layer: progressive if measured, else single-layer (see module)."""
        progressive = self._runs(task, "progressive")
        runs = progressive or self._runs(task, "single-layer")
        if not runs:
            raise ConfigError(f"sensitivity: no measurements for task {task!r}")
        fewest = min(m.slots for m in runs)
        runs = [m for m in runs if m.slots == fewest]
        s = [1.0] * self.num_layers
        if progressive:
            for m in sorted(runs, key=lambda m: len(m.layers)):
                if self.loss(m) > self.threshold:
                    break
                for layer in m.layers:
                    s[layer] = 0.0
        else:
            for m in runs:
                s[m.layers[0]] = 1.0 if self.loss(m) > self.threshold else 0.0
        return s

    def graded(self, task: str) -> list[float]:
        """Loss per unit of missed routing mass per layer (see module)."""
        single = self._runs(task, "single-layer")
        if single:
            pairs: dict[int, list[tuple[float, float]]] = {}
            for m in single:
                pairs.setdefault(m.layers[0], []).append((self.loss(m), m.miss))
        else:
            pairs = self._progressive_increments(task)
        s = []
        for layer in range(self.num_layers):
            points = pairs.get(layer, [])
            denominator = sum(miss * miss for _, miss in points)
            s.append(max(0.0, sum(loss * miss for loss, miss in points) / denominator)
                     if denominator > 0 else 0.0)
        return s

    def _progressive_increments(self, task: str) -> dict[int, list[tuple[float, float]]]:
        runs = self._runs(task, "progressive")
        if not runs:
            raise ConfigError(f"sensitivity: no measurements for task {task!r}")
        pairs: dict[int, list[tuple[float, float]]] = {}
        for slots in sorted({m.slots for m in runs}):
            previous = 0.0
            for m in sorted((m for m in runs if m.slots == slots), key=lambda m: len(m.layers)):
                loss = self.loss(m)
                pairs.setdefault(max(m.layers), []).append((max(0.0, loss - previous), m.miss))
                previous = max(previous, loss)
        return pairs

    def table(self, mode: str = "graded") -> dict[str, list[float]]:
        """Per task, per-layer s: ``graded`` or ``binary``."""
        if mode not in MODES:
            raise ConfigError(f"sensitivity mode {mode!r}; valid: {', '.join(MODES)}")
        pick = self.graded if mode == "graded" else self.binary
        return {task: [round(v, 6) for v in pick(task)] for task in self.tasks}

    def source(self, mode: str, path: str | Path | None = None) -> dict[str, Any]:
        """What a policy file records of where its sensitivity table came from."""
        return {"mode": mode, "file": None if path is None else str(path), "model": self.model,
                "metric": self.metric, "threshold": self.threshold, **self.provenance}

    # -- files --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": SENSITIVITY_FORMAT, "version": SENSITIVITY_VERSION,
                "model": self.model, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "metric": self.metric,
                "threshold": self.threshold, "provenance": self.provenance,
                "baseline": self.baseline,
                "graded": self.table("graded") if self.measurements else {},
                "binary": self.table("binary") if self.measurements else {},
                "measurements": [_measurement_to_dict(m) for m in self.measurements]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "sensitivity") -> "SensitivityProfile":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a JSON object is needed")
        if data.get("format") != SENSITIVITY_FORMAT:
            raise ConfigError(f"{where}: field 'format': expected {SENSITIVITY_FORMAT!r}, "
                              f"got {data.get('format')!r}")
        if data.get("version") != SENSITIVITY_VERSION:
            raise ConfigError(f"{where}: field 'version': this emoe reads version "
                              f"{SENSITIVITY_VERSION}, got {data.get('version')!r}")
        try:
            shape = [int(data[k]) for k in ("num_layers", "num_experts", "top_k")]
            profile = cls(model=str(data["model"]), num_layers=shape[0], num_experts=shape[1],
                          top_k=shape[2], metric=data.get("metric", "agreement"),
                          threshold=float(data.get("threshold", 0.05)),
                          baseline={str(k): float(v)
                                    for k, v in data.get("baseline", {}).items()},
                          provenance=dict(data.get("provenance", {})))
        except KeyError as exc:
            raise ConfigError(f"{where}: field {exc.args[0]!r}: missing") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        rows = data.get("measurements")
        if not isinstance(rows, list) or not rows:
            raise ConfigError(f"{where}: field 'measurements': a non-empty list is needed")
        profile.measurements = [_measurement_from_dict(row, profile, f"{where}: field "
                                                       f"'measurements[{i}]'")
                                for i, row in enumerate(rows)]
        return profile

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> "SensitivityProfile":
        """Read a sensitivity file (a relative path not found here is looked up in the
        repository, as the shipped traces/ files are named)."""
        path = resolve_path(path)
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read sensitivity file: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        return cls.from_dict(data, where=str(path))


def _measurement_to_dict(m: Measurement) -> dict[str, Any]:
    row = asdict(m)
    row["layers"] = list(m.layers)
    return row


def _measurement_from_dict(row: Any, profile: SensitivityProfile, where: str) -> Measurement:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: an object is needed")
    try:
        m = Measurement(task=str(row["task"]), method=str(row["method"]),
                        layers=tuple(int(v) for v in row["layers"]), slots=int(row["slots"]),
                        agreement=float(row["agreement"]), quality=float(row["quality"]),
                        miss=float(row["miss"]))
    except KeyError as exc:
        raise ConfigError(f"{where}: field {exc.args[0]!r} missing") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if m.method not in METHODS:
        raise ConfigError(f"{where}: method {m.method!r}; valid: {', '.join(METHODS)}")
    if not m.layers or min(m.layers) < 0 or max(m.layers) >= profile.num_layers:
        raise ConfigError(f"{where}: layers {list(m.layers)} outside 0..{profile.num_layers - 1}")
    if m.method == "single-layer" and len(m.layers) != 1:
        raise ConfigError(f"{where}: a single-layer measurement restricts one layer, "
                          f"got {list(m.layers)}")
    if not 1 <= m.slots <= profile.num_experts:
        raise ConfigError(f"{where}: slots {m.slots} outside 1..{profile.num_experts}")
    for name in ("agreement", "quality", "miss"):
        value = getattr(m, name)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"{where}: {name} {value} outside [0, 1]")
    return m


def load_sensitivity(path: str | Path, mode: str, num_layers: int,
                     tasks: Sequence[str]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The per-task table of a sensitivity file, checked against a model and task list, and
    the provenance a policy file records with it."""
    profile = SensitivityProfile.from_file(path)
    if profile.num_layers != num_layers:
        raise ConfigError(f"{path}: measured on {profile.model} with {profile.num_layers} MoE "
                          f"layers; this model has {num_layers}")
    table = profile.table(mode)
    unknown = sorted(set(table) - set(tasks))
    if unknown:
        raise ConfigError(f"{path}: task {unknown[0]!r} is not one of the policy's tasks "
                          f"({', '.join(tasks)})")
    return table, profile.source(mode, path)

