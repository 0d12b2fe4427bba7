from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_AUTO: _ClassVar[Mode]
    MODE_ONLINE: _ClassVar[Mode]
    MODE_BATCH: _ClassVar[Mode]

class Rung(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNG_UNSPECIFIED: _ClassVar[Rung]
    RUNG_FULL: _ClassVar[Rung]
    RUNG_NO_SESSION: _ClassVar[Rung]
    RUNG_BATCH: _ClassVar[Rung]
    RUNG_POPULARITY: _ClassVar[Rung]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_VIEW: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_CART: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]
MODE_AUTO: Mode
MODE_ONLINE: Mode
MODE_BATCH: Mode
RUNG_UNSPECIFIED: Rung
RUNG_FULL: Rung
RUNG_NO_SESSION: Rung
RUNG_BATCH: Rung
RUNG_POPULARITY: Rung
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_VIEW: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_CART: EventType
EVENT_TYPE_PURCHASE: EventType

class Session(_message.Message):
    __slots__ = ("recent_item_ids", "cart_item_ids")
    RECENT_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CART_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    recent_item_ids: _containers.RepeatedScalarFieldContainer[str]
    cart_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, recent_item_ids: _Optional[_Iterable[str]] = ..., cart_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("device", "timestamp", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    device: str
    timestamp: int
    values: _containers.ScalarMap[str, str]
    def __init__(self, device: _Optional[str] = ..., timestamp: _Optional[int] = ..., values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "session", "context", "exclude_item_ids", "mode", "request_id", "include_titles")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TITLES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    session: Session
    context: Context
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    mode: Mode
    request_id: str
    include_titles: bool
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[Mode, str]] = ..., request_id: _Optional[str] = ..., include_titles: _Optional[bool] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("queue_us", "fetch_us", "combine_us", "search_us", "filter_us", "total_us")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    FETCH_US_FIELD_NUMBER: _ClassVar[int]
    COMBINE_US_FIELD_NUMBER: _ClassVar[int]
    SEARCH_US_FIELD_NUMBER: _ClassVar[int]
    FILTER_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    fetch_us: int
    combine_us: int
    search_us: int
    filter_us: int
    total_us: int
    def __init__(self, queue_us: _Optional[int] = ..., fetch_us: _Optional[int] = ..., combine_us: _Optional[int] = ..., search_us: _Optional[int] = ..., filter_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("item_ids", "scores", "model_version", "variant", "rung", "reasons", "timings", "request_id", "titles", "source", "batch_size", "contributed_by")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    RUNG_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TITLES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTED_BY_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    variant: str
    rung: Rung
    reasons: _containers.RepeatedScalarFieldContainer[str]
    timings: StageTimings
    request_id: str
    titles: _containers.RepeatedScalarFieldContainer[str]
    source: str
    batch_size: int
    contributed_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., variant: _Optional[str] = ..., rung: _Optional[_Union[Rung, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., request_id: _Optional[str] = ..., titles: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., batch_size: _Optional[int] = ..., contributed_by: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("user_id", "item_id", "type", "timestamp", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    type: EventType
    timestamp: int
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., timestamp: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "state", "last_error", "candidate", "registry", "swaps", "rejected", "requests_served", "pid", "flags_file", "flags_sha256", "flags_error", "flags_reloads", "flags_rejected", "resident_versions", "resident_bytes", "shadows", "supervisor")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FILE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_SHA256_FIELD_NUMBER: _ClassVar[int]
    FLAGS_ERROR_FIELD_NUMBER: _ClassVar[int]
    FLAGS_RELOADS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    SUPERVISOR_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: str
    last_error: str
    candidate: str
    registry: str
    swaps: int
    rejected: int
    requests_served: int
    pid: int
    flags_file: str
    flags_sha256: str
    flags_error: str
    flags_reloads: int
    flags_rejected: int
    resident_versions: _containers.RepeatedScalarFieldContainer[str]
    resident_bytes: int
    shadows: _containers.RepeatedCompositeFieldContainer[ShadowStatus]
    supervisor: SupervisorStatus
    def __init__(self, version: _Optional[str] = ..., state: _Optional[str] = ..., last_error: _Optional[str] = ..., candidate: _Optional[str] = ..., registry: _Optional[str] = ..., swaps: _Optional[int] = ..., rejected: _Optional[int] = ..., requests_served: _Optional[int] = ..., pid: _Optional[int] = ..., flags_file: _Optional[str] = ..., flags_sha256: _Optional[str] = ..., flags_error: _Optional[str] = ..., flags_reloads: _Optional[int] = ..., flags_rejected: _Optional[int] = ..., resident_versions: _Optional[_Iterable[str]] = ..., resident_bytes: _Optional[int] = ..., shadows: _Optional[_Iterable[_Union[ShadowStatus, _Mapping]]] = ..., supervisor: _Optional[_Union[SupervisorStatus, _Mapping]] = ...) -> None: ...

class SupervisorStatus(_message.Message):
    __slots__ = ("workers", "restarts", "failed_starts", "crash_loop", "restart_backoff_s")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_STARTS_FIELD_NUMBER: _ClassVar[int]
    CRASH_LOOP_FIELD_NUMBER: _ClassVar[int]
    RESTART_BACKOFF_S_FIELD_NUMBER: _ClassVar[int]
    workers: int
    restarts: int
    failed_starts: int
    crash_loop: bool
    restart_backoff_s: float
    def __init__(self, workers: _Optional[int] = ..., restarts: _Optional[int] = ..., failed_starts: _Optional[int] = ..., crash_loop: _Optional[bool] = ..., restart_backoff_s: _Optional[float] = ...) -> None: ...

class ShadowStatus(_message.Message):
    __slots__ = ("experiment", "variant", "version", "sampled", "scored", "dropped", "errors", "mean_overlap", "mean_latency_ms", "max_latency_ms")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    MEAN_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MEAN_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    variant: str
    version: str
    sampled: int
    scored: int
    dropped: int
    errors: int
    mean_overlap: float
    mean_latency_ms: float
    max_latency_ms: float
    def __init__(self, experiment: _Optional[str] = ..., variant: _Optional[str] = ..., version: _Optional[str] = ..., sampled: _Optional[int] = ..., scored: _Optional[int] = ..., dropped: _Optional[int] = ..., errors: _Optional[int] = ..., mean_overlap: _Optional[float] = ..., mean_latency_ms: _Optional[float] = ..., max_latency_ms: _Optional[float] = ...) -> None: ...
