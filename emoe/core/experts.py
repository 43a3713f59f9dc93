"""Expert planners: which experts are resident on the GPU, and what a backend does on a miss.

A planner owns the resident set, a ``[layers, experts]`` bool array (``resident``). The
scheduler calls ``plan`` in every step that admits requests; the returned ``ExpertChange``
becomes the step plan's ``evict``/``load`` lists (evictions first) and ``run_predictor``. A
backend that starts empty and applies every plan's lists in order holds exactly ``resident``.

Miss semantics, by ``miss_mode`` (how a backend treats a token whose router-chosen expert is
not resident):

- ``MissMode.NONE`` (``all``): every expert is resident; misses cannot happen.
- ``MissMode.REROUTE`` (``static``, ``predict-every``, ``emoe``): the token goes to the
  router's next-ranked *resident* expert of that layer (top-k over resident experts only);
  nothing is fetched. Backends read ``planner.resident`` (or track the plans' lists).
- ``MissMode.FETCH`` (``lru``): the backend fetches the missing expert on demand, paying the
  host-to-device copy inside the step, into its layer's ``slots_per_layer[layer]`` slots; when
  the layer is full it first evicts the layer's least recently used expert. ``LruExpertCache``
  implements exactly that rule for backends to use. The backend reports what it did in
  ``StepResult.fetched_on_miss`` and ``StepResult.evicted_on_miss``, either every fetch and
  eviction as it happened or only the step's net changes; the planner's ``observe_step``
  applies them so ``resident`` stays the backend's truth. An ``lru`` planner never issues
  loads itself.

Memory: the scheduler reserves ``capacity_bytes`` (``slots_per_layer.sum() * expert_bytes``)
for experts. The one excursion above it is the ``emoe`` planner's first prompt, which loads
every expert only when its capacity allows: with an elastic expert memory (the default, the
simulator) when ``spare_bytes`` covers the excess, with a fixed slot pool
(``PlannerSetup.fixed_slots``: the real engine's expert cache, exactly ``slots_per_layer``
slots per layer) only in layers whose slots hold every expert. Otherwise it fills every slot.
The next admission always runs the predictor, whose plan evicts back to capacity before
anything else runs. No plan of any planner but ``lru`` (which starts empty and fetches) leaves
a layer with zero resident experts, and none exceeds ``slots_per_layer`` in a layer when
``fixed_slots`` is set.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from emoe.core.allocation import allocate_slots
from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.estimates import TaskDemand, expert_tokens, top_experts
from emoe.core.plan import ExpertKey, StepResult
from emoe.core.predictor import ExpertPredictor
from emoe.core.specs import ModelSpec


class MissMode(enum.Enum):
    NONE = "none"
    REROUTE = "reroute"
    FETCH = "fetch"


@dataclass(slots=True)
class ExpertChange:
    """Expert-cache changes for one step: evict, then load; ``run_predictor`` if it ran."""

    load: list[ExpertKey] = field(default_factory=list)
    evict: list[ExpertKey] = field(default_factory=list)
    run_predictor: bool = False


@dataclass(frozen=True, slots=True)
class PlannerSetup:
    """What every planner is built from.

    ``slots_per_layer``: L per layer, ``[layers]`` ints. ``sensitivity``: per task, ``[layers]``
    weights s (0 = the task tolerates wrong routing there). ``prediction_interval``: p.
    ``frequencies``: a ``[layers, experts]`` routing-frequency profile for ``static``.
    ``fixed_slots``: the backend's expert memory is a fixed pool of exactly ``slots_per_layer``
    slots per layer (the real engine), so no plan may hold more; False (the simulator): expert
    memory may grow into memory nobody reserved (``spare_bytes``) for the ``emoe`` first prompt.
    ``allocate`` (``emoe``, ``predict-every``): the ``slots_per_layer.sum()`` slots are split
    over the layers anew at every prediction by measured marginal value
    (``emoe.core.allocation``), each layer keeping at least ``min_slots`` (default top-k);
    with ``fixed_slots`` the pool is then fixed in total, not per layer.
    ``adaptive_interval``: re-predict early when the observed hit rate drops, stretch the
    interval while it holds (``EmoePlanner``). ``seed``: the ``random`` planner's draw.
    """

    slots_per_layer: np.ndarray
    predictor: ExpertPredictor
    sensitivity: Mapping[str, np.ndarray]
    prediction_interval: int = 40
    frequencies: np.ndarray | None = None
    fixed_slots: bool = False
    allocate: bool = False
    min_slots: int | None = None
    adaptive_interval: bool = False
    seed: int = 0


DemandFn = Callable[[], Mapping[str, TaskDemand]]


def _keys(mask: np.ndarray) -> list[ExpertKey]:
    return [(int(layer), int(expert)) for layer, expert in zip(*np.nonzero(mask))]


class ExpertPlanner(ABC):
    """Decides the resident expert set. Subclasses implement ``_target``."""

    name: ClassVar[str]
    miss_mode: ClassVar[MissMode] = MissMode.REROUTE

    def __init__(self, model: ModelSpec, setup: PlannerSetup):
        self.model = model
        self.slots_per_layer = np.asarray(setup.slots_per_layer, dtype=np.int64)
        self.predictor = setup.predictor
        self.sensitivity = setup.sensitivity
        self.fixed_slots = setup.fixed_slots
        self.resident = np.zeros((model.num_layers, model.num_experts), dtype=bool)
        self.prompts_admitted = 0

    @property
    def capacity_bytes(self) -> int:
        """Expert bytes the scheduler reserves for this planner."""
        return int(self.slots_per_layer.sum()) * self.model.expert_bytes

    @property
    def resident_bytes(self) -> int:
        return int(self.resident.sum()) * self.model.expert_bytes

    def plan(self, admitted_tasks: Sequence[str], demand: DemandFn,
             spare_bytes: int) -> ExpertChange:
        """Expert changes for a step that admits prompts of ``admitted_tasks`` (in order).

        ``demand()``: per task in play after the admissions, Eq. 2's inputs (called only when
        needed). ``spare_bytes``: GPU memory reserved by nothing (the budget less weights,
        expert capacity and KV).
        """
        first = self.prompts_admitted
        self.prompts_admitted += len(admitted_tasks)
        target, predicted = self._target(first, len(admitted_tasks), demand, spare_bytes)
        if target is None:
            return ExpertChange(run_predictor=predicted)
        change = ExpertChange(load=_keys(target & ~self.resident),
                              evict=_keys(self.resident & ~target), run_predictor=predicted)
        self.resident = target
        return change

    @abstractmethod
    def _target(self, first: int, count: int, demand: DemandFn,
                spare_bytes: int) -> tuple[np.ndarray | None, bool]:
        """The new resident set (None: unchanged) and whether the predictor ran, for a step
        admitting prompts number ``first`` .. ``first + count - 1`` (0-based, in arrival order
        of admission)."""

    def observe_routing(self, task: str, routing: np.ndarray, phase: str = "prefill") -> None:
        """One request's ``[layers, experts]`` router-choice counts in ``phase``: its prompt
        when its prefill completes, its generated tokens when it finishes."""
        self.predictor.observe(task, routing, phase)

    def observe_step(self, result: StepResult) -> None:
        """Fold in what the backend did on its own (only ``lru`` fetches on a miss)."""

    def admission_cost(self) -> tuple[float, bool]:
        """(expected expert loads, whether the predictor runs) if one more prompt is admitted
        now: dE of Eq. 3."""
        return 0.0, False


class AllExpertsPlanner(ExpertPlanner):
    """Every expert resident (the no-offloading baseline)."""

    name = "all"
    miss_mode = MissMode.NONE

    def _target(self, first, count, demand, spare_bytes):
        if first == 0:
            return np.ones_like(self.resident), False
        return None, False


class StaticPlanner(ExpertPlanner):
    """The most frequently used L experts per layer stay pinned (as Fiddler does).

    Frequencies come from ``PlannerSetup.frequencies`` (a routing-trace profile). Without one,
    the first prompt runs on experts 0..L-1 and the experts are re-pinned once, at the first
    admission after any routing has been observed, from the predictor's all-task estimate.
    """

    name = "static"

    def __init__(self, model: ModelSpec, setup: PlannerSetup):
        super().__init__(model, setup)
        self._frequencies = setup.frequencies
        self._observed = False

    def _target(self, first, count, demand, spare_bytes):
        if self._frequencies is not None:
            return (top_experts(self._frequencies, self.slots_per_layer), False) if first == 0 \
                else (None, False)
        if first == 0:
            return top_experts(np.zeros(self.resident.shape), self.slots_per_layer), False
        if self._observed:
            self._frequencies = self.predictor.predict("")
            return top_experts(self._frequencies, self.slots_per_layer), True
        return None, False

    def observe_routing(self, task: str, routing: np.ndarray, phase: str = "prefill") -> None:
        super().observe_routing(task, routing, phase)
        self._observed = True


class RandomPlanner(ExpertPlanner):
    """A random set of ``slots_per_layer`` experts per layer, drawn once (``seed``) and pinned:
    the control that says whether a planner's choice of experts beats chance."""

    name = "random"

    def __init__(self, model: ModelSpec, setup: PlannerSetup):
        super().__init__(model, setup)
        rng = np.random.default_rng(setup.seed)
        self._set = top_experts(rng.random(self.resident.shape), self.slots_per_layer)

    def _target(self, first, count, demand, spare_bytes):
        return (self._set.copy(), False) if first == 0 else (None, False)


