"""The policy file: everything the scheduler is configured by, as one JSON document.

The simulator's what-if search writes one (``PolicyConfig.to_file``); the gRPC server loads
it unchanged (``PolicyConfig.from_file``) and builds the same ``Scheduler`` from it. Every field
is checked on load; an error names the file and the field and says what is accepted.

    {"format": "emoe-policy", "version": 1,
     "scheduling": "emoe", "planner": "emoe", "predictor": "frequency",
     "prediction_interval": 40, "experts_per_layer": 6, "expert_budget_bytes": null,
     "memory_budget_bytes": null, "max_batch_tokens": 4096, "max_num_seqs": 128,
     "admission_lookahead": 16, "model": "mixtral-8x7b",
     "model_shape": {"num_layers": 32, "num_experts": 8, "top_k": 2, "hidden_size": 4096},
     "sensitivity": {"qa": [0, 0, 1, ...]}, "sensitivity_source": null,
     "slot_allocation": "sensitivity", "min_experts_per_layer": null,
     "adaptive_interval": false, "random_seed": 0,
     "expert_frequencies": null,
     "tasks": {"qa": {"mean_output_tokens": 32, "slo": {"ttft_s": 2.0, "tpot_s": 0.15},
                      "insensitive_fraction": 0.5, "sensitivity": null, "keywords": [...]}}}
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.request import SLO
from emoe.core.specs import ModelSpec
from emoe.core.tasks import DEFAULT_TASKS, TaskProfile

POLICY_FORMAT = "emoe-policy"
POLICY_VERSION = 1
SLOT_ALLOCATIONS = ("sensitivity", "uniform")


@dataclass(slots=True)
class PolicyConfig:
    """Scheduling policy, expert planner and their parameters, SLOs and task profiles.

    ``experts_per_layer`` (L: one int, or one per layer) or ``expert_budget_bytes`` sets the
    expert slots of every planner but ``all``; L wins when both are given. A budget is spread
    evenly over the layers, the remainder going to the layers nearest the output.
    ``memory_budget_bytes`` defaults to the GPU's memory. ``sensitivity`` overrides a task's
    per-layer sensitivity; ``sensitivity_source`` records where a measured table came from
    (``emoe sensitivity``'s file and provenance; null: the task profiles' hand-set defaults or
    a table given by hand). ``slot_allocation``: ``sensitivity`` lets the ``emoe`` and
    ``predict-every`` planners split the slots over the layers at every prediction
    (``emoe.core.allocation``), each layer keeping at least ``min_experts_per_layer`` (null:
    the model's top-k); ``uniform``, or an ``experts_per_layer`` list (forced per layer),
    keeps L per layer. ``adaptive_interval`` adapts p to the
    observed hit rate; ``random_seed`` draws the ``random`` planner's experts.
    ``expert_frequencies`` (``[layers][experts]``) pins ``static``.
    """

    scheduling: str = "fcfs"
    planner: str = "all"
    predictor: str = "frequency"
    prediction_interval: int = 40
    experts_per_layer: int | list[int] | None = None
    expert_budget_bytes: int | None = None
    memory_budget_bytes: int | None = None
    max_batch_tokens: int = 4096
    max_num_seqs: int = 128
    admission_lookahead: int = 16
    model: str = ""
    model_shape: dict[str, int] | None = None
    sensitivity: dict[str, list[float]] = field(default_factory=dict)
    sensitivity_source: dict[str, Any] | None = None
    slot_allocation: str = "sensitivity"
    min_experts_per_layer: int | None = None
    adaptive_interval: bool = False
    random_seed: int = 0
    expert_frequencies: list[list[float]] | None = None
    tasks: dict[str, TaskProfile] = field(default_factory=lambda: dict(DEFAULT_TASKS))

    def __post_init__(self) -> None:
        self.validate()

    @property
    def serves_with_expert_cache(self) -> bool:
        """Whether an engine serves this policy through an expert cache and its handler
        (``OffloadedExperts``): every planner but ``all`` does."""
        return self.planner != "all"

    # -- validation ---------------------------------------------------------------------------

    def validate(self, where: str = "policy") -> None:
        """Check names and ranges (not the model fit: see ``slots_per_layer``)."""
        from emoe.core.experts import PLANNERS
        from emoe.core.policies import POLICIES
        from emoe.core.predictor import PREDICTOR_LOADERS, PREDICTORS, known_predictor

        for fname, registry, kind in (("scheduling", POLICIES, "scheduling policy"),
                                      ("planner", PLANNERS, "expert planner")):
            if getattr(self, fname) not in registry:
                raise UnknownNameError(kind, getattr(self, fname), list(registry),
                                       where=f"{where}: field {fname!r}")
        if not known_predictor(self.predictor):
            raise UnknownNameError("predictor", self.predictor,
                                   [*PREDICTORS, *(f"{p}:FILE" for p in PREDICTOR_LOADERS)],
                                   where=f"{where}: field 'predictor'")
        for fname in ("prediction_interval", "max_batch_tokens", "max_num_seqs",
                      "admission_lookahead"):
            _positive_int(getattr(self, fname), where, fname)
        for fname in ("expert_budget_bytes", "memory_budget_bytes"):
            if getattr(self, fname) is not None:
                _positive_int(getattr(self, fname), where, fname)
        if self.max_num_seqs > self.max_batch_tokens:
            raise ConfigError(f"{where}: field 'max_num_seqs': {self.max_num_seqs} exceeds "
                              f"max_batch_tokens ({self.max_batch_tokens}); every running "
                              f"request decodes one token per iteration")
        per_layer = self.experts_per_layer
        if isinstance(per_layer, list):
            for i, value in enumerate(per_layer):
                _positive_int(value, where, f"experts_per_layer[{i}]")
        elif per_layer is not None:
            _positive_int(per_layer, where, "experts_per_layer")
        if not self.tasks:
            raise ConfigError(f"{where}: field 'tasks': at least one task profile is needed")
        for task, values in self.sensitivity.items():
            if task not in self.tasks:
                raise UnknownNameError("task", task, list(self.tasks),
                                       where=f"{where}: field 'sensitivity'")
            if not all(_number(v) and v >= 0 for v in values):
                raise ConfigError(f"{where}: field 'sensitivity.{task}': values must be "
                                  f"numbers >= 0, got {values}")
        if self.slot_allocation not in SLOT_ALLOCATIONS:
            raise UnknownNameError("slot allocation", self.slot_allocation, SLOT_ALLOCATIONS,
                                   where=f"{where}: field 'slot_allocation'")
        if self.min_experts_per_layer is not None:
            _positive_int(self.min_experts_per_layer, where, "min_experts_per_layer")
        if not isinstance(self.adaptive_interval, bool):
            raise ConfigError(f"{where}: field 'adaptive_interval': true or false is needed")
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int):
            raise ConfigError(f"{where}: field 'random_seed': an integer is needed")
        if self.sensitivity_source is not None and not isinstance(self.sensitivity_source, dict):
            raise ConfigError(f"{where}: field 'sensitivity_source': an object or null")
        if self.model_shape is not None and not (
                isinstance(self.model_shape, dict) and all(
                    k in ("num_layers", "num_experts", "top_k", "hidden_size")
                    and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in self.model_shape.items())):
            raise ConfigError(f"{where}: field 'model_shape': an object of num_layers, "
                              f"num_experts, top_k, hidden_size (integers) is needed")
        if self.expert_frequencies is not None:
            rows = self.expert_frequencies
            if not rows or len({len(r) for r in rows}) != 1 or not all(
                    _number(v) and v >= 0 for r in rows for v in r):
                raise ConfigError(f"{where}: field 'expert_frequencies': a [layers][experts] "
                                  f"table of numbers >= 0 is needed")

    # -- the model it is for ------------------------------------------------------------------

    def check_model(self, model: ModelSpec) -> None:
        """Refuse ``model`` when the policy was tuned for another: by name, or by shape
        (``model_shape``: layers, experts, top-k, hidden size) when it records one."""
        shape = model_shape(model)
        ours = self.model_shape or {}
        differs = [f"{k} {ours[k]} vs {v}" for k, v in shape.items()
                   if k in ours and v and ours[k] != v]
        if (self.model and model.name and self.model != model.name) or differs:
            described = _shape(ours) if ours else "shape not recorded"
            raise ConfigError(
                f"policy: field 'model': tuned for {self.model!r} ({described}), used with "
                f"{model.name!r} ({_shape(shape)})"
                + (f": {', '.join(differs)} (policy vs model)" if differs else "")
                + "; export a policy for this model: emoe sim --model DIR --export-policy FILE")

    # -- derived values -----------------------------------------------------------------------

    def slots_per_layer(self, model: ModelSpec) -> np.ndarray:
        """L per layer for ``model``: ``[layers]`` ints in 1..num_experts."""
        layers, experts = model.num_layers, model.num_experts
        if self.planner == "all":
            return np.full(layers, experts, dtype=np.int64)
        if isinstance(self.experts_per_layer, list):
            if len(self.experts_per_layer) != layers:
                raise ConfigError(f"policy: field 'experts_per_layer': "
                                  f"{len(self.experts_per_layer)} values for a model with "
                                  f"{layers} layers")
            slots = np.asarray(self.experts_per_layer, dtype=np.int64)
        elif self.experts_per_layer is not None:
            slots = np.full(layers, self.experts_per_layer, dtype=np.int64)
        elif self.expert_budget_bytes is not None:
            total = min(self.expert_budget_bytes // model.expert_bytes, layers * experts)
            slots = np.full(layers, total // layers, dtype=np.int64)
            slots[layers - total % layers:] += 1 if total % layers else 0
            if slots.min() < 1:
                raise ConfigError(
                    f"policy: field 'expert_budget_bytes': {self.expert_budget_bytes} B holds "
                    f"{total} experts of {model.expert_bytes} B; at least one per layer "
                    f"({layers}) is needed")
        else:
            raise ConfigError(f"policy: planner {self.planner!r} needs 'experts_per_layer' or "
                              f"'expert_budget_bytes'")
        if (slots > experts).any():
            raise ConfigError(f"policy: field 'experts_per_layer': at most {experts} per layer "
                              f"for {model.name or 'this model'}, got {slots.max()}")
        return slots

    def layer_sensitivity(self, model: ModelSpec) -> dict[str, np.ndarray]:
        """Per task, ``[layers]`` sensitivity: the ``sensitivity`` table, else the profile's."""
        table: dict[str, np.ndarray] = {}
        for name, profile in self.tasks.items():
            values = self.sensitivity.get(name)
            if values is None:
                try:
                    values = profile.layer_sensitivity(model.num_layers)
                except ValueError as exc:
                    raise ConfigError(f"policy: field 'tasks.{name}.sensitivity': {exc}") from None
            elif len(values) != model.num_layers:
                raise ConfigError(f"policy: field 'sensitivity.{name}': {len(values)} layers, "
                                  f"model has {model.num_layers}")
            table[name] = np.asarray(values, dtype=np.float64)
        return table

    def frequencies(self, model: ModelSpec) -> np.ndarray | None:
        if self.expert_frequencies is None:
            return None
        table = np.asarray(self.expert_frequencies, dtype=np.float64)
        if table.shape != (model.num_layers, model.num_experts):
            raise ConfigError(f"policy: field 'expert_frequencies': shape {table.shape}, model "
                              f"needs ({model.num_layers}, {model.num_experts})")
        return table

    # -- files --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": POLICY_FORMAT, "version": POLICY_VERSION}
        for f in dataclasses.fields(self):
            if f.name != "tasks":
                data[f.name] = getattr(self, f.name)
        data["tasks"] = {name: _task_to_dict(t) for name, t in self.tasks.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "policy") -> "PolicyConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a JSON object is needed")
        if data.get("format", POLICY_FORMAT) != POLICY_FORMAT:
            raise ConfigError(f"{where}: field 'format': expected {POLICY_FORMAT!r}, "
                              f"got {data['format']!r}")
        if data.get("version", POLICY_VERSION) != POLICY_VERSION:
            raise ConfigError(f"{where}: field 'version': this emoe reads version "
                              f"{POLICY_VERSION}, got {data['version']!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"format", "version"})
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}; valid: "
                              f"{', '.join(sorted(known))}")
        kwargs = {k: v for k, v in data.items() if k in known}
        if "tasks" in kwargs:
            if not isinstance(kwargs["tasks"], dict):
                raise ConfigError(f"{where}: field 'tasks': an object of task profiles is needed")
            kwargs["tasks"] = {name: _task_from_dict(name, t, where)
                               for name, t in kwargs["tasks"].items()}
        if not isinstance(kwargs.get("sensitivity", {}), dict):
            raise ConfigError(f"{where}: field 'sensitivity': an object task -> list is needed")
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            setattr(config, f.name, kwargs.get(f.name, default))
        config.validate(where)
        return config

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> "PolicyConfig":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read policy file: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        return cls.from_dict(data, where=str(path))


