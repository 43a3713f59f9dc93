"""Step-time cost model: how long the engine computes for a step of prefill and decode tokens,
and what the serving path adds to each step."""

from __future__ import annotations

import dataclasses
import math

from emoe.core.profile import HandlerOverhead, ServingCosts, StepTimes
from emoe.core.specs import HardwareSpec, ModelSpec
from emoe.sim.speed import SpeedTimeline


class CostModel:
    """Step time over one or many decode iterations.

    Compute, by default the linear model of ``HardwareSpec``: one iteration costs
    ``fixed + decode_s_per_token * D + attention_s_per_context_token * C`` plus
    ``prefill_s_per_token * P`` when it carries prefill, where ``fixed`` is the step overhead
    plus reading the resident weights once. With measured ``steps`` (a profile's step table) an
    iteration costs ``steps.step_s(P + D, D, C, pairs, chunks)`` instead, for the prefill
    chunks' count and attended query-key pairs (``emoe.core.profile.attended_pairs``).

    ``serving`` (a profile's serving costs) scales the compute by its ``engine_scale`` (a served
    engine shares its interpreter with the serving path) and adds ``step_s + token_s * (D +
    first tokens)`` to every iteration: the serving loop's time between steps.

    ``speed`` (with ``serving``): the machine ran that much slower than profiled, the
    engine's steps and every serving-path cost alike, all of them the one interpreter's work,
    a step that runs a prompt chunk at the prefill speed (x its prompt size's factor in
    ``speed.prefill_shape``, its serving path too), a decode-only step's every token
    streamed ``speed.decode_token_s`` beyond the profile's; ``at(now)`` sets the costs of the
    window ``now`` falls in.

    ``offload`` (a profile's handler overhead, given when the policy serves through an expert
    cache: any planner but ``all``) adds what the expert handler costs to every iteration's
    compute (``handler_s``).

    Over ``n`` decode iterations the context ``C`` grows by ``D`` tokens per iteration, which
    the closed forms below sum exactly.
    """

    def __init__(self, hardware: HardwareSpec, model: ModelSpec, steps: StepTimes | None = None,
                 serving: ServingCosts | None = None, offload: HandlerOverhead | None = None,
                 speed: SpeedTimeline = SpeedTimeline.constant(1.0)):
        self.hardware = hardware
        self.model = model
        self.steps = steps
        self.offload = offload
        self.speed = speed
        self._shape = speed.prefill_shape
        self._served = self._served_prefill = None
        if serving is not None:
            decode = dataclasses.replace(serving,
                                         token_s=serving.token_s + speed.decode_token_s)
            self._served = [_slower(decode, s) for s in speed.speeds]
            self._served_prefill = [_slower(serving, s)
                                    for s in speed.prefill_speeds or speed.speeds]
        self._window = -1
        self.serving: ServingCosts | None = None  # decode-only steps and the client's way
        self._prefill_serving: ServingCosts | None = None  # steps that run a prompt chunk
        self._scale = self._prefill_scale = 1.0
        self.at(0.0)

    def at(self, now: float) -> float:
        """Cost what runs from ``now`` at the speed of its window; returns when that window
        ends (inf: the last one)."""
        window = self.speed.window(now)
        if window != self._window and self._served is not None:
            self._window = window
            self.serving = self._served[window]
            self._prefill_serving = self._served_prefill[window]
            self._scale = self.serving.engine_scale
            self._prefill_scale = self._prefill_serving.engine_scale
        return self.speed.next_change(window) if self._served is not None else math.inf

    def arrival_s(self, t: float) -> float:
        """The serving loop's work at time ``t`` to accept a request that arrived while it was
        busy (``speed.arrival_s`` at the window's speed)."""
        if not self.speed.arrival_s:
            return 0.0
        return self.speed.arrival_s * self.speed.speeds[self.speed.window(t)]

    def serving_at(self, t: float) -> ServingCosts | None:
        """The serving path's costs at time ``t``."""
        return None if self._served is None else self._served[self.speed.window(t)]

    def fixed_s(self, resident_experts: int) -> float:
        hw = self.hardware
        if hw.hbm_bandwidth_bytes_per_s <= 0:
            return hw.step_overhead_s
        weight_bytes = self.model.non_expert_bytes + resident_experts * self.model.expert_bytes
        return hw.step_overhead_s + weight_bytes / hw.hbm_bandwidth_bytes_per_s

    def _decode_iteration_s(self, decode_tokens: int, resident_experts: int) -> float:
        """A decode-only iteration's compute without its attention over context."""
        if self.steps is not None:
            return self.steps.step_s(decode_tokens, decode_tokens, 0)
        return self.fixed_s(resident_experts) + self.hardware.decode_s_per_token * decode_tokens

    def _per_context_token_s(self) -> float:
        if self.steps is not None:
            return self.steps.per_context_token_s
        return self.hardware.attention_s_per_context_token

    def step_s(self, *, prefill_tokens: int, decode_tokens: int, context_tokens: int,
               resident_experts: int, iterations: int = 1, prefill_chunks: int = 1,
               prefill_pairs: float | None = None) -> float:
        """Compute time of ``iterations`` iterations; prefill (if any) runs in the first, in
        ``prefill_chunks`` chunks attending ``prefill_pairs`` pairs (default: one prompt from
        its start), and then all of them at the prefill speed (a step with prefill runs one
        iteration)."""
        attended = iterations * context_tokens + decode_tokens * iterations * (iterations - 1) / 2
        attention = self._per_context_token_s() * attended
        handler = self.handler_s(prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                                 iterations=iterations)
        scale = self._prefill_scale * self._shape_of(prefill_tokens) if prefill_tokens \
            else self._scale
        if self.steps is not None and prefill_tokens:
            first = self.steps.step_s(prefill_tokens + decode_tokens, decode_tokens, 0,
                                      prefill_pairs, prefill_chunks)
            rest = (iterations - 1) * self._decode_iteration_s(decode_tokens, resident_experts)
            return scale * (first + rest + attention + handler)
        return scale * (iterations * self._decode_iteration_s(decode_tokens, resident_experts)
                        + attention + self.hardware.prefill_s_per_token * prefill_tokens
                        + handler)

    def handler_s(self, *, prefill_tokens: int, decode_tokens: int, iterations: int = 1) -> float:
        """What the expert handler adds to ``iterations`` iterations' compute (before the
        serving path's ``engine_scale``); prefill (if any) runs in the first."""
        if self.offload is None:
            return 0.0
        return self.offload.seconds(prefill_tokens, decode_tokens, iterations)

    def serving_s(self, *, decode_tokens: int, first_tokens: int = 0, iterations: int = 1,
                  prefill_tokens: int = 0) -> float:
        """What the serving path adds to ``iterations`` iterations streaming ``decode_tokens``
        tokens each, plus ``first_tokens`` first tokens in the first one; ``prefill_tokens``:
        the first runs that many prompt tokens (then there is only one)."""
        if self.serving is None:
            return 0.0
        if prefill_tokens:
            s = self._prefill_serving
            return (self._shape_of(prefill_tokens)
                    * (s.step_s + s.token_s * (decode_tokens + first_tokens)))
        s = self.serving
        return iterations * (s.step_s + s.token_s * decode_tokens) + s.token_s * first_tokens

    def _shape_of(self, prefill_tokens: int) -> float:
        """A prompt step's factor for its prompt size (``speed.prefill_shape``)."""
        return 1.0 if self._shape is None else self._shape.factor(prefill_tokens)

    def decode_iteration_line(self, *, decode_tokens: int, context_tokens: int,
                              resident_experts: int) -> tuple[float, float]:
        """(a, b): iteration i (from 0) of a decode-only macro step starting at
        ``context_tokens`` costs a + b i, the loop's serving work included, so its first n
        iterations cost a n + b n (n - 1) / 2 (``step_s`` + ``serving_s``)."""
        c = self._scale * self._per_context_token_s()
        a = (self._scale * (self._decode_iteration_s(decode_tokens, resident_experts)
                            + self.handler_s(prefill_tokens=0, decode_tokens=decode_tokens))
             + c * context_tokens + self.serving_s(decode_tokens=decode_tokens))
        return a, c * decode_tokens

    def iterations_within(self, budget_s: float, *, decode_tokens: int, context_tokens: int,
                          resident_experts: int) -> int:
        """The iteration during which ``budget_s`` of decode time runs out (1-based).

        That is the smallest n with step_s(n) + serving_s(n) >= budget_s: the iteration an
        event at ``budget_s`` falls in, after which a macro step must stop.
        """
        if budget_s <= 0:
            return 1
        a, b = self.decode_iteration_line(decode_tokens=decode_tokens,
                                          context_tokens=context_tokens,
                                          resident_experts=resident_experts)
        if b <= 0:
            return max(1, math.ceil(budget_s / a))
        half = a - b / 2
        n = (-half + math.sqrt(half * half + 2 * b * budget_s)) / b
        return max(1, math.ceil(n - 1e-9))


def _slower(serving: ServingCosts, speed: float) -> ServingCosts:
    if speed == 1.0:
        return serving
    return ServingCosts(**{f.name: getattr(serving, f.name) * speed
                           for f in dataclasses.fields(ServingCosts)})
