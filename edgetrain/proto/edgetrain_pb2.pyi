from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT8: _ClassVar[DType]

class RoundStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATUS_UNSPECIFIED: _ClassVar[RoundStatus]
    WORK: _ClassVar[RoundStatus]
    WAIT: _ClassVar[RoundStatus]
    FINISHED: _ClassVar[RoundStatus]
    FAILED: _ClassVar[RoundStatus]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT8: DType
ROUND_STATUS_UNSPECIFIED: RoundStatus
WORK: RoundStatus
WAIT: RoundStatus
FINISHED: RoundStatus
FAILED: RoundStatus

class TensorPart(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    scale: float
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., scale: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("agent_name", "cores", "device", "throughput", "workers", "metrics_address", "data_fingerprint")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    cores: _containers.RepeatedScalarFieldContainer[int]
    device: str
    throughput: float
    workers: int
    metrics_address: str
    data_fingerprint: str
    def __init__(self, agent_name: _Optional[str] = ..., cores: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ..., throughput: _Optional[float] = ..., workers: _Optional[int] = ..., metrics_address: _Optional[str] = ..., data_fingerprint: _Optional[str] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("dataset", "model", "data_fingerprint", "seed", "batch_size", "lr", "optimizer", "momentum", "shard_scheme", "dirichlet_alpha", "max_len", "limit", "update_dtype", "weight_decay", "class_weighting", "lr_decay")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SHARD_SCHEME_FIELD_NUMBER: _ClassVar[int]
    DIRICHLET_ALPHA_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    CLASS_WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    model: str
    data_fingerprint: str
    seed: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    shard_scheme: str
    dirichlet_alpha: float
    max_len: int
    limit: int
    update_dtype: str
    weight_decay: float
    class_weighting: str
    lr_decay: float
    def __init__(self, dataset: _Optional[str] = ..., model: _Optional[str] = ..., data_fingerprint: _Optional[str] = ..., seed: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., optimizer: _Optional[str] = ..., momentum: _Optional[float] = ..., shard_scheme: _Optional[str] = ..., dirichlet_alpha: _Optional[float] = ..., max_len: _Optional[int] = ..., limit: _Optional[int] = ..., update_dtype: _Optional[str] = ..., weight_decay: _Optional[float] = ..., class_weighting: _Optional[str] = ..., lr_decay: _Optional[float] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("agent_id", "session_token", "spec", "paced_uploads")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PACED_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    session_token: str
    spec: RunSpec
    paced_uploads: bool
    def __init__(self, agent_id: _Optional[str] = ..., session_token: _Optional[str] = ..., spec: _Optional[_Union[RunSpec, _Mapping]] = ..., paced_uploads: _Optional[bool] = ...) -> None: ...

class RoundRequest(_message.Message):
    __slots__ = ("agent_id", "after_round", "shared_memory")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    after_round: int
    shared_memory: bool
    def __init__(self, agent_id: _Optional[str] = ..., after_round: _Optional[int] = ..., shared_memory: _Optional[bool] = ...) -> None: ...

class RoundHeader(_message.Message):
    __slots__ = ("status", "round", "rank", "world", "local_steps", "sample_offset", "deadline_unix", "batch_size", "weights_file", "weights_layout", "update_file", "detail", "poll_again_ms", "update_dtype", "budget_seconds", "budget_max_steps")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FILE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FILE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    POLL_AGAIN_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    status: RoundStatus
    round: int
    rank: int
    world: int
    local_steps: int
    sample_offset: int
    deadline_unix: float
    batch_size: int
    weights_file: str
    weights_layout: _containers.RepeatedCompositeFieldContainer[TensorPart]
    update_file: str
    detail: str
    poll_again_ms: int
    update_dtype: str
    budget_seconds: float
    budget_max_steps: int
    def __init__(self, status: _Optional[_Union[RoundStatus, str]] = ..., round: _Optional[int] = ..., rank: _Optional[int] = ..., world: _Optional[int] = ..., local_steps: _Optional[int] = ..., sample_offset: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., batch_size: _Optional[int] = ..., weights_file: _Optional[str] = ..., weights_layout: _Optional[_Iterable[_Union[TensorPart, _Mapping]]] = ..., update_file: _Optional[str] = ..., detail: _Optional[str] = ..., poll_again_ms: _Optional[int] = ..., update_dtype: _Optional[str] = ..., budget_seconds: _Optional[float] = ..., budget_max_steps: _Optional[int] = ...) -> None: ...

class RoundMessage(_message.Message):
    __slots__ = ("header", "part")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    header: RoundHeader
    part: TensorPart
    def __init__(self, header: _Optional[_Union[RoundHeader, _Mapping]] = ..., part: _Optional[_Union[TensorPart, _Mapping]] = ...) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("compute_seconds", "communication_seconds", "loss", "accuracy", "samples_per_second")
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMMUNICATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    compute_seconds: float
    communication_seconds: float
    loss: float
    accuracy: float
    samples_per_second: float
    def __init__(self, compute_seconds: _Optional[float] = ..., communication_seconds: _Optional[float] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., samples_per_second: _Optional[float] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("agent_id", "round", "num_samples", "stats", "delta", "layout")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    round: int
    num_samples: int
    stats: NodeStats
    delta: bool
    layout: _containers.RepeatedCompositeFieldContainer[TensorPart]
    def __init__(self, agent_id: _Optional[str] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ..., stats: _Optional[_Union[NodeStats, _Mapping]] = ..., delta: _Optional[bool] = ..., layout: _Optional[_Iterable[_Union[TensorPart, _Mapping]]] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "part")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    part: TensorPart
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., part: _Optional[_Union[TensorPart, _Mapping]] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("detail",)
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    detail: str
    def __init__(self, detail: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
