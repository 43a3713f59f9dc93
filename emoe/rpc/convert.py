"""emoe.core plans/results and backend types <-> their emoe.v1 protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from emoe.core.metrics.admission import AdmissionCounters
from emoe.core.plan import PrefillChunk, RequestStepOutput, StepPlan, StepResult
from emoe.core.specs import ModelSpec
from emoe.rpc.backend import BackendInfo, SamplingParams
from emoe.rpc.v1 import scheduler_pb2 as spb
from emoe.rpc.v1 import worker_pb2 as wpb


def sampling_to_proto(s: SamplingParams) -> spb.SamplingParams:
    message = spb.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                 top_k=s.top_k, stop_token_ids=s.stop_token_ids,
                                 ignore_eos=s.ignore_eos)
    if s.seed is not None:
        message.seed = s.seed
    return message


def sampling_from_proto(m: spb.SamplingParams) -> SamplingParams:
    """For the worker protocol, where the scheduler has already resolved every field."""
    return SamplingParams(max_tokens=m.max_tokens, temperature=m.temperature, top_p=m.top_p,
                          top_k=m.top_k, seed=m.seed if m.HasField("seed") else None,
                          stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos)


def keys_to_proto(keys: Iterable[tuple[int, int]]) -> list[wpb.ExpertKey]:
    return [wpb.ExpertKey(layer=layer, expert=expert) for layer, expert in keys]


def keys_from_proto(keys: Iterable[wpb.ExpertKey]) -> tuple[tuple[int, int], ...]:
    return tuple((k.layer, k.expert) for k in keys)


def plan_to_proto(plan: StepPlan) -> wpb.StepPlan:
    return wpb.StepPlan(
        prefill=[wpb.PrefillChunk(request_id=c.request_id, start=c.start, num_tokens=c.num_tokens)
                 for c in plan.prefill],
        decode=plan.decode, iterations=plan.iterations, load=keys_to_proto(plan.load),
        evict=keys_to_proto(plan.evict), run_predictor=plan.run_predictor)


def plan_from_proto(m: wpb.StepPlan) -> StepPlan:
    return StepPlan(
        prefill=[PrefillChunk(c.request_id, c.start, c.num_tokens) for c in m.prefill],
        decode=list(m.decode), iterations=m.iterations,
        load=[(k.layer, k.expert) for k in m.load], evict=[(k.layer, k.expert) for k in m.evict],
        run_predictor=m.run_predictor)


def result_to_proto(r: StepResult) -> wpb.ExecuteStepResponse:
    response = wpb.ExecuteStepResponse(
        step_s=r.finished_at - r.started_at, iterations=r.iterations,
        outputs=[wpb.RequestStepOutput(
            request_id=o.request_id, new_tokens=o.new_tokens, token_ids=o.token_ids,
            finished=o.finished, finish_reason=o.finish_reason, expert_hits=o.expert_hits,
            expert_misses=o.expert_misses, weighted_hits=o.weighted_hits,
            weighted_choices=o.weighted_choices, error=o.error) for o in r.outputs],
        compute_s=r.compute_s, load_wait_s=r.load_wait_s, predictor_s=r.predictor_s,
        bytes_loaded=r.bytes_loaded, fetched_on_miss=keys_to_proto(r.fetched_on_miss),
        evicted_on_miss=keys_to_proto(r.evicted_on_miss))
    for field, routing in ((response.routing, r.routing),
                           (response.decode_routing, r.decode_routing)):
        for request_id, counts in routing.items():
            a = np.asarray(counts)
            field[request_id].CopyFrom(wpb.RoutingCounts(
                num_layers=a.shape[0], num_experts=a.shape[1],
                counts=a.astype(np.int64).ravel().tolist()))
    return response


def _routing_from_proto(routing) -> dict[str, np.ndarray]:
    return {rid: np.asarray(c.counts, dtype=np.int64).reshape(c.num_layers, c.num_experts)
            for rid, c in routing.items()}


def result_from_proto(m: wpb.ExecuteStepResponse, started_at: float, finished_at: float) -> StepResult:
    """Times are the scheduler's: when it sent the step and when the answer came back."""
    return StepResult(
        started_at=started_at, finished_at=finished_at, iterations=m.iterations,
        outputs=[RequestStepOutput(
            request_id=o.request_id, new_tokens=o.new_tokens, token_ids=list(o.token_ids),
            finished=o.finished, finish_reason=o.finish_reason, expert_hits=o.expert_hits,
            expert_misses=o.expert_misses, weighted_hits=o.weighted_hits,
            weighted_choices=o.weighted_choices, error=o.error) for o in m.outputs],
        routing=_routing_from_proto(m.routing),
        decode_routing=_routing_from_proto(m.decode_routing),
        compute_s=m.compute_s, load_wait_s=m.load_wait_s, predictor_s=m.predictor_s,
        bytes_loaded=m.bytes_loaded,
        fetched_on_miss=[(k.layer, k.expert) for k in m.fetched_on_miss],
        evicted_on_miss=[(k.layer, k.expert) for k in m.evicted_on_miss])


def info_to_proto(info: BackendInfo) -> wpb.WorkerInfo:
    model = info.model
    return wpb.WorkerInfo(
        instance_id=info.instance_id,
        model=spb.ModelInfo(name=model.name, num_layers=model.num_layers,
                            num_experts=model.num_experts, top_k=model.top_k,
                            vocab_size=info.vocab_size, max_context=info.max_context,
                            eos_token_id=info.eos_token_id),
        expert_bytes=model.expert_bytes, non_expert_bytes=model.non_expert_bytes,
        kv_bytes_per_token=model.kv_bytes_per_token, hidden_size=model.hidden_size,
        tokenizer_json=info.tokenizer_json, resident=keys_to_proto(info.resident),
        max_running=info.max_running, expert_slots=info.expert_slots,
        tokenizer_config=info.tokenizer_config)


def info_from_proto(m: wpb.WorkerInfo, address: str) -> BackendInfo:
    model = ModelSpec(
        name=m.model.name, num_layers=m.model.num_layers, num_experts=m.model.num_experts,
        top_k=m.model.top_k, expert_bytes=m.expert_bytes, non_expert_bytes=m.non_expert_bytes,
        kv_bytes_per_token=m.kv_bytes_per_token, hidden_size=m.hidden_size,
        provenance=f"reported by engine worker {address}", max_context=m.model.max_context)
    return BackendInfo(model=model, vocab_size=m.model.vocab_size, max_context=m.model.max_context,
                       eos_token_id=m.model.eos_token_id, tokenizer_json=m.tokenizer_json,
                       max_running=m.max_running,
                       resident=keys_from_proto(m.resident),
                       instance_id=m.instance_id, expert_slots=m.expert_slots,
                       tokenizer_config=m.tokenizer_config)


def admission_to_proto(a: AdmissionCounters) -> spb.Admission:
    return spb.Admission(deferred=a.deferred, estimated_s=a.estimated_s, slowdown_s=a.slowdown_s)


def admission_from_proto(m: spb.Admission) -> AdmissionCounters:
    return AdmissionCounters(m.deferred, m.estimated_s, m.slowdown_s)
