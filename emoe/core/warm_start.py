"""A warm start from routing history: what a deployment knows from its earlier prompts.

A routing trace of earlier prompts (``emoe record-routing``; not the prompts being served)
gives a planner what it would have learned by the time it serves: the predictor of ``emoe``
and ``predict-every`` has observed every recorded request (prompt and generated tokens), each
task's expected output length (Eq. 2's W_o) is the trace's measured mean, and ``static`` pins
the experts most used over all recorded tokens. ``emoe eval --calibration`` and ``emoe sim
--warm-start`` apply the same history the same way, so the simulator and the engine start
from the same state.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from emoe.core.policy_file import PolicyConfig
from emoe.core.predictor import ExpertPredictor
from emoe.core.tasks import TaskProfile

if TYPE_CHECKING:  # pyarrow loads only when a routing trace is read
    from emoe.core.routing_trace import RoutingTrace


def routing_frequencies(trace: RoutingTrace) -> np.ndarray:
    """``[layers, experts]`` routing frequencies over every token of a trace (prompts and
    generated tokens), each layer summing to 1."""
    counts = sum(r.counts("prefill", trace.num_experts) + r.counts("decode", trace.num_experts)
                 for r in trace.requests.values())
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.sum(axis=1, keepdims=True).clip(min=1.0)


def measured_output_lengths(trace: RoutingTrace,
                            tasks: dict[str, TaskProfile]) -> dict[str, TaskProfile]:
    """The task profiles with ``mean_output_tokens`` set to the trace's mean output per task
    (generated tokens fed back in decode, plus the last one)."""
    out = dict(tasks)
    for task, routings in trace.by_task().items():
        if task in out and routings:
            mean = sum(len(r.decode_ids) + 1 for r in routings) / len(routings)
            out[task] = dataclasses.replace(out[task], mean_output_tokens=max(1, round(mean)))
    return out


def warm_policy(policy: PolicyConfig, trace: RoutingTrace) -> PolicyConfig:
    """The policy with the history's output lengths, and ``static``'s pinned experts where
    the policy names none."""
    frequencies = policy.expert_frequencies
    if frequencies is None and policy.planner == "static":
        frequencies = routing_frequencies(trace).tolist()
    return dataclasses.replace(policy, tasks=measured_output_lengths(trace, policy.tasks),
                               expert_frequencies=frequencies)


def warm_predictor(predictor: ExpertPredictor, trace: RoutingTrace) -> None:
    """Let the predictor observe every recorded request: its prompt, then its generated
    tokens."""
    for routing in trace.requests.values():
        predictor.observe(routing.task, routing.counts("prefill", trace.num_experts))
        if len(routing.decode_ids):
            predictor.observe(routing.task, routing.counts("decode", trace.num_experts),
                              "decode")
