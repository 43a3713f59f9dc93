"""What the served engine imposes on the scheduler, in one place for the server and the simulator.

The gRPC server builds its scheduler over an engine with ``serving_scheduler_policy``; the
simulator, when it models that engine (``emoe sim --profile`` of it, ``emoe fidelity``), builds
the same one, so both make the same admission and planning decisions for the same inputs:

- the running batch is capped at the engine's KV slots (``EngineLimits.max_running``);
- with an expert cache (``expert_slots`` > 0, a planner other than ``all``) the expert budget is
  the engine's slots, split per layer the same way, the memory budget is non-expert weights +
  slot pool + the engine's KV cache, and the planner is told the pool is fixed;
- a request whose prompt + output exceed the context is refused with the server's reason
  (``context_error``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from emoe.core.errors import ConfigError
from emoe.core.policy_file import PolicyConfig
from emoe.core.specs import ModelSpec


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """A served engine's fixed resources: ``max_running`` KV slots of ``max_context`` tokens
    each, and ``expert_slots`` expert-cache slots (0: every expert stays resident)."""

    max_running: int
    max_context: int
    expert_slots: int = 0

    @property
    def kv_tokens(self) -> int:
        return self.max_running * self.max_context


def context_error(input_tokens: int, output_tokens: int, context: int,
                  prompt_field: str = "token_ids.ids") -> tuple[str, str] | None:
    """(field, problem) when a prompt of ``input_tokens`` and ``output_tokens`` to generate do
    not fit a context of ``context`` tokens (None when they do, or when ``context`` is 0): the
    server's INVALID_ARGUMENT and the simulator's rejection reason."""
    if context <= 0:
        return None
    if input_tokens >= context:
        return prompt_field, (f"{input_tokens} prompt tokens leave no room in the model's "
                              f"context of {context} tokens")
    if input_tokens + output_tokens > context:
        return "sampling.max_tokens", (f"prompt ({input_tokens} tokens) + max_tokens "
                                       f"({output_tokens}) exceeds the model's context of "
                                       f"{context} tokens")
    return None


def with_slots(policy: PolicyConfig, model: ModelSpec, slots: int) -> PolicyConfig:
    """``policy`` with an expert budget of ``slots`` experts: its own per-layer split where it
    has one of that total, else ``expert_budget_bytes`` = ``slots`` experts."""
    try:
        own = policy.slots_per_layer(model)
    except ConfigError:
        own = None
    if own is not None and int(own.sum()) == slots:
        return policy
    return dataclasses.replace(policy, experts_per_layer=None,
                               expert_budget_bytes=slots * model.expert_bytes)


def serving_scheduler_policy(policy: PolicyConfig, model: ModelSpec,
                             limits: EngineLimits) -> tuple[PolicyConfig, bool]:
    """The policy a scheduler runs with over an engine of ``limits``, and whether its expert
    memory is a fixed slot pool (``Scheduler(fixed_expert_slots=...)``)."""
    cache = bool(limits.expert_slots) and policy.planner != "all"
    if cache:
        policy = with_slots(policy, model, limits.expert_slots)
        memory = (model.non_expert_bytes + limits.expert_slots * model.expert_bytes
                  + limits.kv_tokens * model.kv_bytes_per_token)
        if policy.memory_budget_bytes is None or policy.memory_budget_bytes > memory:
            policy = dataclasses.replace(policy, memory_budget_bytes=memory)
    if limits.max_running < policy.max_num_seqs:
        policy = dataclasses.replace(policy, max_num_seqs=limits.max_running)
    return policy, cache
