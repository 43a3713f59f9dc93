"""Engine profile: step-time, PCIe and memory figures measured on a real engine.

``emoe profile`` (the torch engine) writes one; the simulator's cost model uses it in place of a
hardware preset's derived coefficients. The file is JSON, documented in docs/profile-format.md.
Every section is optional: a field present replaces the preset's value, a field absent keeps it.
Step-time coefficients are either given directly or fitted here from raw step samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emoe.core.errors import ConfigError
from emoe.core.specs import HardwareSpec, ModelSpec

PROFILE_FORMAT = "emoe-engine-profile"
PROFILE_VERSION = 1

STEP_TIME_FIELDS = ("step_overhead_s", "prefill_s_per_token", "decode_s_per_token",
                    "attention_s_per_context_token")
_PCIE_FIELDS = {"bandwidth_bytes_per_s": "pcie_bandwidth_bytes_per_s",
                "latency_s": "pcie_latency_s"}
_MEMORY_FIELDS = ("gpu_memory_bytes", "non_expert_bytes", "expert_bytes", "kv_bytes_per_token")


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured engine step."""

    prefill_tokens: int
    decode_tokens: int
    context_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """A parsed profile. ``None`` means "not measured: keep the preset's value"."""

    model: str = ""
    device: str = ""
    provenance: str = ""
    step_time: dict[str, float] = field(default_factory=dict)
    hbm_bandwidth_bytes_per_s: float | None = None
    pcie_bandwidth_bytes_per_s: float | None = None
    pcie_latency_s: float | None = None
    predictor_s: float | None = None
    memory: dict[str, int] = field(default_factory=dict)
    samples: tuple[StepSample, ...] = ()

    def coefficients(self) -> dict[str, float]:
        """Step-time coefficients: those given, else a fit of the samples, else none."""
        if self.step_time:
            return dict(self.step_time)
        if self.samples:
            return fit_step_time(self.samples)
        return {}

    def apply(self, hardware: HardwareSpec, model: ModelSpec) -> tuple[HardwareSpec, ModelSpec]:
        """The preset pair with every measured figure substituted."""
        hw: dict[str, object] = dict(self.coefficients())
        if hw:
            # Measured step times already include the weight read at the profiled residency.
            hw["hbm_bandwidth_bytes_per_s"] = self.hbm_bandwidth_bytes_per_s or 0.0
        for name in ("pcie_bandwidth_bytes_per_s", "pcie_latency_s", "predictor_s"):
            value = getattr(self, name)
            if value is not None:
                hw[name] = value
        if "gpu_memory_bytes" in self.memory:
            hw["gpu_memory_bytes"] = self.memory["gpu_memory_bytes"]
        source = f"engine profile ({self.device or 'unknown device'}): {self.provenance}"
        hw["provenance"] = f"{source}; unmeasured fields from preset {hardware.name}"
        new_model = model
        model_fields = {k: v for k, v in self.memory.items() if k != "gpu_memory_bytes"}
        if model_fields:
            new_model = dataclasses.replace(
                model, **model_fields, provenance=f"{model.provenance}; memory from {source}")
        return dataclasses.replace(hardware, **hw), new_model

    def to_json(self) -> dict:
        doc: dict[str, object] = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION,
                                  "model": self.model, "device": self.device,
                                  "provenance": self.provenance}
        if self.step_time or self.hbm_bandwidth_bytes_per_s is not None:
            doc["step_time"] = dict(self.step_time)
            if self.hbm_bandwidth_bytes_per_s is not None:
                doc["step_time"]["hbm_bandwidth_bytes_per_s"] = self.hbm_bandwidth_bytes_per_s
        if self.samples:
            doc["samples"] = [dataclasses.asdict(s) for s in self.samples]
        pcie = {k: getattr(self, attr) for k, attr in _PCIE_FIELDS.items()
                if getattr(self, attr) is not None}
        if pcie:
            doc["pcie"] = pcie
        if self.memory:
            doc["memory"] = dict(self.memory)
        if self.predictor_s is not None:
            doc["predictor_s"] = self.predictor_s
        return doc


def fit_step_time(samples: "list[StepSample] | tuple[StepSample, ...]") -> dict[str, float]:
    """Non-negative least-squares fit of the linear step-time model to measured steps."""
    if len(samples) < len(STEP_TIME_FIELDS):
        raise ConfigError(f"profile samples: need at least {len(STEP_TIME_FIELDS)} steps to fit "
                          f"{', '.join(STEP_TIME_FIELDS)}; got {len(samples)}")
    from scipy.optimize import nnls

    a = np.array([[1.0, s.prefill_tokens, s.decode_tokens, s.context_tokens] for s in samples])
    b = np.array([s.seconds for s in samples])
    coef, _ = nnls(a, b)
    return dict(zip(STEP_TIME_FIELDS, map(float, coef)))