def model_shape(model: ModelSpec) -> dict[str, int]:
    """What a policy records of the model it was tuned for (``PolicyConfig.model_shape``)."""
    return {"num_layers": model.num_layers, "num_experts": model.num_experts,
            "top_k": model.top_k, "hidden_size": model.hidden_size}


def _shape(shape: dict[str, int]) -> str:
    return (f"{shape.get('num_layers', '?')} layers x {shape.get('num_experts', '?')} experts, "
            f"top-{shape.get('top_k', '?')}, hidden {shape.get('hidden_size', '?')}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any, where: str, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: field {name!r}: a positive integer is needed, got {value!r}")


def _task_to_dict(task: TaskProfile) -> dict[str, Any]:
    return {
        "mean_output_tokens": task.mean_output_tokens,
        "slo": {"ttft_s": task.slo.ttft_s, "tpot_s": task.slo.tpot_s},
        "insensitive_fraction": task.insensitive_fraction,
        "sensitivity": None if task.sensitivity is None else list(task.sensitivity),
        "keywords": list(task.keywords),
    }


def _task_from_dict(name: str, data: Any, where: str) -> TaskProfile:
    at = f"{where}: field 'tasks.{name}"
    if not isinstance(data, dict):
        raise ConfigError(f"{at}': an object is needed")
    allowed = {"mean_output_tokens", "slo", "insensitive_fraction", "sensitivity", "keywords"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{at}.{unknown[0]}': unknown; valid: {', '.join(sorted(allowed))}")
    try:
        mean, slo = data["mean_output_tokens"], data["slo"]
    except KeyError as exc:
        raise ConfigError(f"{at}.{exc.args[0]}': missing") from None
    _positive_int(mean, where, f"tasks.{name}.mean_output_tokens")
    if not isinstance(slo, dict) or not all(
            _number(slo.get(k)) and slo[k] > 0 for k in ("ttft_s", "tpot_s")):
        raise ConfigError(f"{at}.slo': {{\"ttft_s\": > 0, \"tpot_s\": > 0}} is needed, "
                          f"got {slo!r}")
    fraction = data.get("insensitive_fraction", 0.0)
    if not _number(fraction) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"{at}.insensitive_fraction': a number in [0, 1] is needed, "
                          f"got {fraction!r}")
    sensitivity = data.get("sensitivity")
    if sensitivity is not None and not (isinstance(sensitivity, list) and all(
            _number(v) and v >= 0 for v in sensitivity)):
        raise ConfigError(f"{at}.sensitivity': a list of numbers >= 0 or null is needed")
    keywords = data.get("keywords", [])
    if not (isinstance(keywords, list) and all(isinstance(k, str) for k in keywords)):
        raise ConfigError(f"{at}.keywords': a list of strings is needed")
    return TaskProfile(name, mean, SLO(ttft_s=float(slo["ttft_s"]), tpot_s=float(slo["tpot_s"])),
                       float(fraction), None if sensitivity is None else tuple(sensitivity),
                       tuple(keywords))
