from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_ABORTED: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_ABORTED: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "task", "slo", "sampling", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: TokenIds
    task: str
    slo: SLO
    sampling: SamplingParams
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., task: _Optional[str] = ..., slo: _Optional[_Union[SLO, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SLO(_message.Message):
    __slots__ = ("ttft_s", "tpot_s")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    tpot_s: float
    def __init__(self, ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "completion")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    completion: Completion
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., completion: _Optional[_Union[Completion, _Mapping]] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("finish_reason", "task", "prompt_tokens", "output_tokens", "timings", "slo_met", "expert_hits", "expert_misses")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SLO_MET_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HITS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MISSES_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    task: str
    prompt_tokens: int
    output_tokens: int
    timings: Timings
    slo_met: bool
    expert_hits: int
    expert_misses: int
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., task: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., slo_met: _Optional[bool] = ..., expert_hits: _Optional[int] = ..., expert_misses: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_s", "ttft_s", "tpot_s", "total_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    ttft_s: float
    tpot_s: float
    total_s: float
    def __init__(self, queue_s: _Optional[float] = ..., ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "model", "policy", "tasks", "default_task", "max_queue", "default_max_tokens", "workers", "policy_in_force", "serving", "not_serving_reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TASK_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: ModelInfo
    policy: str
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    default_task: str
    max_queue: int
    default_max_tokens: int
    workers: _containers.RepeatedScalarFieldContainer[str]
    policy_in_force: PolicyInfo
    serving: bool
    not_serving_reason: str
    def __init__(self, version: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., policy: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ..., default_task: _Optional[str] = ..., max_queue: _Optional[int] = ..., default_max_tokens: _Optional[int] = ..., workers: _Optional[_Iterable[str]] = ..., policy_in_force: _Optional[_Union[PolicyInfo, _Mapping]] = ..., serving: _Optional[bool] = ..., not_serving_reason: _Optional[str] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("scheduling", "planner", "predictor", "prediction_interval", "expert_budget_bytes", "experts_per_layer", "miss_policy", "sensitivity_source", "memory_budget_bytes", "max_num_seqs", "max_batch_tokens", "source", "tuned_for")
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    MISS_POLICY_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TUNED_FOR_FIELD_NUMBER: _ClassVar[int]
    scheduling: str
    planner: str
    predictor: str
    prediction_interval: int
    expert_budget_bytes: int
    experts_per_layer: _containers.RepeatedScalarFieldContainer[int]
    miss_policy: str
    sensitivity_source: str
    memory_budget_bytes: int
    max_num_seqs: int
    max_batch_tokens: int
    source: str
    tuned_for: str
    def __init__(self, scheduling: _Optional[str] = ..., planner: _Optional[str] = ..., predictor: _Optional[str] = ..., prediction_interval: _Optional[int] = ..., expert_budget_bytes: _Optional[int] = ..., experts_per_layer: _Optional[_Iterable[int]] = ..., miss_policy: _Optional[str] = ..., sensitivity_source: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., source: _Optional[str] = ..., tuned_for: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "num_layers", "num_experts", "top_k", "vocab_size", "max_context", "eos_token_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_layers: int
    num_experts: int
    top_k: int
    vocab_size: int
    max_context: int
    eos_token_id: int
    def __init__(self, name: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., eos_token_id: _Optional[int] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "ttft_s", "tpot_s", "keywords")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    ttft_s: float
    tpot_s: float
    keywords: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., keywords: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("uptime_s", "waiting", "running", "tasks", "experts", "engine_speed", "admission")
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SPEED_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    uptime_s: float
    waiting: int
    running: int
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStats]
    experts: ExpertStats
    engine_speed: EngineSpeed
    admission: Admission
    def __init__(self, uptime_s: _Optional[float] = ..., waiting: _Optional[int] = ..., running: _Optional[int] = ..., tasks: _Optional[_Iterable[_Union[TaskStats, _Mapping]]] = ..., experts: _Optional[_Union[ExpertStats, _Mapping]] = ..., engine_speed: _Optional[_Union[EngineSpeed, _Mapping]] = ..., admission: _Optional[_Union[Admission, _Mapping]] = ...) -> None: ...

class Admission(_message.Message):
    __slots__ = ("deferred", "estimated_s", "slowdown_s")
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_S_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_S_FIELD_NUMBER: _ClassVar[int]
    deferred: int
    estimated_s: float
    slowdown_s: float
    def __init__(self, deferred: _Optional[int] = ..., estimated_s: _Optional[float] = ..., slowdown_s: _Optional[float] = ...) -> None: ...

class EngineSpeed(_message.Message):
    __slots__ = ("steps", "compute_s", "profiled_s", "fetch_steps", "fetched", "fetch_compute_s", "fetch_profiled_s", "cycles", "cycle_s", "cycle_profiled_s", "prefill_cycles", "prefill_cycle_s", "prefill_cycle_profiled_s", "cycle_log_sum", "cycle_log_sq_sum", "cycle_lag_pairs", "cycle_lag_sum", "prefill_cycle_log_sum", "prefill_cycle_log_sq_sum", "prefill_cycle_lag_pairs", "prefill_cycle_lag_sum", "decode_streamed", "decode_streamed_sq", "decode_cycle_streamed", "decode_model_streamed", "arrivals", "arrival_cycles", "arrival_cycle_s", "arrival_cycle_profiled_s", "prefill_arrivals", "fetch_cycle_s", "fetch_cycle_profiled_s", "fetch_cycle_fetched", "fetch_cycle_arrivals", "prefill_fetch_cycle_s", "prefill_fetch_cycle_profiled_s", "prefill_fetch_cycle_fetched", "prefill_fetch_cycle_arrivals", "prefill_segment_tokens", "prefill_segment_cycle_s", "prefill_segment_cycle_profiled_s")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    PROFILED_S_FIELD_NUMBER: _ClassVar[int]
    FETCH_STEPS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FIELD_NUMBER: _ClassVar[int]
    FETCH_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    FETCH_PROFILED_S_FIELD_NUMBER: _ClassVar[int]
    CYCLES_FIELD_NUMBER: _ClassVar[int]
    CYCLE_S_FIELD_NUMBER: _ClassVar[int]
    CYCLE_PROFILED_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CYCLES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CYCLE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CYCLE_PROFILED_S_FIELD_NUMBER: _ClassVar[int]
    CYCLE_LOG_SUM_FIELD_NUMBER: _ClassVar[int]
    CYCLE_LOG_SQ_SUM_FIELD_NUMBER: _ClassVar[int]
    CYCLE_LAG_PAIRS_FIELD_NUMBER: _ClassVar[int]
    CYCLE_LAG_SUM_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CYCLE_LOG_SUM_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CYCLE_LOG_SQ_SUM_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CYCLE_LAG_PAIRS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CYCLE_LAG_SUM_FIELD_NUMBER: _ClassVar[int]
    DECODE_STREAMED_FIELD_NUMBER: _ClassVar[int]
    DECODE_STREAMED_SQ_FIELD_NUMBER: _ClassVar[int]
    DECODE_CYCLE_STREAMED_FIELD_NUMBER: _ClassVar[int]
    DECODE_MODEL_STREAMED_FIELD_NUMBER: _ClassVar[int]
    ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_CYCLES_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_CYCLE_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_CYCLE_PROFILED_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    FETCH_CYCLE_S_FIELD_NUMBER: _ClassVar[int]
    FETCH_CYCLE_PROFILED_S_FIELD_NUMBER: _ClassVar[int]
    FETCH_CYCLE_FETCHED_FIELD_NUMBER: _ClassVar[int]
    FETCH_CYCLE_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FETCH_CYCLE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FETCH_CYCLE_PROFILED_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FETCH_CYCLE_FETCHED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FETCH_CYCLE_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SEGMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SEGMENT_CYCLE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SEGMENT_CYCLE_PROFILED_S_FIELD_NUMBER: _ClassVar[int]
    steps: int
    compute_s: float
    profiled_s: float
    fetch_steps: int
    fetched: int
    fetch_compute_s: float
    fetch_profiled_s: float
    cycles: int
    cycle_s: float
    cycle_profiled_s: float
    prefill_cycles: int
    prefill_cycle_s: float
    prefill_cycle_profiled_s: float
    cycle_log_sum: float
    cycle_log_sq_sum: float
    cycle_lag_pairs: int
    cycle_lag_sum: float
    prefill_cycle_log_sum: float
    prefill_cycle_log_sq_sum: float
    prefill_cycle_lag_pairs: int
    prefill_cycle_lag_sum: float
    decode_streamed: int
    decode_streamed_sq: int
    decode_cycle_streamed: float
    decode_model_streamed: float
    arrivals: int
    arrival_cycles: int
    arrival_cycle_s: float
    arrival_cycle_profiled_s: float
    prefill_arrivals: int
    fetch_cycle_s: float
    fetch_cycle_profiled_s: float
    fetch_cycle_fetched: int
    fetch_cycle_arrivals: int
    prefill_fetch_cycle_s: float
    prefill_fetch_cycle_profiled_s: float
    prefill_fetch_cycle_fetched: int
    prefill_fetch_cycle_arrivals: int
    prefill_segment_tokens: _containers.RepeatedScalarFieldContainer[int]
    prefill_segment_cycle_s: _containers.RepeatedScalarFieldContainer[float]
    prefill_segment_cycle_profiled_s: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, steps: _Optional[int] = ..., compute_s: _Optional[float] = ..., profiled_s: _Optional[float] = ..., fetch_steps: _Optional[int] = ..., fetched: _Optional[int] = ..., fetch_compute_s: _Optional[float] = ..., fetch_profiled_s: _Optional[float] = ..., cycles: _Optional[int] = ..., cycle_s: _Optional[float] = ..., cycle_profiled_s: _Optional[float] = ..., prefill_cycles: _Optional[int] = ..., prefill_cycle_s: _Optional[float] = ..., prefill_cycle_profiled_s: _Optional[float] = ..., cycle_log_sum: _Optional[float] = ..., cycle_log_sq_sum: _Optional[float] = ..., cycle_lag_pairs: _Optional[int] = ..., cycle_lag_sum: _Optional[float] = ..., prefill_cycle_log_sum: _Optional[float] = ..., prefill_cycle_log_sq_sum: _Optional[float] = ..., prefill_cycle_lag_pairs: _Optional[int] = ..., prefill_cycle_lag_sum: _Optional[float] = ..., decode_streamed: _Optional[int] = ..., decode_streamed_sq: _Optional[int] = ..., decode_cycle_streamed: _Optional[float] = ..., decode_model_streamed: _Optional[float] = ..., arrivals: _Optional[int] = ..., arrival_cycles: _Optional[int] = ..., arrival_cycle_s: _Optional[float] = ..., arrival_cycle_profiled_s: _Optional[float] = ..., prefill_arrivals: _Optional[int] = ..., fetch_cycle_s: _Optional[float] = ..., fetch_cycle_profiled_s: _Optional[float] = ..., fetch_cycle_fetched: _Optional[int] = ..., fetch_cycle_arrivals: _Optional[int] = ..., prefill_fetch_cycle_s: _Optional[float] = ..., prefill_fetch_cycle_profiled_s: _Optional[float] = ..., prefill_fetch_cycle_fetched: _Optional[int] = ..., prefill_fetch_cycle_arrivals: _Optional[int] = ..., prefill_segment_tokens: _Optional[_Iterable[int]] = ..., prefill_segment_cycle_s: _Optional[_Iterable[float]] = ..., prefill_segment_cycle_profiled_s: _Optional[_Iterable[float]] = ...) -> None: ...

class TaskStats(_message.Message):
    __slots__ = ("task", "submitted", "finished", "aborted", "failed", "slo_met", "slo_attainment", "output_tokens", "queue", "ttft", "tpot", "total")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SLO_MET_FIELD_NUMBER: _ClassVar[int]
    SLO_ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    TTFT_FIELD_NUMBER: _ClassVar[int]
    TPOT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    task: str
    submitted: int
    finished: int
    aborted: int
    failed: int
    slo_met: int
    slo_attainment: float
    output_tokens: int
    queue: Durations
    ttft: Durations
    tpot: Durations
    total: Durations
    def __init__(self, task: _Optional[str] = ..., submitted: _Optional[int] = ..., finished: _Optional[int] = ..., aborted: _Optional[int] = ..., failed: _Optional[int] = ..., slo_met: _Optional[int] = ..., slo_attainment: _Optional[float] = ..., output_tokens: _Optional[int] = ..., queue: _Optional[_Union[Durations, _Mapping]] = ..., ttft: _Optional[_Union[Durations, _Mapping]] = ..., tpot: _Optional[_Union[Durations, _Mapping]] = ..., total: _Optional[_Union[Durations, _Mapping]] = ...) -> None: ...

class Durations(_message.Message):
    __slots__ = ("count", "mean_s", "p50_s", "p90_s", "p99_s", "max_s")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_S_FIELD_NUMBER: _ClassVar[int]
    P50_S_FIELD_NUMBER: _ClassVar[int]
    P90_S_FIELD_NUMBER: _ClassVar[int]
    P99_S_FIELD_NUMBER: _ClassVar[int]
    MAX_S_FIELD_NUMBER: _ClassVar[int]
    count: int
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    def __init__(self, count: _Optional[int] = ..., mean_s: _Optional[float] = ..., p50_s: _Optional[float] = ..., p90_s: _Optional[float] = ..., p99_s: _Optional[float] = ..., max_s: _Optional[float] = ...) -> None: ...

class ExpertStats(_message.Message):
    __slots__ = ("hits", "misses", "hit_rate", "loads", "evictions", "resident", "resident_bytes", "predictor_calls")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_CALLS_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    hit_rate: float
    loads: int
    evictions: int
    resident: int
    resident_bytes: int
    predictor_calls: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ..., resident: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., predictor_calls: _Optional[int] = ...) -> None: ...
