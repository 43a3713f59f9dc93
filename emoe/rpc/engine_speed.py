"""The engine's speed as served, against its profile: every step's measured compute beside
what the profile's step model says for the same step (its tokens, decodes, the context they
attend, its prefill chunks' pairs; the expert handler's overhead where the engine has one).

``emoe serve --profile`` keeps the sums (GetStats ``engine_speed``); their ratio over a window
is how fast the engine ran then against the profile, which already counts the serving path's
own slowdown (``serving.engine_scale``). ``emoe fidelity`` reads the sums before and after a
replay. Steps that fetched an expert on a miss are summed apart (their compute includes the
fetches' stalls, which the step model does not): with the speed of the others they give what
a fetch cost as served (``fetch_cost_s``).
"""

from __future__ import annotations

from dataclasses import dataclass

from emoe.core.plan import StepPlan, StepResult
from emoe.core.profile import HandlerOverhead, StepTimes, chunk_pairs


@dataclass
class EngineSpeed:
    steps: StepTimes
    handler: HandlerOverhead | None = None
    counted: int = 0
    compute_s: float = 0.0
    profiled_s: float = 0.0
    fetch_steps: int = 0
    fetched: int = 0
    fetch_compute_s: float = 0.0
    fetch_profiled_s: float = 0.0

    def profiled(self, plan: StepPlan, context_tokens: int) -> float:
        """The profile's compute for ``plan`` as one step whose decodes attend
        ``context_tokens`` tokens in all."""
        prefill = sum(c.num_tokens for c in plan.prefill)
        decode = len(plan.decode)
        pairs = chunk_pairs(plan.prefill)
        seconds = self.steps.step_s(prefill + decode, decode, context_tokens, pairs,
                                    max(1, len(plan.prefill)))
        if self.handler is not None:
            seconds += self.handler.seconds(prefill, decode)
        return seconds

    def observe(self, plan: StepPlan, result: StepResult, context_tokens: int) -> None:
        if result.compute_s <= 0 or result.iterations != 1:
            return
        if result.fetched_on_miss:
            self.fetch_steps += 1
            self.fetched += len(result.fetched_on_miss)
            self.fetch_compute_s += result.compute_s
            self.fetch_profiled_s += self.profiled(plan, context_tokens)
            return
        self.counted += 1
        self.compute_s += result.compute_s
        self.profiled_s += self.profiled(plan, context_tokens)


def fetch_cost_s(speed: float, fetched: int, fetch_compute_s: float,
                 fetch_profiled_s: float) -> float | None:
    """Seconds per expert fetched on a miss as served: the fetch steps' compute beyond their
    step model at the engine's ``speed`` (that of the steps without fetches), per fetch."""
    if fetched <= 0:
        return None
    return (fetch_compute_s - speed * fetch_profiled_s) / fetched