class EmoePlanner(ExpertPlanner):
    """The paper's task-aware loading with periodic prediction.

    Prompt 0 (when its step does not also run the predictor) loads every expert where the
    planner's capacity allows: with ``fixed_slots``, in the layers whose slots hold every
    expert; otherwise everywhere when ``spare_bytes`` covers the excess over
    ``capacity_bytes``. Where it does not, a predictor that has already observed routing (a
    warm start, e.g. from a calibration trace) predicts for prompt 0; a cold one leaves every
    slot filled with experts 0..L-1 of the layer.

    Prompt n >= 1 runs the predictor when it is due: n = 1, 1 + p, 1 + 2p, ... for a fixed
    interval p, and (beyond the paper) whenever a prompt of a task arrives that the last
    prediction did not serve and that is sensitive somewhere: the resident set was chosen for
    another mix of tasks. Eq. 2 over the tasks in play (prompt tokens spread by the predicted prefill
    frequencies, expected output tokens by the decode ones) scores every expert. With
    ``allocate`` the slots are split over the layers by those scores (``allocate_slots``);
    otherwise the top ``L`` experts per layer stay or are loaded, the rest are evicted.
    A layer that is insensitive (s = 0) for every task in play is left alone: nothing is
    loaded there, and its resident experts are only trimmed to its slots (lowest Eq. 2 usage
    first). A layer is never emptied: if such a layer holds nothing yet (a cold start) it is
    filled with the experts the predictor ranks highest for the tasks in play (Eq. 2 without
    s; expert order before any observation). When every task in play is insensitive in every
    layer the predictor is not called at all (the paper's saving): what is resident stays,
    only trimmed to the slots (lowest expert index kept) or, in an empty layer, filled.

    ``adaptive_interval`` (beyond the paper): after each prediction the sensitivity-weighted
    hit rate of the next ``_REFERENCE_PROMPTS`` prompts' routing against the resident set is
    the reference; a running average below it by ``_MARGIN`` makes the next admission
    re-predict early and halves the interval (down to p / 4); a scheduled prediction reached
    while the hit rate held doubles it (up to 4p). Backends report routing the same way in the
    simulator and on the engine, so both adapt alike.
    """

    name = "emoe"
    _REFERENCE_PROMPTS = 3
    _MARGIN = 0.05
    _SMOOTHING = 0.3

    def __init__(self, model: ModelSpec, setup: PlannerSetup):
        super().__init__(model, setup)
        self.prediction_interval = setup.prediction_interval
        self.allocate = setup.allocate
        self.min_slots = model.top_k if setup.min_slots is None else setup.min_slots
        self.adaptive = setup.adaptive_interval
        self.interval = self.prediction_interval
        self.predictions = 0
        self.early_predictions = 0
        self._next = 1  # the prompt number at which the next prediction is due
        self._loads_per_prediction = 0.0
        self._reference: list[float] = []
        self._hit_rate: float | None = None
        self._early = False
        self._served: set[str] = set()
        self._new_task = False
        self._sensitive: dict[str, bool] = {}  # per task: s > 0 in some layer

    def _hurt(self, task: str) -> bool:
        """Whether wrong routing costs ``task`` anything (s > 0 in some layer)."""
        hurt = self._sensitive.get(task)
        if hurt is None:
            hurt = self._sensitive[task] = bool((self.sensitivity[task] > 0).any())
        return hurt

    def _due(self, first: int, last: int) -> int | None:
        """The first prompt in ``first .. last`` at which the predictor is due, else None."""
        if self._early or self._new_task:
            return first
        return max(first, self._next) if self._next <= last else None

    def plan(self, admitted_tasks: Sequence[str], demand: DemandFn,
             spare_bytes: int) -> ExpertChange:
        if self.predictions and any(task not in self._served and self._hurt(task)
                                    for task in admitted_tasks):
            self._new_task = True
        return super().plan(admitted_tasks, demand, spare_bytes)

    def _target(self, first, count, demand, spare_bytes):
        last = first + count - 1
        due = self._due(first, last)
        if due is None and first == 0:
            if self._all_fit(spare_bytes):
                return np.ones_like(self.resident), False
            if not self.predictor.observed:
                return self._cold_fill(), False
            due = 0
        if due is None:
            return None, False
        self._schedule(due, last)
        in_play = {task: d for task, d in demand().items() if d.requests}
        if not any(self._hurt(task) for task in in_play):
            # no task in play is hurt by wrong routing anywhere: the prediction is skipped
            return self._keep_resident(), False
        target = self._predicted_target(in_play)
        self._loads_per_prediction = float((target & ~self.resident).sum())
        self.predictions += 1
        self._served = set(in_play)
        return target, True

    def _schedule(self, due: int, last: int) -> None:
        """After a prediction at prompt ``due`` in an admission ending at ``last``: the next
        one comes ``interval`` prompts on (the first such prompt after ``last``)."""
        if self.adaptive and self.predictions:
            if self._early:
                self.interval = max(1, self.prediction_interval // 4, self.interval // 2)
                self.early_predictions += 1
            elif not self._new_task:  # reached on schedule: the hit rate held
                self.interval = min(4 * self.prediction_interval, 2 * self.interval)
        self._early = self._new_task = False
        self._reference, self._hit_rate = [], None
        step = self.interval
        self._next = due + step * max(1, -(-(last - due + 1) // step))

    def _all_fit(self, spare_bytes: int) -> bool:
        if self.fixed_slots:
            return bool((self.slots_per_layer >= self.model.num_experts).all())
        return self.model.all_experts_bytes - self.capacity_bytes <= spare_bytes

    def _cold_fill(self) -> np.ndarray:
        """Every slot filled without a prediction: experts 0..L-1 of each layer (with
        ``allocate``, the slots spread evenly, extras to the layers nearest the output).
        Layers whose slots hold every expert (fixed slots) hold them all."""
        if self.allocate:
            return allocate_slots(np.zeros(self.resident.shape), self.slot_total,
                                  self.min_slots)
        return top_experts(np.zeros(self.resident.shape), self.slots_per_layer)

    def _keep_resident(self) -> np.ndarray | None:
        """What is resident, trimmed to the slots and with empty layers filled, in expert
        order (no prediction); None when that is what is resident."""
        if self.allocate:
            target = allocate_slots(np.zeros(self.resident.shape), self.slot_total,
                                    self.min_slots, prefer=self.resident)
        else:
            target = top_experts(self.resident.astype(np.float64), self.slots_per_layer)
        return None if np.array_equal(target, self.resident) else target

    @property
    def slot_total(self) -> int:
        return int(self.slots_per_layer.sum())

    def _predicted_target(self, in_play: Mapping[str, TaskDemand]) -> np.ndarray:
        shape = self.resident.shape
        prefill = {task: self.predictor.predict(task, "prefill") for task in in_play}
        decode = {task: self.predictor.predict(task, "decode") for task in in_play}
        scores, usage = np.zeros(shape), np.zeros(shape)
        for task, tokens in expert_tokens(in_play, prefill, decode).items():
            scores += self.sensitivity[task][:, None] * tokens
            usage += tokens
        if self.allocate:
            return allocate_slots(scores, self.slot_total, self.min_slots, usage=usage,
                                  prefer=self.resident)
        target = top_experts(scores, self.slots_per_layer)
        sensitive = np.zeros(self.model.num_layers, dtype=bool)
        for task in in_play:
            sensitive |= self.sensitivity[task] > 0
        alone = ~sensitive
        if alone.any():
            kept = top_experts(np.where(self.resident, usage, -np.inf), self.slots_per_layer)
            target[alone] = (kept & self.resident)[alone]
            empty = alone & ~self.resident.any(axis=1)
            if empty.any():
                target[empty] = top_experts(usage, self.slots_per_layer)[empty]
        return target

    def observe_routing(self, task: str, routing: np.ndarray, phase: str = "prefill") -> None:
        super().observe_routing(task, routing, phase)
        if not self.adaptive or phase != "prefill" or not self.predictions:
            return
        s = self.sensitivity.get(task)
        counts = np.asarray(routing, dtype=np.float64)
        weights = (np.ones(self.model.num_layers) if s is None or not s.any() else s)[:, None]
        total = float((weights * counts).sum())
        if total <= 0:
            return
        rate = float((weights * counts * self.resident).sum()) / total
        if len(self._reference) < self._REFERENCE_PROMPTS:
            self._reference.append(rate)
            return
        reference = sum(self._reference) / len(self._reference)
        self._hit_rate = rate if self._hit_rate is None else \
            self._hit_rate + self._SMOOTHING * (rate - self._hit_rate)
        if self._hit_rate < reference - self._MARGIN:
            self._early = True

    def admission_cost(self) -> tuple[float, bool]:
        if self._early or self.prompts_admitted >= self._next:
            return self._loads_per_prediction, True
        return 0.0, False


class PredictEveryPlanner(EmoePlanner):
    """``emoe`` with the predictor run for every prompt (p = 1): the cost of not amortising."""

    name = "predict-every"

    def __init__(self, model: ModelSpec, setup: PlannerSetup):
        super().__init__(model, setup)
        self.prediction_interval = self.interval = 1
        self.adaptive = False


class LruPlanner(ExpertPlanner):
    """On-demand offloading: the backend fetches on a miss and evicts the layer's least recently
    used expert (see the module docstring); starts with nothing resident."""

    name = "lru"
    miss_mode = MissMode.FETCH

    def __init__(self, model: ModelSpec, setup: PlannerSetup):
        super().__init__(model, setup)
        self._fetches_per_step = 0.0

    def _target(self, first, count, demand, spare_bytes):
        return None, False

    def observe_step(self, result: StepResult) -> None:
        """Apply the backend's fetches and evictions. An expert is only fetched when absent and
        only evicted when present, so its fetches and evictions alternate and its state after
        the step is its state before plus fetches less evictions, in whatever order they came:
        a full record and a net one give the same resident set."""
        net: dict[ExpertKey, int] = {}
        for key in result.fetched_on_miss:
            net[key] = net.get(key, 0) + 1
        for key in result.evicted_on_miss:
            net[key] = net.get(key, 0) - 1
        for (layer, expert), change in net.items():
            state = int(self.resident[layer, expert]) + change
            if state not in (0, 1):
                what = "fetched while resident" if state > 1 else "evicted while not resident"
                raise ValueError(f"backend reported expert ({layer}, {expert}) {what} "
                                 f"({change:+d} over the step)")
            self.resident[layer, expert] = state == 1
        if net:
            overfull = np.nonzero(self.resident.sum(axis=1) > self.slots_per_layer)[0]
            if overfull.size:
                raise ValueError(f"backend reported fetches that overfill layer {overfull[0]} "
                                 f"beyond its {self.slots_per_layer[overfull[0]]} slots")
        self._fetches_per_step += 0.1 * (len(result.fetched_on_miss) - self._fetches_per_step)

    def admission_cost(self) -> tuple[float, bool]:
        return self._fetches_per_step, False


class LruExpertCache:
    """The ``lru`` miss rule, for backends: per layer, ``slots`` experts in recency order.

    ``access(layer, expert)`` marks the expert most recently used and returns
    ``(hit, evicted)``: on a miss the expert is fetched, and when the layer was full
    ``evicted`` is the least recently used expert it displaced (else None).
    """

    def __init__(self, slots_per_layer: Sequence[int], resident: np.ndarray | None = None):
        self.slots_per_layer = [int(s) for s in slots_per_layer]
        self._layers: list[OrderedDict[int, None]] = [OrderedDict() for _ in self.slots_per_layer]
        if resident is not None:
            for layer, expert in zip(*np.nonzero(resident)):
                self._layers[int(layer)][int(expert)] = None

    def access(self, layer: int, expert: int) -> tuple[bool, int | None]:
        entries = self._layers[layer]
        if expert in entries:
            entries.move_to_end(expert)
            return True, None
        evicted = None
        if len(entries) >= self.slots_per_layer[layer]:
            evicted, _ = entries.popitem(last=False)
        entries[expert] = None
        return False, evicted

    def resident(self, layer: int) -> list[int]:
        """The layer's resident experts, least recently used first."""
        return list(self._layers[layer])

    def step_order(self, layer: int, experts: Iterable[int]) -> list[int]:
        """The order in which one step accesses the distinct ``experts`` its tokens chose in
        ``layer`` (engine and simulator alike): the resident ones first, then the missing ones,
        each ascending, so a miss never displaces an expert the same step still needs while
        the layer has room for all of them."""
        entries = self._layers[layer]
        needed = sorted(set(int(e) for e in experts))
        return [e for e in needed if e in entries] + [e for e in needed if e not in entries]


PLANNERS: dict[str, type[ExpertPlanner]] = {
    cls.name: cls
    for cls in (AllExpertsPlanner, LruPlanner, StaticPlanner, RandomPlanner, PredictEveryPlanner,
                EmoePlanner)
}


def make_planner(name: str, model: ModelSpec, setup: PlannerSetup) -> ExpertPlanner:
    try:
        cls = PLANNERS[name]
    except KeyError:
        raise UnknownNameError("expert planner", name, list(PLANNERS)) from None
    slots = np.asarray(setup.slots_per_layer)
    if slots.shape != (model.num_layers,) or (slots < 1).any() or (slots > model.num_experts).any():
        raise ConfigError(f"expert planner {name!r}: slots_per_layer must be {model.num_layers} "
                          f"values in 1..{model.num_experts}, got {slots.tolist()}")
    return cls(model, setup)
