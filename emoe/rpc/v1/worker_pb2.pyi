from emoe.rpc.v1 import scheduler_pb2 as _scheduler_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetWorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("instance_id", "model", "expert_bytes", "non_expert_bytes", "kv_bytes_per_token", "hidden_size", "tokenizer_json", "resident", "max_running", "expert_slots", "tokenizer_config")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NON_EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: _scheduler_pb2.ModelInfo
    expert_bytes: int
    non_expert_bytes: int
    kv_bytes_per_token: int
    hidden_size: int
    tokenizer_json: str
    resident: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    max_running: int
    expert_slots: int
    tokenizer_config: str
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[_Union[_scheduler_pb2.ModelInfo, _Mapping]] = ..., expert_bytes: _Optional[int] = ..., non_expert_bytes: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., hidden_size: _Optional[int] = ..., tokenizer_json: _Optional[str] = ..., resident: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., max_running: _Optional[int] = ..., expert_slots: _Optional[int] = ..., tokenizer_config: _Optional[str] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ("resident",)
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    resident: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    def __init__(self, resident: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ...) -> None: ...

class PromptSpec(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _scheduler_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_scheduler_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class ExpertKey(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class PrefillChunk(_message.Message):
    __slots__ = ("request_id", "start", "num_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start: int
    num_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., start: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("prefill", "decode", "iterations", "load", "evict", "run_predictor")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    RUN_PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    prefill: _containers.RepeatedCompositeFieldContainer[PrefillChunk]
    decode: _containers.RepeatedScalarFieldContainer[str]
    iterations: int
    load: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    evict: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    run_predictor: bool
    def __init__(self, prefill: _Optional[_Iterable[_Union[PrefillChunk, _Mapping]]] = ..., decode: _Optional[_Iterable[str]] = ..., iterations: _Optional[int] = ..., load: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., evict: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., run_predictor: _Optional[bool] = ...) -> None: ...

class ExecuteStepRequest(_message.Message):
    __slots__ = ("instance_id", "add", "remove", "plan")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    add: _containers.RepeatedCompositeFieldContainer[PromptSpec]
    remove: _containers.RepeatedScalarFieldContainer[str]
    plan: StepPlan
    def __init__(self, instance_id: _Optional[str] = ..., add: _Optional[_Iterable[_Union[PromptSpec, _Mapping]]] = ..., remove: _Optional[_Iterable[str]] = ..., plan: _Optional[_Union[StepPlan, _Mapping]] = ...) -> None: ...

class RequestStepOutput(_message.Message):
    __slots__ = ("request_id", "new_tokens", "token_ids", "finished", "finish_reason", "expert_hits", "expert_misses", "weighted_hits", "weighted_choices", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HITS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MISSES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_HITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_CHOICES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    new_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    expert_hits: int
    expert_misses: int
    weighted_hits: float
    weighted_choices: float
    error: str
    def __init__(self, request_id: _Optional[str] = ..., new_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., expert_hits: _Optional[int] = ..., expert_misses: _Optional[int] = ..., weighted_hits: _Optional[float] = ..., weighted_choices: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class RoutingCounts(_message.Message):
    __slots__ = ("num_layers", "num_experts", "counts")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_experts: int
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ExecuteStepResponse(_message.Message):
    __slots__ = ("step_s", "iterations", "outputs", "routing", "compute_s", "load_wait_s", "predictor_s", "bytes_loaded", "fetched_on_miss", "evicted_on_miss", "decode_routing")
    class RoutingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: RoutingCounts
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[RoutingCounts, _Mapping]] = ...) -> None: ...
    class DecodeRoutingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: RoutingCounts
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[RoutingCounts, _Mapping]] = ...) -> None: ...
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    FETCHED_ON_MISS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_ON_MISS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ROUTING_FIELD_NUMBER: _ClassVar[int]
    step_s: float
    iterations: int
    outputs: _containers.RepeatedCompositeFieldContainer[RequestStepOutput]
    routing: _containers.MessageMap[str, RoutingCounts]
    compute_s: float
    load_wait_s: float
    predictor_s: float
    bytes_loaded: int
    fetched_on_miss: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    evicted_on_miss: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    decode_routing: _containers.MessageMap[str, RoutingCounts]
    def __init__(self, step_s: _Optional[float] = ..., iterations: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[RequestStepOutput, _Mapping]]] = ..., routing: _Optional[_Mapping[str, RoutingCounts]] = ..., compute_s: _Optional[float] = ..., load_wait_s: _Optional[float] = ..., predictor_s: _Optional[float] = ..., bytes_loaded: _Optional[int] = ..., fetched_on_miss: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., evicted_on_miss: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., decode_routing: _Optional[_Mapping[str, RoutingCounts]] = ...) -> None: ...
