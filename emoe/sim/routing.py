"""Where the simulated router sends tokens: a recorded routing trace, or a synthetic generator.

Both keep, per live request, a slot in flat numpy arrays, and count for every step how many of
its expert choices hit a resident expert, vectorised over the step's requests and layers:

- ``TraceRouting`` replays recorded top-k expert ids token by token: hits are exact.
- ``SyntheticRouting`` gives each request a per-layer expert distribution; hits are computed
  in expectation (choices x the distribution's resident mass) and rounded once per request.

Hit accounting (also what the accuracy proxy is built from): a choice is a hit when the
router's chosen expert is resident at the start of the step. ``weighted`` counts weigh each
layer by the task's sensitivity s (0 = the task tolerates wrong routing there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from emoe.core.errors import ConfigError
from emoe.core.request import Request
from emoe.core.specs import ModelSpec

if TYPE_CHECKING:  # pyarrow loads only when a routing trace is read
    from emoe.core.routing_trace import RoutingTrace


def _with_sum(s: np.ndarray) -> tuple[np.ndarray, float]:
    return s, s.sum()


class RoutingSource(ABC):
    """Per-request routing and hit counters. Requests are admitted in arrival order."""

    label: str
    hits_method: str
    synthetic: bool

    def __init__(self, model: ModelSpec, sensitivity: Mapping[str, np.ndarray]):
        self.num_layers = model.num_layers
        self.num_experts = model.num_experts
        self.top_k = model.top_k
        # per task: s over layers and its sum
        self._sensitivity = {t: _with_sum(np.asarray(s, dtype=np.float64))
                             for t, s in sensitivity.items()}
        self._uniform_sensitivity = _with_sum(np.ones(model.num_layers))
        self.slot: dict[str, int] = {}
        self._retired: list[tuple[Request, int]] = []
        self._free: list[int] = []
        self._capacity = 0
        # per slot: hits, choices, sensitivity-weighted hits and choices; sum of s over layers
        self._counts = np.zeros((0, 4))
        self._sens = np.zeros((0, model.num_layers))
        self._sens_sum = np.zeros(0)

    # -- slots --------------------------------------------------------------------------------

    def admit(self, request: Request) -> None:
        """Fix the request's routing (called once, at arrival)."""
        if not self._free:
            self._grow(max(64, 2 * self._capacity))
        slot = self._free.pop()
        self.slot[request.id] = slot
        sens, total = self._sensitivity.get(request.task, self._uniform_sensitivity)
        self._sens[slot] = sens
        self._sens_sum[slot] = total
        self._counts[slot] = 0.0
        self._assign(slot, request)

    def finish(self, requests: Sequence[Request]) -> None:
        """Write the requests' hit counters into them and forget them."""
        self.retire(requests)
        self.flush()

    def retire(self, requests: Sequence[Request]) -> None:
        """Forget ended requests; their hit counters are written into them at the next
        ``flush`` (settling many at once is one vectorised pass instead of one per step)."""
        slot = self.slot
        self._retired.extend((r, slot.pop(r.id)) for r in requests)

    def flush(self) -> None:
        """Write the retired requests' hit counters into them and free their slots."""
        if not self._retired:
            return
        requests = [r for r, _ in self._retired]
        slots = [s for _, s in self._retired]
        self._retired = []
        self._settle(np.array(slots, dtype=np.intp))
        for request, (hits, choices, weighted_hits, weighted_choices) in zip(
                requests, self._counts[slots].tolist()):
            request.expert_hits = int(round(hits))
            request.expert_misses = int(round(choices)) - request.expert_hits
            request.weighted_hits = weighted_hits
            request.weighted_choices = weighted_choices
        for slot in slots:
            self._release(slot)
        self._free.extend(slots)

    def _grow(self, new: int) -> None:
        old = self._capacity
        self._counts = np.concatenate([self._counts, np.zeros((new - old, 4))])
        self._sens = np.concatenate([self._sens, np.zeros((new - old, self.num_layers))])
        self._sens_sum = np.concatenate([self._sens_sum, np.zeros(new - old)])
        self._capacity = new
        self._free.extend(range(new - 1, old - 1, -1))
        self._grown(old, new)

    # -- counting -----------------------------------------------------------------------------

    @abstractmethod
    def count(self, slots: np.ndarray, tokens: "np.ndarray | int", decode: bool,
              resident: np.ndarray, resident_version: int, served_all: bool = False) -> None:
        """Add one step's choices of the requests in ``slots``.

        ``tokens`` (per request, or one count for all) tokens each ran: prompt tokens for a
        prefill, generated tokens for a decode. ``resident`` is the ``[layers, experts]`` mask
        at the step's start; ``resident_version`` changes whenever it does. ``served_all``:
        every choice was served by its chosen expert in the end (fetched on a miss), so the
        weighted (accuracy) counts see no miss even where the hit counts do.
        """

    # -- what a source implements -------------------------------------------------------------

    @abstractmethod
    def _assign(self, slot: int, request: Request) -> None:
        """Fix the routing of a newly admitted request in ``slot``."""

    def _release(self, slot: int) -> None:
        """Drop per-slot state held outside the shared arrays."""

    def _settle(self, slots: np.ndarray) -> None:
        """Bring the slots' counters up to date (a source may count lazily)."""

    def _grown(self, old: int, new: int) -> None:
        """Extend per-slot arrays from ``old`` to ``new`` slots."""

    @abstractmethod
    def prefill_counts(self, request: Request) -> np.ndarray:
        """``[layers, experts]`` router choices over the request's whole prompt."""

    @abstractmethod
    def decode_counts(self, request: Request) -> np.ndarray:
        """``[layers, experts]`` router choices over the generated tokens run in decode (all
        but the last of ``request.generated_tokens``); called before ``finish``."""

    @abstractmethod
    def touched(self, slots: np.ndarray, tokens: "np.ndarray | int", decode: bool) -> np.ndarray:
        """``[layers, experts]`` bool: experts chosen at least once by the next ``tokens``
        tokens of these requests (a fetch-on-miss backend loads the missing ones)."""


