import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Emotion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMOTION_UNSPECIFIED: _ClassVar[Emotion]
    ANGRY: _ClassVar[Emotion]
    DISGUST: _ClassVar[Emotion]
    FEAR: _ClassVar[Emotion]
    HAPPY: _ClassVar[Emotion]
    SAD: _ClassVar[Emotion]
    SURPRISE: _ClassVar[Emotion]
    NEUTRAL: _ClassVar[Emotion]

class LearningStateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEARNING_STATE_UNSPECIFIED: _ClassVar[LearningStateKind]
    ENGAGED: _ClassVar[LearningStateKind]
    CONFUSED: _ClassVar[LearningStateKind]
    FRUSTRATED: _ClassVar[LearningStateKind]
    BORED: _ClassVar[LearningStateKind]
    NEUTRAL_STATE: _ClassVar[LearningStateKind]

class SignalKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNAL_KIND_UNSPECIFIED: _ClassVar[SignalKind]
    SLOW_DOWN: _ClassVar[SignalKind]
    REVIEW: _ClassVar[SignalKind]
    OFFER_HINT: _ClassVar[SignalKind]
    INCREASE_CHALLENGE: _ClassVar[SignalKind]
    TAKE_BREAK: _ClassVar[SignalKind]
    SWITCH_MODALITY: _ClassVar[SignalKind]
EMOTION_UNSPECIFIED: Emotion
ANGRY: Emotion
DISGUST: Emotion
FEAR: Emotion
HAPPY: Emotion
SAD: Emotion
SURPRISE: Emotion
NEUTRAL: Emotion
LEARNING_STATE_UNSPECIFIED: LearningStateKind
ENGAGED: LearningStateKind
CONFUSED: LearningStateKind
FRUSTRATED: LearningStateKind
BORED: LearningStateKind
NEUTRAL_STATE: LearningStateKind
SIGNAL_KIND_UNSPECIFIED: SignalKind
SLOW_DOWN: SignalKind
REVIEW: SignalKind
OFFER_HINT: SignalKind
INCREASE_CHALLENGE: SignalKind
TAKE_BREAK: SignalKind
SWITCH_MODALITY: SignalKind

class FaceQuality(_message.Message):
    __slots__ = ("score", "size_px", "sharpness", "yaw_deg", "detector_confidence")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SIZE_PX_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    YAW_DEG_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    score: float
    size_px: float
    sharpness: float
    yaw_deg: float
    detector_confidence: float
    def __init__(self, score: _Optional[float] = ..., size_px: _Optional[float] = ..., sharpness: _Optional[float] = ..., yaw_deg: _Optional[float] = ..., detector_confidence: _Optional[float] = ...) -> None: ...

class EmotionObservation(_message.Message):
    __slots__ = ("camera_id", "track_id", "window_start", "window_end", "label", "probabilities", "confidence", "quality", "frames")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    track_id: int
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    label: Emotion
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    confidence: float
    quality: FaceQuality
    frames: int
    def __init__(self, camera_id: _Optional[str] = ..., track_id: _Optional[int] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., label: _Optional[_Union[Emotion, str]] = ..., probabilities: _Optional[_Iterable[float]] = ..., confidence: _Optional[float] = ..., quality: _Optional[_Union[FaceQuality, _Mapping]] = ..., frames: _Optional[int] = ...) -> None: ...

