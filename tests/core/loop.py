"""A minimal backend for scheduler tests: a linear step-time model and known true lengths.

It follows the backend contract of emoe/core/scheduler.py: applies evict-then-load, runs up to
``plan.iterations`` iterations and stops after the first one in which a request finishes or a
request arrives, and reports finishes (end of sequence at ``eos_at[id]`` tokens when given,
else the max-tokens cap, which it leaves to the scheduler to notice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from emoe.core.plan import RequestStepOutput, StepPlan, StepResult
from emoe.core.request import SLO, Request
from emoe.core.specs import HardwareSpec, ModelSpec

TINY_MODEL = ModelSpec("tiny", num_layers=4, num_experts=4, top_k=2, expert_bytes=100,
                       non_expert_bytes=1_000, kv_bytes_per_token=1)
TINY_GPU = HardwareSpec("tiny-gpu", gpu_memory_bytes=100_000, pcie_bandwidth_bytes_per_s=100.0,
                        pcie_latency_s=0.0, step_overhead_s=0.01, prefill_s_per_token=0.001,
                        decode_s_per_token=0.001, predictor_s=0.5)


def make_request(rid: str, arrival: float = 0.0, task: str = "qa", input_tokens: int = 10,
                 output_tokens: int = 5, ttft: float = 10.0, tpot: float = 1.0,
                 expected: int | None = None) -> Request:
    return Request(rid, arrival, task, input_tokens, output_tokens, SLO(ttft, tpot),
                   expected_output_tokens=expected)


@dataclass
class LoopBackend:
    """Runs plans; records what it saw so tests can check invariants."""

    model: ModelSpec = TINY_MODEL
    hardware: HardwareSpec = TINY_GPU
    eos_at: dict[str, int] = field(default_factory=dict)
    routing: dict[str, np.ndarray] = field(default_factory=dict)
    resident: set = field(default_factory=set)
    generated: dict[str, int] = field(default_factory=dict)
    plans: list[StepPlan] = field(default_factory=list)

    def execute(self, plan: StepPlan, now: float, next_arrival: float,
                requests: dict[str, Request]) -> StepResult:
        self.plans.append(plan)
        for key in plan.evict:
            assert key in self.resident, f"evict of non-resident {key}"
            self.resident.remove(key)
        for key in plan.load:
            assert key not in self.resident, f"load of resident {key}"
            self.resident.add(key)
        hw = self.hardware
        load_s = len(plan.load) * (hw.pcie_latency_s
                                   + self.model.expert_bytes / hw.pcie_bandwidth_bytes_per_s)
        prefill = sum(c.num_tokens for c in plan.prefill)
        t = now + load_s + (hw.predictor_s if plan.run_predictor else 0.0)
        first_tokens = [c.request_id for c in plan.prefill
                        if c.start + c.num_tokens == requests[c.request_id].input_tokens]
        outputs: list[RequestStepOutput] = []
        routing = {rid: self.routing[rid] for rid in first_tokens if rid in self.routing}
        iterations = 0
        while True:
            iterations += 1
            t += (hw.step_overhead_s + hw.prefill_s_per_token * (prefill if iterations == 1 else 0)
                  + hw.decode_s_per_token * len(plan.decode))
            ended = []
            for rid in plan.decode + (first_tokens if iterations == 1 else []):
                self.generated[rid] = self.generated.get(rid, 0) + 1
                limit = min(self.eos_at.get(rid, math.inf), requests[rid].output_tokens)
                if self.generated[rid] >= limit:
                    ended.append(rid)
            if ended or iterations >= plan.iterations or t >= next_arrival:
                break
        for rid in ended:
            if self.eos_at.get(rid, math.inf) <= requests[rid].output_tokens:
                outputs.append(RequestStepOutput(rid, finished=True, finish_reason="stop"))
        return StepResult(now, t, iterations=iterations, outputs=outputs, routing=routing,
                          compute_s=t - now - load_s)


def run(scheduler, requests: list[Request], backend: LoopBackend | None = None,
        max_iterations: int | None = None, max_steps: int = 100_000) -> tuple[float, LoopBackend]:
    """Drive ``scheduler`` over ``requests`` (sorted by arrival) until all are done."""
    backend = backend or LoopBackend(scheduler.model, scheduler.hardware)
    pending = sorted(requests, key=lambda r: r.arrival)
    by_id = {r.id: r for r in requests}
    now, i = 0.0, 0
    for _ in range(max_steps):
        while i < len(pending) and pending[i].arrival <= now:
            scheduler.add_request(pending[i])
            i += 1
        plan = scheduler.next_step(now, max_iterations)
        if plan.empty:
            if i == len(pending):
                return now, backend
            now = pending[i].arrival
            continue
        next_arrival = pending[i].arrival if i < len(pending) else math.inf
        result = backend.execute(plan, now, next_arrival, by_id)
        scheduler.on_step_done(result)
        now = result.finished_at
    raise AssertionError("loop did not finish")
