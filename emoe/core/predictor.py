"""Expert predictors: from observed routing, the per-layer expert frequencies of the next prompt.

The scheduler feeds every request's routing to ``observe``: a ``[layers, experts]`` array of
router choices, per phase: ``prefill`` (its prompt, from ``StepResult.routing``) and
``decode`` (its generated tokens, from ``StepResult.decode_routing`` when it finishes). The
expert planner asks ``predict(task, phase)`` when it reloads; Eq. 2 weighs the prefill
frequencies by the input tokens in play and the decode ones by the expected output tokens.
Predictions are ``[layers, experts]`` float arrays whose rows sum to 1.

A learned predictor (``emoe.engine.learned_predictor``) implements the same two methods and
registers itself with ``register_predictor``; it lives outside emoe.core (torch is not
importable here) and is registered before the policy is loaded.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import numpy as np

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.specs import HardwareSpec

PHASES = ("prefill", "decode")


class ExpertPredictor(ABC):
    """Predicts a task's next-prompt routing frequencies from the routing it has observed.

    ``call_s``: the measured seconds of one planner prediction with this predictor on the
    machine that runs it, where its definition records one (a learned predictor's file: timed
    by ``emoe predictor train``); None: the hardware's ``predictor_s`` stands (``predictor_cost``).
    """

    name: ClassVar[str]
    call_s: float | None = None

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers = num_layers
        self.num_experts = num_experts

    @abstractmethod
    def observe(self, task: str, routing: np.ndarray, phase: str = "prefill") -> None:
        """Learn from one request's routing in ``phase``: ``[layers, experts]`` counts of
        router choices."""

    @abstractmethod
    def predict(self, task: str, phase: str = "prefill") -> np.ndarray:
        """``[layers, experts]`` predicted routing frequencies for the task's next request in
        ``phase``.

        Rows sum to 1. A phase never observed for the task falls back to its other phase, a
        task never observed to what is known of all tasks, and to uniform frequencies before
        anything has been observed.
        """

    @property
    def observed(self) -> bool:
        """Whether any routing has been observed (a prediction is more than uniform)."""
        return True

    def _check(self, routing: np.ndarray, phase: str = "prefill") -> np.ndarray:
        if phase not in PHASES:
            raise ValueError(f"routing phase {phase!r}: one of {', '.join(PHASES)}")
        routing = np.asarray(routing, dtype=np.float64)
        if routing.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"routing has shape {routing.shape}, expected "
                             f"({self.num_layers}, {self.num_experts}) [layers, experts]")
        return routing

    def _uniform(self) -> np.ndarray:
        return np.full((self.num_layers, self.num_experts), 1.0 / self.num_experts)


class FrequencyPredictor(ExpertPredictor):
    """Per-task and phase exponentially weighted routing frequencies.

    Each observed prompt's normalised routing moves the task's estimate by ``decay``
    (``estimate = (1 - decay) * estimate + decay * observed``); the first observation is taken
    as is. ``decay = 1`` predicts exactly the previous prompt's routing (the paper's input);
    small values average over many prompts of the task. Observations are queued and folded in
    together when a prediction needs them, so ``observe`` costs next to nothing.
    """

    name = "frequency"
    _FOLD_EVERY = 64

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.2):
        super().__init__(num_layers, num_experts)
        if not 0.0 < decay <= 1.0:
            raise ConfigError(f"predictor decay must be in (0, 1], got {decay}")
        self.decay = decay
        self._estimates: dict[tuple[str | None, str], np.ndarray] = {}
        self._pending: dict[tuple[str | None, str], list[np.ndarray]] = {}

    @property
    def observed(self) -> bool:
        return bool(self._estimates or self._pending)

    def observe(self, task: str, routing: np.ndarray, phase: str = "prefill") -> None:
        routing = self._check(routing, phase)
        for key in ((task, phase), (None, phase)):
            queue = self._pending.setdefault(key, [])
            queue.append(routing)
            if len(queue) >= self._FOLD_EVERY:
                self._fold(key)

    def predict(self, task: str, phase: str = "prefill") -> np.ndarray:
        """The task's estimate for ``phase``, else its other phase's; for a task never
        observed, the estimate over all tasks."""
        other = PHASES[1 - PHASES.index(phase)]
        for key in ((task, phase), (task, other), (None, phase), (None, other)):
            self._fold(key)
            if key in self._estimates:
                return self._estimates[key].copy()
        return self._uniform()

    def _fold(self, key: tuple[str | None, str]) -> None:
        queue = self._pending.pop(key, None)
        if not queue:
            return
        estimate = self._estimates.get(key)
        if len(queue) == 1 and estimate is not None:  # the common case under frequent prediction
            self._estimates[key] = (estimate * (1.0 - self.decay)
                                    + self.decay * self._normalised(queue[0]))
            return
        observed = self._normalised(np.array(queue))  # [k, layers, experts]
        k = len(queue)
        weights = self.decay * (1.0 - self.decay) ** np.arange(k - 1, -1, -1)
        if estimate is None:
            weights[0] = (1.0 - self.decay) ** (k - 1)
            estimate = np.zeros((self.num_layers, self.num_experts))
        else:
            estimate = estimate * (1.0 - self.decay) ** k
        # sum_j weights[j] * observed[j], as one [1, k] x [k, layers * experts] product
        folded = np.dot(weights.reshape(1, k), observed.reshape(k, -1))
        self._estimates[key] = estimate + folded.reshape(self.num_layers, self.num_experts)

    def _normalised(self, counts: np.ndarray) -> np.ndarray:
        """Counts over the last axis (experts) as frequencies; uniform where none."""
        totals = counts.sum(axis=-1, keepdims=True)
        if totals.min() > 0:
            return counts / totals
        return np.divide(counts, totals, out=np.full_like(counts, 1.0 / self.num_experts),
                         where=totals > 0)


class LastPromptPredictor(FrequencyPredictor):
    """The previous prompt of the same task predicts the next one (observation 1 of the paper)."""

    name = "last-prompt"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts, decay=1.0)


def predictor_cost(hardware: HardwareSpec, predictor: ExpertPredictor) -> HardwareSpec:
    """``hardware`` with ``predictor_s`` = the predictor's own measured call time where it has
    one. The scheduler applies it to the hardware it is built with, so its Eq. 3 estimate and
    the simulated step charge the same time, in the simulator and in the server alike."""
    call_s = getattr(predictor, "call_s", None)
    if call_s is None or call_s == hardware.predictor_s:
        return hardware
    return dataclasses.replace(
        hardware, predictor_s=call_s,
        provenance=f"{hardware.provenance}; predictor_s {call_s * 1e3:.3f} ms: the "
                   f"{getattr(predictor, 'name', 'given')} predictor's measured call time")


PredictorFactory = Callable[[int, int], ExpertPredictor]

PREDICTORS: dict[str, PredictorFactory] = {
    FrequencyPredictor.name: FrequencyPredictor,
    LastPromptPredictor.name: LastPromptPredictor,
}

PREDICTOR_LOADERS: dict[str, Callable[[str], PredictorFactory]] = {}
"""``prefix -> loader``: a predictor named ``prefix:ARG`` is ``loader(ARG)``'s factory (e.g.
``learned:predictor.safetensors``, registered by the engine's learned predictor)."""


def register_predictor(name: str, factory: PredictorFactory) -> None:
    """Make ``factory(num_layers, num_experts)`` available to policy files under ``name``."""
    PREDICTORS[name] = factory


def register_predictor_loader(prefix: str, loader: Callable[[str], PredictorFactory]) -> None:
    """Make ``prefix:ARG`` names resolve to ``loader(ARG)`` (called once per name)."""
    PREDICTOR_LOADERS[prefix] = loader


def known_predictor(name: str) -> bool:
    """Whether ``name`` is registered or has a registered loader prefix."""
    return name in PREDICTORS or name.partition(":")[0] in PREDICTOR_LOADERS and ":" in name


def make_predictor(name: str, num_layers: int, num_experts: int) -> ExpertPredictor:
    factory = PREDICTORS.get(name)
    if factory is None:
        prefix, _, arg = name.partition(":")
        loader = PREDICTOR_LOADERS.get(prefix)
        if loader is None or not arg:
            raise UnknownNameError("predictor", name,
                                   [*PREDICTORS, *(f"{p}:FILE" for p in PREDICTOR_LOADERS)])
        factory = PREDICTORS[name] = loader(arg)
    return factory(num_layers, num_experts)
