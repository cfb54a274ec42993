from protos.switchyard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChunkError(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_ERROR_NONE: _ClassVar[ChunkError]
    CHUNK_ERROR_QUEUE_FULL: _ClassVar[ChunkError]
    CHUNK_ERROR_INVALID: _ClassVar[ChunkError]
    CHUNK_ERROR_UNAVAILABLE: _ClassVar[ChunkError]
    CHUNK_ERROR_INTERNAL: _ClassVar[ChunkError]
    CHUNK_ERROR_NOT_FOUND: _ClassVar[ChunkError]
    CHUNK_ERROR_DEADLINE: _ClassVar[ChunkError]

class KvEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_EVENT_KIND_UNSPECIFIED: _ClassVar[KvEventKind]
    KV_EVENT_KIND_STORED: _ClassVar[KvEventKind]
    KV_EVENT_KIND_REMOVED: _ClassVar[KvEventKind]
    KV_EVENT_KIND_CLEARED: _ClassVar[KvEventKind]
CHUNK_ERROR_NONE: ChunkError
CHUNK_ERROR_QUEUE_FULL: ChunkError
CHUNK_ERROR_INVALID: ChunkError
CHUNK_ERROR_UNAVAILABLE: ChunkError
CHUNK_ERROR_INTERNAL: ChunkError
CHUNK_ERROR_NOT_FOUND: ChunkError
CHUNK_ERROR_DEADLINE: ChunkError
KV_EVENT_KIND_UNSPECIFIED: KvEventKind
KV_EVENT_KIND_STORED: KvEventKind
KV_EVENT_KIND_REMOVED: KvEventKind
KV_EVENT_KIND_CLEARED: KvEventKind

class BatchRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "priority", "adapter_id", "reply_subject", "traceparent", "deadline_unix_ms", "prompt_text", "tenant", "tenant_weight", "service_class", "resume_token_ids", "attempt", "embed_lengths", "embed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TENANT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    EMBED_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    priority: int
    adapter_id: str
    reply_subject: str
    traceparent: str
    deadline_unix_ms: int
    prompt_text: str
    tenant: str
    tenant_weight: float
    service_class: str
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    attempt: int
    embed_lengths: _containers.RepeatedScalarFieldContainer[int]
    embed: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., adapter_id: _Optional[str] = ..., reply_subject: _Optional[str] = ..., traceparent: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., prompt_text: _Optional[str] = ..., tenant: _Optional[str] = ..., tenant_weight: _Optional[float] = ..., service_class: _Optional[str] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., attempt: _Optional[int] = ..., embed_lengths: _Optional[_Iterable[int]] = ..., embed: _Optional[bool] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "finish_reason", "usage", "error", "error_message", "retry_after_ms", "error_field", "attempt", "error_reason", "embed_vectors", "embed_dim")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    EMBED_VECTORS_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    error: ChunkError
    error_message: str
    retry_after_ms: int
    error_field: str
    attempt: int
    error_reason: str
    embed_vectors: bytes
    embed_dim: int
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., error: _Optional[_Union[ChunkError, str]] = ..., error_message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., error_field: _Optional[str] = ..., attempt: _Optional[int] = ..., error_reason: _Optional[str] = ..., embed_vectors: _Optional[bytes] = ..., embed_dim: _Optional[int] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("request_id", "reason", "worker_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    worker_id: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("worker_id", "model", "healthy", "draining", "seq", "num_running", "num_waiting", "kv_usage", "num_free_blocks", "num_blocks", "block_size", "max_model_len", "prefix_cache_hit_rate", "num_preemptions", "prompt_tokens_total", "generation_tokens_total", "interval_ms", "adapters", "unhealthy_reason", "model_kind", "forecast_arrivals", "forecast_wait_ms", "queue_room")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    FORECAST_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    FORECAST_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_ROOM_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    healthy: bool
    draining: bool
    seq: int
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    block_size: int
    max_model_len: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    interval_ms: int
    adapters: _containers.RepeatedScalarFieldContainer[str]
    unhealthy_reason: str
    model_kind: str
    forecast_arrivals: _containers.RepeatedScalarFieldContainer[int]
    forecast_wait_ms: _containers.RepeatedScalarFieldContainer[float]
    queue_room: int
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., healthy: _Optional[bool] = ..., draining: _Optional[bool] = ..., seq: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_usage: _Optional[float] = ..., num_free_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., num_preemptions: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., generation_tokens_total: _Optional[int] = ..., interval_ms: _Optional[int] = ..., adapters: _Optional[_Iterable[str]] = ..., unhealthy_reason: _Optional[str] = ..., model_kind: _Optional[str] = ..., forecast_arrivals: _Optional[_Iterable[int]] = ..., forecast_wait_ms: _Optional[_Iterable[float]] = ..., queue_room: _Optional[int] = ...) -> None: ...

class KvEvent(_message.Message):
    __slots__ = ("kind", "block_hashes", "parent_hash", "token_ids", "adapter_id", "block_size")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    kind: KvEventKind
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    parent_hash: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    adapter_id: str
    block_size: int
    def __init__(self, kind: _Optional[_Union[KvEventKind, str]] = ..., block_hashes: _Optional[_Iterable[int]] = ..., parent_hash: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., adapter_id: _Optional[str] = ..., block_size: _Optional[int] = ...) -> None: ...

class KvEventBatch(_message.Message):
    __slots__ = ("worker_id", "seq", "events")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    seq: int
    events: _containers.RepeatedCompositeFieldContainer[KvEvent]
    def __init__(self, worker_id: _Optional[str] = ..., seq: _Optional[int] = ..., events: _Optional[_Iterable[_Union[KvEvent, _Mapping]]] = ...) -> None: ...

class ModelControl(_message.Message):
    __slots__ = ("action", "model", "adapter", "path", "timeout_s")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    action: str
    model: str
    adapter: str
    path: str
    timeout_s: float
    def __init__(self, action: _Optional[str] = ..., model: _Optional[str] = ..., adapter: _Optional[str] = ..., path: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ModelControlReply(_message.Message):
    __slots__ = ("ok", "error", "code", "adapters", "host_bytes")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    code: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    host_bytes: int
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., code: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., host_bytes: _Optional[int] = ...) -> None: ...
