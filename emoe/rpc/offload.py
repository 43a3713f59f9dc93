"""Serving with the expert cache: what ``emoe serve``/``emoe worker`` need to run a policy's
expert planner on the real engine.

With a planner other than ``all`` the engine is built with ``OffloadedExperts``: a slot cache
of ``--expert-budget`` (any spelling of ``emoe.core.budget``; default: the policy's
``experts_per_layer``/``expert_budget_bytes``) that carries out each plan's load/evict lists,
and a miss policy (``--miss``; default ``fetch`` for ``lru``, ``reroute`` for the planners
that plan loads themselves). The scheduler is then built from the engine's own numbers
(``emoe.core.serving.serving_scheduler_policy``, which the simulator shares): its expert
budget is the engine's slots, split per layer the same way, its memory budget is non-expert
weights + the slot pool + the engine's KV cache, and it is told the pool is fixed
(``Scheduler(fixed_expert_slots=True)``), so no planner - not the ``emoe`` first prompt
either - plans more resident experts than the pool's slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emoe.core.budget import ExpertBudget
from emoe.core.errors import ConfigError
from emoe.core.policy_file import PolicyConfig
from emoe.core.serving import with_slots
from emoe.core.specs import ModelSpec


@dataclass(frozen=True, slots=True)
class OffloadConfig:
    """How an engine serves ``policy``: ``budget`` overrides the policy's expert budget."""

    policy: PolicyConfig
    budget: ExpertBudget | None = None
    miss: str | None = None

    @property
    def enabled(self) -> bool:
        return self.policy.serves_with_expert_cache


def parse_budget(text: str | None) -> ExpertBudget | None:
    return None if text is None else ExpertBudget.parse(text)


def miss_policy(planner: str, miss: str | None):
    """The executor's miss policy for ``planner``: ``miss`` checked against it, or its default."""
    from emoe.core.experts import PLANNERS, MissMode
    from emoe.engine.offload.executor import MissPolicy

    mode = PLANNERS[planner].miss_mode
    policy = MissPolicy.parse(miss) if miss else (
        MissPolicy.FETCH if mode is MissMode.FETCH else MissPolicy.REROUTE)
    if mode is not MissMode.NONE and (policy is MissPolicy.FETCH) != (mode is MissMode.FETCH):
        raise ConfigError(f"--miss {policy.value}: planner {planner!r} "
                          + ("fetches on a miss (use --miss fetch)" if mode is MissMode.FETCH
                             else "plans loads itself; use --miss reroute or drop"))
    return policy


def engine_slots(config: OffloadConfig, model: ModelSpec) -> tuple[PolicyConfig, np.ndarray]:
    """The policy the engine's cache follows and its slots per layer."""
    policy = config.policy
    if config.budget is not None:
        slots = config.budget.num_slots(model.num_layers, model.num_experts, model.expert_bytes)
        policy = with_slots(policy, model, slots)
    try:
        per_layer = policy.slots_per_layer(model)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; or pass --expert-budget (5/layer, 62.5%, 64MiB)") from None
    return policy, per_layer
