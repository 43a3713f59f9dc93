"""Scheduling policies: the waiting queue's order and who may join the running batch.

Every policy admits requests from the head of its queue while the token, sequence and memory
budgets allow (the scheduler checks those). A policy adds its order (``queue_key``, smaller
first, ties by arrival) and, for ``emoe``, the paper's SLO-protecting check (``admits``).

- ``fcfs``: arrival order; stops at the first request that does not fit.
- ``sjf``: shortest expected output first (``expected_output_tokens`` or the task mean).
- ``edf``: earliest first-token deadline (arrival + TTFT SLO) first.
- ``emoe``: Algorithm 1 as corrected in docs/scheduler.md: requests in order of first-token
  deadline; a request S is admitted if the token budget allows and no running request that
  currently meets its SLO would miss it by Eq. 3; a request that fails is skipped and the next
  one considered (at most ``admission_lookahead`` per step).
"""

from __future__ import annotations

from abc import ABC
from bisect import bisect_left, insort
from typing import ClassVar

from emoe.core.errors import UnknownNameError
from emoe.core.estimates import CostEstimate
from emoe.core.request import Request


class BatchEstimate:
    """The running batch as Eq. 3 sees it during one step's admissions.

    Each member has G (tokens still expected, ``remaining``) and a deadline: the absolute time
    by which it finishes if it meets its SLO, ``arrival + ttft + tpot * (expected output - 1)``.
    ``load_s`` is dE: the expert loading (and predictor time) this step's admissions cause.
    """

    __slots__ = ("now", "cost", "load_s", "new_input_tokens", "_members", "_sorted_remaining")

    def __init__(self, now: float, cost: CostEstimate, load_s: float,
                 members: list[tuple[float, float]]):
        self.now = now
        self.cost = cost
        self.load_s = load_s
        self.new_input_tokens = 0
        self._members = members
        self._sorted_remaining = sorted(remaining for remaining, _ in members)

    def add(self, remaining: float, deadline: float, input_tokens: int) -> None:
        self._members.append((remaining, deadline))
        insort(self._sorted_remaining, remaining)
        self.new_input_tokens += input_tokens

    def protects_slos_with(self, remaining: float, input_tokens: int) -> bool:
        """True when admitting a request (G = ``remaining``, W = ``input_tokens``) makes no
        member that meets its deadline now miss it, by Eq. 3."""
        c_d = self.cost.c_decode
        overhead = self.cost.iteration_overhead_s
        delay = self.load_s + (self.new_input_tokens + input_tokens) * self.cost.c_prefill
        ordered = self._sorted_remaining
        size = len(ordered)
        for g, deadline in self._members:
            finishing_after = size - bisect_left(ordered, g)
            slack = deadline - self.now
            if g * (overhead + finishing_after * c_d) > slack:
                continue
            if remaining >= g:
                finishing_after += 1
            if delay + g * (overhead + finishing_after * c_d) > slack:
                return False
        return True


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    skip_blocked: ClassVar[bool] = False
    """Keep considering later requests when one cannot be admitted (else stop at it)."""
    uses_estimates: ClassVar[bool] = False
    """The scheduler builds a ``BatchEstimate`` for ``admits`` (costs O(batch) per step)."""

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
