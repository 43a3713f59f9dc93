"""The engine's speed as served, against its profile: every step's measured compute beside
what the profile's step model says for the same step (its tokens, decodes, the context they
attend, its prefill chunks' pairs; the expert handler's overhead where the engine has one).

``emoe serve --profile`` keeps the sums (GetStats ``engine_speed``); their ratio over a window
is how fast the engine ran then against the profile, which already counts the serving path's
own slowdown (``serving.engine_scale``). ``emoe fidelity`` reads the sums before and after a
replay. Steps that fetched an expert on a miss are left out: their compute includes the
fetches' stalls, which the step model does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from emoe.core.plan import StepPlan, StepResult
from emoe.core.profile import HandlerOverhead, StepTimes, attended_pairs


@dataclass
class EngineSpeed:
    steps: StepTimes
    handler: HandlerOverhead | None = None
    counted: int = 0
    compute_s: float = 0.0
    profiled_s: float = 0.0

    def profiled(self, plan: StepPlan, context_tokens: int) -> float:
        """The profile's compute for ``plan`` as one step whose decodes attend
        ``context_tokens`` tokens in all."""
        prefill = sum(c.num_tokens for c in plan.prefill)
        decode = len(plan.decode)
        pairs = sum(attended_pairs(c.start, c.num_tokens) for c in plan.prefill)
        seconds = self.steps.step_s(prefill + decode, decode, context_tokens, pairs,
                                    max(1, len(plan.prefill)))
        if self.handler is not None:
            seconds += self.handler.seconds(prefill, decode)
        return seconds

    def observe(self, plan: StepPlan, result: StepResult, context_tokens: int) -> None:
        if result.compute_s <= 0 or result.fetched_on_miss or result.iterations != 1:
            return
        self.counted += 1
        self.compute_s += result.compute_s
        self.profiled_s += self.profiled(plan, context_tokens)