class SyntheticRouting(RoutingSource):
    """Task-dependent expert popularity that recurs across prompts and drifts slowly.

    Per layer, each task's popularity over experts is ``shared`` parts a popularity common to
    all tasks and the rest the task's own, each drawn from a symmetric Dirichlet
    (``concentration``; small = skewed). Every arriving prompt of the task gets a fresh draw:
    its distribution is ``(1 - prompt_noise) * popularity + prompt_noise * fresh``, and the
    task's own part moves by ``drift`` towards ``fresh`` (popularity follows recent prompts). Consecutive prompts of a
    task are therefore strongly correlated (the paper measured 0.75-0.95 on Mixtral) and the
    correlation decays over tens of prompts, which is what makes a stale prediction cost
    accuracy. Distributions are per choice: each of a token's top-k choices falls on expert e
    with probability p[l, e]. Cross-layer correlation is not modelled.

    Counting is lazy: a step only adds its tokens to the requests' pending counts; hits are
    settled in expectation (pending choices x the resident mass of the request's distribution)
    when the resident set changes and when the request ends.
    """

    label = "synthetic (seeded per-task Dirichlet popularity, drifting; not measured routing)"
    hits_method = "computed in expectation from per-request expert distributions"
    synthetic = True
    _BLOCK = 512

    def __init__(self, model: ModelSpec, sensitivity: Mapping[str, np.ndarray], seed: int = 0,
                 concentration: float = 0.3, shared: float = 0.5, prompt_noise: float = 0.2,
                 drift: float = 0.02):
        self._probs = np.zeros((0, model.num_layers, model.num_experts))
        self._pending = np.zeros(0)  # per slot: tokens to settle
        self._pending_served = np.zeros(0)  # of them, served by their chosen expert (fetched)
        super().__init__(model, sensitivity)
        self._rng = np.random.default_rng([seed, 0x5EED])
        self._concentration = concentration
        # the current block of draws, and drift x and prompt_noise x each (whole-block products)
        self._draws = self._drift_draws = self._noise_draws = np.zeros(
            (0, model.num_layers, model.num_experts))
        self._next = 0
        self._noise, self._drift = prompt_noise, drift
        self._own_weight = (1.0 - shared) * (1.0 - prompt_noise)
        self._shared = self._draw()
        self._shared_part = (shared * (1.0 - prompt_noise)) * self._shared
        self._own = {t: self._draw() for t in sorted(sensitivity)}
        self._mask = np.zeros((model.num_layers, model.num_experts))
        self._mask_version: int | None = None

    def _draw(self) -> np.ndarray:
        """One Dirichlet draw per layer, ``[layers, experts]``; drawn in blocks for speed."""
        index = self._take()
        return self._draws[index]

    def _take(self) -> int:
        """The index of the next draw in the current block (a new block when it is used up)."""
        if self._next == len(self._draws):
            gammas = self._rng.standard_gamma(
                self._concentration, (self._BLOCK, self.num_layers, self.num_experts))
            gammas += 1e-12
            gammas /= gammas.sum(axis=2, keepdims=True)
            self._draws = gammas
            self._drift_draws = self._drift * gammas
            self._noise_draws = self._noise * gammas
            self._next = 0
        self._next += 1
        return self._next - 1

    def _grown(self, old: int, new: int) -> None:
        self._probs = np.concatenate([self._probs, np.zeros((new - old,) + self._probs.shape[1:])])
        self._pending = np.concatenate([self._pending, np.zeros(new - old)])
        self._pending_served = np.concatenate([self._pending_served, np.zeros(new - old)])

    def _assign(self, slot: int, request: Request) -> None:
        own = self._own.get(request.task)
        if own is None:
            own = self._own[request.task] = self._draw()
        fresh = self._take()
        own *= 1.0 - self._drift
        own += self._drift_draws[fresh]
        probs = self._probs[slot]
        np.multiply(own, self._own_weight, out=probs)
        probs += self._shared_part
        probs += self._noise_draws[fresh]
        self._pending[slot] = self._pending_served[slot] = 0.0

    def distribution(self, request_id: str) -> np.ndarray:
        """The request's ``[layers, experts]`` choice distribution (rows sum to 1)."""
        return self._probs[self.slot[request_id]]

    def prefill_counts(self, request: Request) -> np.ndarray:
        """Expected router choices over the prompt (choices x distribution)."""
        return (request.input_tokens * self.top_k) * self._probs[self.slot[request.id]]

    def decode_counts(self, request: Request) -> np.ndarray:
        """Expected router choices over the generated tokens (choices x distribution)."""
        return ((request.generated_tokens - 1) * self.top_k) * self._probs[self.slot[request.id]]

    def count(self, slots, tokens, decode, resident, resident_version, served_all=False):
        if resident_version != self._mask_version:
            self._settle(np.flatnonzero(self._pending))
            self._mask = resident.astype(np.float64)
            self._mask_version = resident_version
        self._pending[slots] += tokens
        if served_all:
            self._pending_served[slots] += tokens

    def _settle(self, slots: np.ndarray) -> None:
        slots = slots[self._pending[slots] > 0]
        if not len(slots):
            return
        choices = self._pending[slots] * self.top_k
        served = self._pending_served[slots] * self.top_k
        mass = np.einsum("sle,le->sl", self._probs[slots], self._mask)  # [S, L]
        sens = self._sens[slots]
        counts = self._counts
        counts[slots, 0] += choices * mass.sum(axis=1)
        counts[slots, 1] += choices * self.num_layers
        weighted_choices = choices * self._sens_sum[slots]
        missed_mass = np.einsum("sl,sl->s", 1.0 - mass, sens)
        counts[slots, 2] += weighted_choices - (choices - served) * missed_mass
        counts[slots, 3] += weighted_choices
        self._pending[slots] = self._pending_served[slots] = 0.0

    def touched(self, slots, tokens, decode):
        # Expected choices per expert, then P(chosen at least once) from a Poisson count.
        weights = np.broadcast_to(np.asarray(tokens, dtype=np.float64) * self.top_k, slots.shape)
        expected = np.einsum("s,sle->le", weights, self._probs[slots])
        return self._rng.random(expected.shape) < -np.expm1(-expected)


