"""Step-time cost model: how long the GPU computes for a step of prefill and decode tokens."""

from __future__ import annotations

import math

from emoe.core.specs import HardwareSpec, ModelSpec


class CostModel:
    """The linear step-time model of ``HardwareSpec`` over one or many decode iterations.

    One iteration costs ``fixed + decode_s_per_token * D + attention_s_per_context_token * C``
    plus ``prefill_s_per_token * P`` when it carries prefill, where ``fixed`` is the step
    overhead plus reading the resident weights once. Over ``n`` decode iterations the context
    ``C`` grows by ``D`` tokens per iteration, which the closed forms below sum exactly.
    """

    def __init__(self, hardware: HardwareSpec, model: ModelSpec):
        self.hardware = hardware
        self.model = model

    def fixed_s(self, resident_experts: int) -> float:
        hw = self.hardware
        if hw.hbm_bandwidth_bytes_per_s <= 0:
            return hw.step_overhead_s
        weight_bytes = self.model.non_expert_bytes + resident_experts * self.model.expert_bytes
        return hw.step_overhead_s + weight_bytes / hw.hbm_bandwidth_bytes_per_s

    def step_s(self, *, prefill_tokens: int, decode_tokens: int, context_tokens: int,
               resident_experts: int, iterations: int = 1) -> float:
        """Compute time of ``iterations`` iterations; prefill (if any) runs in the first."""
        hw = self.hardware
        per_iteration = self.fixed_s(resident_experts) + hw.decode_s_per_token * decode_tokens
        attended = iterations * context_tokens + decode_tokens * iterations * (iterations - 1) / 2
        return (iterations * per_iteration + hw.attention_s_per_context_token * attended
                + hw.prefill_s_per_token * prefill_tokens)

    def iterations_within(self, budget_s: float, *, decode_tokens: int, context_tokens: int,
                          resident_experts: int) -> int:
        """The iteration during which ``budget_s`` of decode time runs out (1-based).

        That is the smallest n with step_s(n) >= budget_s: the iteration an event at
        ``budget_s`` falls in, after which a macro step must stop.
        """
        if budget_s <= 0:
            return 1
        hw = self.hardware
        a = (self.fixed_s(resident_experts) + hw.decode_s_per_token * decode_tokens
             + hw.attention_s_per_context_token * context_tokens)
        b = hw.attention_s_per_context_token * decode_tokens  # step_s(n) = a n + b n (n - 1) / 2
        if b <= 0:
            return max(1, math.ceil(budget_s / a))
        half = a - b / 2
        n = (-half + math.sqrt(half * half + 2 * b * budget_s)) / b
        return max(1, math.ceil(n - 1e-9))