def write_profile(profile: EngineProfile, path: "str | Path") -> None:
    Path(path).write_text(json.dumps(profile.to_json(), indent=2) + "\n")


def load_profile(path: "str | Path") -> EngineProfile:
    """Parse and validate a profile file; errors name the file and the field."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: profile file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"{path}: field 'format' must be {PROFILE_FORMAT!r}")
    if doc.get("version") != PROFILE_VERSION:
        raise ConfigError(f"{path}: field 'version': {doc.get('version')!r} is not supported; "
                          f"expected {PROFILE_VERSION}")

    def number(where: str, value: object, integer: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (integer and value != int(value)):
            kind = "a non-negative integer" if integer else "a non-negative number"
            raise ConfigError(f"{path}: field {where!r}: {value!r} is not {kind}")
        return int(value) if integer else float(value)

    def section(name: str) -> dict:
        value = doc.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: field {name!r} must be an object")
        return value

    step = section("step_time")
    unknown = set(step) - set(STEP_TIME_FIELDS) - {"hbm_bandwidth_bytes_per_s"}
    if unknown:
        raise ConfigError(f"{path}: step_time: unknown field(s) {sorted(unknown)}; valid: "
                          f"{', '.join(STEP_TIME_FIELDS)}, hbm_bandwidth_bytes_per_s")
    coefficients = {k: number(f"step_time.{k}", step[k]) for k in STEP_TIME_FIELDS if k in step}
    if coefficients and len(coefficients) != len(STEP_TIME_FIELDS):
        missing = [k for k in STEP_TIME_FIELDS if k not in coefficients]
        raise ConfigError(f"{path}: step_time: missing {', '.join(missing)} "
                          "(give all four coefficients, or none and raw samples to fit)")
    hbm = step.get("hbm_bandwidth_bytes_per_s")

    raw_samples = doc.get("samples", [])
    if not isinstance(raw_samples, list):
        raise ConfigError(f"{path}: field 'samples' must be a list")
    samples = []
    for i, s in enumerate(raw_samples):
        if not isinstance(s, dict):
            raise ConfigError(f"{path}: samples[{i}] must be an object")
        for k in ("prefill_tokens", "decode_tokens", "context_tokens", "seconds"):
            if k not in s:
                raise ConfigError(f"{path}: samples[{i}]: missing field {k!r}")
        samples.append(StepSample(
            prefill_tokens=int(number(f"samples[{i}].prefill_tokens", s["prefill_tokens"], True)),
            decode_tokens=int(number(f"samples[{i}].decode_tokens", s["decode_tokens"], True)),
            context_tokens=int(number(f"samples[{i}].context_tokens", s["context_tokens"], True)),
            seconds=number(f"samples[{i}].seconds", s["seconds"])))

    pcie = section("pcie")
    memory = section("memory")
    unknown = set(memory) - set(_MEMORY_FIELDS)
    if unknown:
        raise ConfigError(f"{path}: memory: unknown field(s) {sorted(unknown)}; valid: "
                          f"{', '.join(_MEMORY_FIELDS)}")
    profile = EngineProfile(
        model=str(doc.get("model", "")),
        device=str(doc.get("device", "")),
        provenance=str(doc.get("provenance", "")),
        step_time=coefficients,
        hbm_bandwidth_bytes_per_s=None if hbm is None else number("step_time.hbm_bandwidth_bytes_per_s", hbm),
        pcie_bandwidth_bytes_per_s=(None if "bandwidth_bytes_per_s" not in pcie else
                                    number("pcie.bandwidth_bytes_per_s", pcie["bandwidth_bytes_per_s"])),
        pcie_latency_s=None if "latency_s" not in pcie else number("pcie.latency_s", pcie["latency_s"]),
        predictor_s=None if "predictor_s" not in doc else number("predictor_s", doc["predictor_s"]),
        memory={k: int(number(f"memory.{k}", v, True)) for k, v in memory.items()},
        samples=tuple(samples),
    )
    if profile.pcie_bandwidth_bytes_per_s == 0:
        raise ConfigError(f"{path}: field 'pcie.bandwidth_bytes_per_s' must be positive")
    if samples and not coefficients:
        try:
            profile.coefficients()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return profile