class CameraSummary(_message.Message):
    __slots__ = ("camera_id", "timestamp", "faces_present", "distribution", "frames_processed", "frames_dropped", "rejected")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    FACES_PRESENT_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    timestamp: _timestamp_pb2.Timestamp
    faces_present: int
    distribution: _containers.RepeatedScalarFieldContainer[float]
    frames_processed: int
    frames_dropped: int
    rejected: _containers.ScalarMap[str, int]
    def __init__(self, camera_id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., faces_present: _Optional[int] = ..., distribution: _Optional[_Iterable[float]] = ..., frames_processed: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., rejected: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ObservationBatch(_message.Message):
    __slots__ = ("agent_id", "classroom_id", "model_version", "seq", "sent_at", "observations", "summaries")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLASSROOM_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    classroom_id: str
    model_version: str
    seq: int
    sent_at: _timestamp_pb2.Timestamp
    observations: _containers.RepeatedCompositeFieldContainer[EmotionObservation]
    summaries: _containers.RepeatedCompositeFieldContainer[CameraSummary]
    def __init__(self, agent_id: _Optional[str] = ..., classroom_id: _Optional[str] = ..., model_version: _Optional[str] = ..., seq: _Optional[int] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., observations: _Optional[_Iterable[_Union[EmotionObservation, _Mapping]]] = ..., summaries: _Optional[_Iterable[_Union[CameraSummary, _Mapping]]] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("agent_id", "classroom_id", "state", "timestamp", "version", "backend", "model_version", "cameras", "spool_depth", "spool_dropped", "detail")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[AgentStatus.State]
        ONLINE: _ClassVar[AgentStatus.State]
        OFFLINE: _ClassVar[AgentStatus.State]
        DEGRADED: _ClassVar[AgentStatus.State]
    STATE_UNSPECIFIED: AgentStatus.State
    ONLINE: AgentStatus.State
    OFFLINE: AgentStatus.State
    DEGRADED: AgentStatus.State
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLASSROOM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    classroom_id: str
    state: AgentStatus.State
    timestamp: _timestamp_pb2.Timestamp
    version: str
    backend: str
    model_version: str
    cameras: _containers.RepeatedCompositeFieldContainer[CameraHealth]
    spool_depth: int
    spool_dropped: int
    detail: str
    def __init__(self, agent_id: _Optional[str] = ..., classroom_id: _Optional[str] = ..., state: _Optional[_Union[AgentStatus.State, str]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[str] = ..., backend: _Optional[str] = ..., model_version: _Optional[str] = ..., cameras: _Optional[_Iterable[_Union[CameraHealth, _Mapping]]] = ..., spool_depth: _Optional[int] = ..., spool_dropped: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class CameraHealth(_message.Message):
    __slots__ = ("camera_id", "connected", "fps", "frames_dropped")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    connected: bool
    fps: float
    frames_dropped: int
    def __init__(self, camera_id: _Optional[str] = ..., connected: _Optional[bool] = ..., fps: _Optional[float] = ..., frames_dropped: _Optional[int] = ...) -> None: ...

class LearningState(_message.Message):
    __slots__ = ("kind", "score")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    kind: LearningStateKind
    score: float
    def __init__(self, kind: _Optional[_Union[LearningStateKind, str]] = ..., score: _Optional[float] = ...) -> None: ...

class ClassroomState(_message.Message):
    __slots__ = ("classroom_id", "session_id", "course_id", "window_start", "window_end", "window_seconds", "faces_present", "learners", "agents_online", "distribution", "states", "observations", "suppressed")
    CLASSROOM_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COURSE_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FACES_PRESENT_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    classroom_id: str
    session_id: str
    course_id: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    window_seconds: int
    faces_present: int
    learners: int
    agents_online: int
    distribution: _containers.RepeatedScalarFieldContainer[float]
    states: _containers.RepeatedCompositeFieldContainer[LearningState]
    observations: int
    suppressed: bool
    def __init__(self, classroom_id: _Optional[str] = ..., session_id: _Optional[str] = ..., course_id: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_seconds: _Optional[int] = ..., faces_present: _Optional[int] = ..., learners: _Optional[int] = ..., agents_online: _Optional[int] = ..., distribution: _Optional[_Iterable[float]] = ..., states: _Optional[_Iterable[_Union[LearningState, _Mapping]]] = ..., observations: _Optional[int] = ..., suppressed: _Optional[bool] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("rule", "window_start", "window_end", "distribution", "states", "observed", "threshold", "sustained_seconds", "learners")
    RULE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SUSTAINED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    rule: str
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    distribution: _containers.RepeatedScalarFieldContainer[float]
    states: _containers.RepeatedCompositeFieldContainer[LearningState]
    observed: float
    threshold: float
    sustained_seconds: int
    learners: int
    def __init__(self, rule: _Optional[str] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., distribution: _Optional[_Iterable[float]] = ..., states: _Optional[_Iterable[_Union[LearningState, _Mapping]]] = ..., observed: _Optional[float] = ..., threshold: _Optional[float] = ..., sustained_seconds: _Optional[int] = ..., learners: _Optional[int] = ...) -> None: ...

class AdaptationSignal(_message.Message):
    __slots__ = ("id", "classroom_id", "session_id", "course_id", "kind", "strength", "reason", "evidence", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLASSROOM_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COURSE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    classroom_id: str
    session_id: str
    course_id: str
    kind: SignalKind
    strength: float
    reason: str
    evidence: Evidence
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., classroom_id: _Optional[str] = ..., session_id: _Optional[str] = ..., course_id: _Optional[str] = ..., kind: _Optional[_Union[SignalKind, str]] = ..., strength: _Optional[float] = ..., reason: _Optional[str] = ..., evidence: _Optional[_Union[Evidence, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Classroom(_message.Message):
    __slots__ = ("classroom_id", "name", "course_id", "session_id", "agents_online")
    CLASSROOM_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    COURSE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENTS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    classroom_id: str
    name: str
    course_id: str
    session_id: str
    agents_online: int
    def __init__(self, classroom_id: _Optional[str] = ..., name: _Optional[str] = ..., course_id: _Optional[str] = ..., session_id: _Optional[str] = ..., agents_online: _Optional[int] = ...) -> None: ...

class StreamAdaptationsRequest(_message.Message):
    __slots__ = ("classroom_ids", "course_ids", "after_signal_id")
    CLASSROOM_IDS_FIELD_NUMBER: _ClassVar[int]
    COURSE_IDS_FIELD_NUMBER: _ClassVar[int]
    AFTER_SIGNAL_ID_FIELD_NUMBER: _ClassVar[int]
    classroom_ids: _containers.RepeatedScalarFieldContainer[str]
    course_ids: _containers.RepeatedScalarFieldContainer[str]
    after_signal_id: str
    def __init__(self, classroom_ids: _Optional[_Iterable[str]] = ..., course_ids: _Optional[_Iterable[str]] = ..., after_signal_id: _Optional[str] = ...) -> None: ...

class GetClassroomStateRequest(_message.Message):
    __slots__ = ("classroom_id", "window_seconds")
    CLASSROOM_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    classroom_id: str
    window_seconds: int
    def __init__(self, classroom_id: _Optional[str] = ..., window_seconds: _Optional[int] = ...) -> None: ...

class ListClassroomsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClassroomsResponse(_message.Message):
    __slots__ = ("classrooms",)
    CLASSROOMS_FIELD_NUMBER: _ClassVar[int]
    classrooms: _containers.RepeatedCompositeFieldContainer[Classroom]
    def __init__(self, classrooms: _Optional[_Iterable[_Union[Classroom, _Mapping]]] = ...) -> None: ...
