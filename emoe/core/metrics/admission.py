"""What admission did over a run, counted alike by the simulator and the server from the plans
the shared scheduler made (``StepPlan.deferred`` and ``StepPlan.slowdown``)."""

from __future__ import annotations

from dataclasses import dataclass

from emoe.core.plan import StepPlan


@dataclass(slots=True)
class AdmissionCounters:
    """``deferred``: waiting requests that fitted in memory but the policy held back, summed
    over plans (one request held back for ten steps counts ten). ``estimated_s``: the seconds
    of the steps whose plan costed admission with an estimate (the ``emoe`` policy's Eq. 3);
    ``slowdown_s``: those seconds, each weighted by the ratio of measured to modelled step time
    Eq. 3 used in its plan. Their quotient, ``slowdown``, is the time-weighted ratio: how much
    slower than its model Eq. 3 believed the engine to be while it decided."""

    deferred: int = 0
    estimated_s: float = 0.0
    slowdown_s: float = 0.0

    def record(self, plan: StepPlan, seconds: float) -> None:
        """A plan and the seconds of its step, from the plan to the step's end."""
        self.deferred += plan.deferred
        if plan.slowdown is not None and seconds > 0:
            self.estimated_s += seconds
            self.slowdown_s += plan.slowdown * seconds

    @property
    def slowdown(self) -> float | None:
        return self.slowdown_s / self.estimated_s if self.estimated_s > 0 else None

    def since(self, earlier: AdmissionCounters) -> AdmissionCounters:
        """What was counted after ``earlier`` (a copy taken then)."""
        return AdmissionCounters(self.deferred - earlier.deferred,
                                 self.estimated_s - earlier.estimated_s,
                                 self.slowdown_s - earlier.slowdown_s)
