"""The policy in force, as the server reports it: GetServerInfo, the start log line, metrics.

What a policy file asks for is fitted to the served engine (``emoe.core.serving``): its expert
budget becomes the engine's slots, its batch cap the engine's KV slots. This module describes
what the scheduler really runs with, read back from the scheduler itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from emoe.core.experts import MissMode
from emoe.core.policy_file import PolicyConfig
from emoe.core.scheduler import Scheduler
from emoe.rpc.v1 import scheduler_pb2 as pb

_MISS_DEFAULT = {MissMode.NONE: "none (every expert resident)", MissMode.REROUTE: "reroute",
                 MissMode.FETCH: "fetch"}


@dataclass(frozen=True, slots=True)
class PolicyInForce:
    scheduling: str
    planner: str
    predictor: str
    prediction_interval: int
    expert_budget_bytes: int
    experts_per_layer: tuple[int, ...]
    miss_policy: str
    sensitivity_source: str
    memory_budget_bytes: int
    max_num_seqs: int
    max_batch_tokens: int
    source: str
    tuned_for: str

    def to_proto(self) -> pb.PolicyInfo:
        return pb.PolicyInfo(
            scheduling=self.scheduling, planner=self.planner, predictor=self.predictor,
            prediction_interval=self.prediction_interval,
            expert_budget_bytes=self.expert_budget_bytes,
            experts_per_layer=list(self.experts_per_layer), miss_policy=self.miss_policy,
            sensitivity_source=self.sensitivity_source,
            memory_budget_bytes=self.memory_budget_bytes, max_num_seqs=self.max_num_seqs,
            max_batch_tokens=self.max_batch_tokens, source=self.source, tuned_for=self.tuned_for)

    def log_line(self) -> str:
        per_layer = self.experts_per_layer
        layers = (f"{per_layer[0]} per layer" if len(set(per_layer)) == 1
                  else "per layer " + ",".join(map(str, per_layer)))
        return (f"policy in force ({self.source}): scheduling={self.scheduling} "
                f"planner={self.planner} predictor={self.predictor} "
                f"p={self.prediction_interval} expert budget={self.expert_budget_bytes} B "
                f"({sum(per_layer)} experts, {layers}) miss={self.miss_policy} "
                f"sensitivity={self.sensitivity_source} max_num_seqs={self.max_num_seqs} "
                f"max_batch_tokens={self.max_batch_tokens} "
                f"memory budget={self.memory_budget_bytes} B")


def sensitivity_source(policy: PolicyConfig) -> str:
    source = policy.sensitivity_source
    if policy.sensitivity and source:
        return (f"measured ({source.get('mode')} s on {source.get('model')}, "
                f"{source.get('file') or 'embedded in the policy file'})")
    if policy.sensitivity:
        return f"policy file 'sensitivity' table ({', '.join(sorted(policy.sensitivity))})"
    measured = sorted(name for name, t in policy.tasks.items() if t.sensitivity is not None)
    if measured:
        return f"task profiles' per-layer sensitivity ({', '.join(measured)})"
    return "task profiles' insensitive_fraction (input-side layers)"


def policy_in_force(scheduler: Scheduler, miss: str | None, source: str) -> PolicyInForce:
    """What ``scheduler`` runs with; ``miss``: the engine's miss policy (None: the planner's
    default, e.g. when remote workers choose theirs)."""
    config, planner = scheduler.config, scheduler.planner
    slots = tuple(int(n) for n in planner.slots_per_layer)
    return PolicyInForce(
        scheduling=config.scheduling, planner=config.planner, predictor=config.predictor,
        prediction_interval=config.prediction_interval,
        expert_budget_bytes=planner.capacity_bytes, experts_per_layer=slots,
        miss_policy=miss or _MISS_DEFAULT[planner.miss_mode],
        sensitivity_source=sensitivity_source(config),
        memory_budget_bytes=scheduler.memory_budget_bytes, max_num_seqs=config.max_num_seqs,
        max_batch_tokens=config.max_batch_tokens, source=source, tuned_for=config.model)