class TraceRouting(RoutingSource):
    """Replays a recorded routing trace: hits are counted exactly, choice by choice.

    A simulated request takes the routing of a recorded request with the same id if there is
    one, otherwise the next recorded request of its task in turn (cycling; any task's when the
    trace has none of it). Its prompt tokens replay the recorded prompt's choices and its
    generated tokens the recorded generated tokens, each repeated cyclically when the simulated
    request is longer than the recording.
    """

    hits_method = "exact: recorded top-k expert ids, choice by choice"
    synthetic = False

    def __init__(self, model: ModelSpec, sensitivity: Mapping[str, np.ndarray],
                 trace: RoutingTrace, source: str = "routing trace"):
        super().__init__(model, sensitivity)
        trace.check_model(model, source)
        self.label = f"routing trace {source} ({len(trace.requests)} recorded requests)"
        self._recorded = {rid: r for rid, r in trace.requests.items()
                          if len(r.prefill_ids) or len(r.decode_ids)}
        if not self._recorded:
            raise ConfigError(f"{source}: the routing trace holds no tokens")
        self._by_task: dict[str, list] = {}
        for r in self._recorded.values():
            self._by_task.setdefault(r.task, []).append(r)
        self._all = list(self._recorded.values())
        self._turn: dict[str, int] = {}
        # per slot: (prompt ids, generated ids) [tokens, layers, k], and cursors into each
        self._ids: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cursor = np.zeros((0, 2), dtype=np.int64)
        self._layer = np.arange(self.num_layers)[None, :, None]

    def _grown(self, old: int, new: int) -> None:
        self._cursor = np.concatenate([self._cursor, np.zeros((new - old, 2), dtype=np.int64)])

    def _assign(self, slot: int, request: Request) -> None:
        recorded = self._recorded.get(request.id)
        if recorded is None:
            pool = self._by_task.get(request.task) or self._all
            turn = self._turn.get(request.task, 0)
            self._turn[request.task] = turn + 1
            recorded = pool[turn % len(pool)]
        prefill = recorded.prefill_ids if len(recorded.prefill_ids) else recorded.decode_ids
        decode = recorded.decode_ids if len(recorded.decode_ids) else recorded.prefill_ids
        self._ids[slot] = (prefill, decode)
        self._cursor[slot] = 0

    def _release(self, slot: int) -> None:
        del self._ids[slot]

    def _next(self, slot: int, count: int, decode: bool, advance: bool) -> np.ndarray:
        ids = self._ids[slot][1 if decode else 0]
        start = self._cursor[slot, int(decode)]
        if advance:
            self._cursor[slot, int(decode)] += count
        return ids[np.arange(start, start + count) % len(ids)]

    def prefill_counts(self, request: Request) -> np.ndarray:
        prompt = self._ids[self.slot[request.id]][0]
        ids = prompt[np.arange(request.input_tokens) % len(prompt)]
        flat = (self._layer * self.num_experts + ids).ravel()
        size = self.num_layers * self.num_experts
        return np.bincount(flat, minlength=size).reshape(self.num_layers, self.num_experts)

    def decode_counts(self, request: Request) -> np.ndarray:
        generated = self._ids[self.slot[request.id]][1]
        ids = generated[np.arange(request.generated_tokens - 1) % len(generated)]
        flat = (self._layer * self.num_experts + ids).ravel()
        size = self.num_layers * self.num_experts
        return np.bincount(flat, minlength=size).reshape(self.num_layers, self.num_experts)

    def count(self, slots, tokens, decode, resident, resident_version, served_all=False):
        tokens = np.broadcast_to(np.asarray(tokens), slots.shape)
        per_layer = np.empty((len(slots), self.num_layers))  # hits [S, L]
        for i, (slot, count) in enumerate(zip(slots.tolist(), tokens.tolist())):
            ids = self._next(slot, int(count), decode, advance=True)
            per_layer[i] = resident[self._layer, ids].sum(axis=(0, 2))
        choices = tokens * self.top_k
        weighted_choices = choices * self._sens_sum[slots]
        counts = self._counts
        counts[slots, 0] += per_layer.sum(axis=1)
        counts[slots, 1] += choices * self.num_layers
        counts[slots, 2] += (weighted_choices if served_all
                             else np.einsum("sl,sl->s", per_layer, self._sens[slots]))
        counts[slots, 3] += weighted_choices

    def touched(self, slots, tokens, decode):
        counts = np.broadcast_to(np.asarray(tokens), slots.shape)
        mask = np.zeros((self.num_layers, self.num_experts), dtype=bool)
        for slot, count in zip(slots.tolist(), counts.tolist()):
            mask[self._layer, self._next(slot, int(count), decode, advance=False)] = True
        return mask
