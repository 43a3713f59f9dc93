"""Scheduling policies: the waiting queue's order and who may join the running batch.

Every policy admits requests from the head of its queue while the token, sequence and memory
budgets allow (the scheduler checks those). A policy adds its order (``queue_key``, smaller
first, ties by arrival) and, for ``emoe``, the paper's SLO-protecting check (``admits``).

- ``fcfs``: arrival order; stops at the first request that does not fit.
- ``sjf``: shortest expected output first (``expected_output_tokens`` or the task mean).
- ``edf``: earliest first-token deadline (arrival + TTFT SLO) first.
- ``emoe``: Algorithm 1 as corrected in docs/scheduler.md: requests in order of first-token
  deadline, those whose deadline has passed behind those that can still meet it; a request S
  is admitted if the token budget allows and no running request that currently meets its SLO
  target would miss it by Eq. 3; a request that fails is skipped and the next one considered
  (at most ``admission_lookahead`` per step).
"""

from __future__ import annotations

import math
from abc import ABC
from bisect import bisect_right
from typing import ClassVar

import numpy as np

from emoe.core.errors import UnknownNameError
from emoe.core.estimates import CostEstimate
from emoe.core.request import Request


_minimum = np.minimum.reduce  # ndarray.min without its Python-level wrapper


class BatchEstimate:
    """The running batch as Eq. 3 sees it during one step's admissions.

    Each member has G (tokens still expected, ``remaining``) and a target: the time by which it
    must end to meet its SLO (see ``DecodeTargets``). ``load_s`` is dE: the expert loading (and
    predictor time) this step's admissions cause.

    Member i's margin is ``target_i - now - G_i (o + n_i c)``: it currently meets its target when
    the margin is >= 0. A candidate S with G_S and W_S delays every member by
    ``dE + W c_prefill`` (W: the input tokens of S and of those admitted before it in this
    step), and a member with G_i <= G_S by ``G_i c`` more (S outlives it: n_i + 1). Sorted by G,
    the members S outlives are a prefix, so a prefix minimum of ``margin - G c`` and a suffix
    minimum of ``margin`` over the members that meet their targets answer each candidate in
    O(log batch); they are rebuilt (vectorised) only after a member is added.
    """

    __slots__ = ("now", "cost", "load_s", "new_input_tokens", "_remaining", "_targets",
                 "_added", "_slack", "_sorted", "_outlived_min", "_outliving_min")

    def __init__(self, now: float, cost: CostEstimate, load_s: float,
                 remaining: np.ndarray, targets: np.ndarray):
        self.now = now
        self.cost = cost
        self.load_s = load_s
        self.new_input_tokens = 0
        self._remaining = np.asarray(remaining, dtype=np.float64)
        self._targets = np.asarray(targets, dtype=np.float64)
        self._added: list[tuple[float, float]] = []
        self._slack: float | None = None
        self._sorted: list[float] | None = None

    def add(self, remaining: float, target: float, input_tokens: int) -> None:
        """A member that is not decoding yet (admitted in this step, or part-way through its
        prompt) joins the batch for the next candidates' checks."""
        self._added.append((remaining, target))
        self.new_input_tokens += input_tokens
        self._slack = None
        self._sorted = None

    def protects_slos_with(self, remaining: float, input_tokens: int) -> bool:
        """True when admitting a request (G = ``remaining``, W = ``input_tokens``) makes no
        member that meets its target now miss it, by Eq. 3."""
        delay = self.load_s + (self.new_input_tokens + input_tokens) * self.cost.c_prefill
        if self._sorted is None:
            if self._slack is None:
                self._slack = self._lower_bound()
            if self._slack >= delay:
                return True
            self._prepare()
        outlived = bisect_right(self._sorted, remaining)
        return min(self._outlived_min[outlived], self._outliving_min[outlived]) >= delay

    def _merge_added(self) -> None:
        if self._added:
            remaining, targets = zip(*self._added)
            self._remaining = np.concatenate([self._remaining, remaining])
            self._targets = np.concatenate([self._targets, targets])
            self._added = []

    def _lower_bound(self) -> float:
        """A lower bound of every candidate's answer, from the margins with n_i at its largest
        (every member outlives i, and so does the candidate): ``min(target - now - G (o + n c)
        - G c)`` when all those margins are >= 0, else -inf. Each term is, in floating point
        too, at most the exact one, so a delay within it is admitted without sorting the batch
        (the common case); otherwise ``_prepare`` answers exactly."""
        self._merge_added()
        g = self._remaining
        if not len(g):
            return math.inf
        c = self.cost.c_decode
        margin = self._targets - self.now
        margin -= g * (self.cost.iteration_overhead_s + len(g) * c)
        if _minimum(margin) < 0:
            return -math.inf
        margin -= g * c
        return float(_minimum(margin))

    def _prepare(self) -> None:
        self._merge_added()
        g = self._remaining
        c = self.cost.c_decode
        order = np.argsort(g, kind="stable")
        ordered = g[order]
        finishing_after = len(g) - np.searchsorted(ordered, g, side="left")
        margin = self._targets - self.now - g * (self.cost.iteration_overhead_s
                                                 + finishing_after * c)
        meets = margin >= 0
        # members S outlives (ordered[:k]) lose G_i c more; the others only the delay
        outlived = np.where(meets, margin - g * c, np.inf)[order]
        outliving = np.where(meets, margin, np.inf)[order]
        self._sorted = ordered.tolist()
        self._outlived_min = [math.inf, *np.minimum.accumulate(outlived).tolist()]
        self._outliving_min = [*np.minimum.accumulate(outliving[::-1])[::-1].tolist(), math.inf]


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    skip_blocked: ClassVar[bool] = False
    """Keep considering later requests when one cannot be admitted (else stop at it)."""
    uses_estimates: ClassVar[bool] = False
    """The scheduler builds a ``BatchEstimate`` for ``admits``."""
    defers_late: ClassVar[bool] = False
    """``queue_key`` is a first-token deadline; requests past it (they can no longer meet
    their SLO) wait behind every request that still can."""

    def queue_key(self, request: Request, expected_output: float) -> float:
        return request.arrival

    def admits(self, request: Request, expected_output: float, batch: BatchEstimate | None) -> bool:
        return True


class FcfsPolicy(SchedulingPolicy):
    name = "fcfs"


class SjfPolicy(SchedulingPolicy):
    name = "sjf"

    def queue_key(self, request: Request, expected_output: float) -> float:
        return expected_output


class EdfPolicy(SchedulingPolicy):
    name = "edf"

    def queue_key(self, request: Request, expected_output: float) -> float:
        return request.arrival + request.slo.ttft_s


class EmoePolicy(EdfPolicy):
    name = "emoe"
    skip_blocked = True
    uses_estimates = True
    defers_late = True

    def admits(self, request: Request, expected_output: float, batch: BatchEstimate | None) -> bool:
        return batch is None or batch.protects_slos_with(expected_output, request.input_tokens)


POLICIES: dict[str, type[SchedulingPolicy]] = {
    cls.name: cls for cls in (FcfsPolicy, SjfPolicy, EdfPolicy, EmoePolicy)
}


def make_policy(name: str) -> SchedulingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise UnknownNameError("scheduling policy", name, list(POLICIES)) from None
