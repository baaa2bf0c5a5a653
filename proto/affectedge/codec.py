"""Encoding and validating wire messages: protobuf by default, JSON for debugging.

Validation lives here, once, for both ends: every distribution has exactly 7 finite values in
[0, 1], ids match the topic rules, labels and states are known enum values, scores are finite in
[0, 1], timestamps are within protobuf's range (year 1-9999), counts fit a signed 32-bit column, a
batch's ``seq`` a signed 64-bit one, and text at most :data:`TEXT_LIMITS` characters. Repeated fields
are bounded by what one agent can send (:data:`MAX_CAMERAS`, :data:`MAX_OBSERVATIONS`), so a message's
size on the coordinator, where it is stored and shown on every dashboard, is bounded too. A payload that
fails is a :class:`WireError`, never a crash and never a row the coordinator's database refuses.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from affectedge.labels import EMOTIONS
from affectedge.topics import ID_PATTERN
from affectedge.v1 import affectedge_pb2 as pb

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
M = TypeVar("M", bound=Message)
MAX_COUNT = 2**31 - 1  # counts and track ids are stored as signed 32-bit integers
MAX_SEQ = 2**63 - 1  # a batch's seq (uint64 on the wire) is stored as a signed 64-bit integer
#: characters, as stored; ``detail`` is sent to every open dashboard with each state update, and the
#: agent's own details ("camera not delivering frames: <ids>") are cut to it (edge_agent.publisher)
TEXT_LIMITS = {"version": 64, "model_version": 64, "backend": 32, "detail": 256}
#: cameras one agent reports (a status' ``cameras``, a batch's ``summaries``): each camera runs detection
#: and the encoder on the agent PC itself, and a lab PC keeps up with a few webcams, not more than 16
MAX_CAMERAS = 16
#: the agent's ``detection.max_faces`` bound: the tracks one camera follows at once
MAX_FACES = 256
#: observations in one batch: an agent sends one per followed track per camera and batch (the tracks seen
#: since the previous batch that are still followed), whatever its publishing interval
MAX_OBSERVATIONS = MAX_CAMERAS * MAX_FACES
_SECONDS = (-62_135_596_800, 253_402_300_799)  # 0001-01-01 .. 9999-12-31, as protobuf defines


class WireError(ValueError):
    """A payload that is not a valid AffectEdge message."""


def content_type(message: Message, fmt: str = "protobuf") -> str:
    base = JSON if fmt == "json" else PROTOBUF
    return f"{base}; proto={message.DESCRIPTOR.full_name}"


def encode(message: Message, fmt: str = "protobuf") -> bytes:
    if fmt == "json":
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


def decode(payload: bytes, cls: type[M], content_type_header: str | None = None) -> M:
    """Parse ``payload`` as ``cls`` (JSON if the content type says so or it starts with '{')."""
    message = cls()
    as_json = (content_type_header or "").startswith(JSON) or payload[:1] == b"{"
    try:
        if as_json:
            json_format.Parse(payload.decode("utf-8"), message)
        else:
            message.ParseFromString(payload)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise WireError(f"not a valid {cls.DESCRIPTOR.full_name}: {exc}") from exc
    validate(message)
    return message


_ONE = 1 + 1e-6  # float32 rounding of a probability of 1
_LABELS = frozenset(range(1, len(EMOTIONS) + 1))


def _distribution(values, what: str) -> None:
    if len(values) != len(EMOTIONS):
        raise WireError(f"{what} has {len(values)} values; it must have exactly {len(EMOTIONS)}")
    if not all(-1e-6 <= v <= _ONE for v in values):  # NaN fails every comparison
        raise WireError(f"{what} has values outside [0, 1]")


def _id(value: str, what: str) -> None:
    if not ID_PATTERN.match(value):
        raise WireError(f"{what} {value[:70]!r} is not a valid id")


def _count(value: int, what: str, limit: int = MAX_COUNT) -> None:
    if value > limit:
        raise WireError(f"{what} is {value}; it must be at most {limit}")


def _text(message: Message, name: str) -> None:
    value, limit = getattr(message, name), TEXT_LIMITS[name]
    if len(value) > limit:
        raise WireError(f"{name} has {len(value)} characters; it must have at most {limit}")


def _repeated(values, what: str, limit: int) -> None:
    if len(values) > limit:
        raise WireError(f"{what} has {len(values)} entries; it must have at most {limit}")


def _timestamp(ts, what: str) -> None:
    """An unset timestamp reads as 0 s, which passes."""
    if not (_SECONDS[0] <= ts.seconds <= _SECONDS[1] and 0 <= ts.nanos < 10**9):
        raise WireError(f"{what} ({ts.seconds} s) is outside the years 1-9999")


def _observation(obs: pb.EmotionObservation) -> None:
    """All of one observation's checks in one frame: ingest runs this tens of thousands of times a second."""
    _id(obs.camera_id, "camera_id")
    _distribution(obs.probabilities, "probabilities")
    if obs.label not in _LABELS:
        raise WireError(f"observation label {obs.label} is not one of the 7 emotions (1-7)")
    for what, score in (("confidence", obs.confidence), ("quality score", obs.quality.score)):
        if not 0 <= score <= _ONE:  # NaN fails too
            raise WireError(f"{what} is {score}; it must be a number in [0, 1]")
    _count(obs.track_id, "track_id")
    _timestamp(obs.window_start, "window_start")
    _timestamp(obs.window_end, "window_end")


def validate(message: Message) -> None:
    """Raise WireError if ``message`` breaks the contract's invariants."""
    if isinstance(message, pb.ObservationBatch):
        _id(message.agent_id, "agent_id")
        _id(message.classroom_id, "classroom_id")
        _text(message, "model_version")
        _count(message.seq, "seq", MAX_SEQ)
        _timestamp(message.sent_at, "sent_at")
        _repeated(message.observations, "observations", MAX_OBSERVATIONS)
        _repeated(message.summaries, "summaries", MAX_CAMERAS)
        for obs in message.observations:
            _observation(obs)
        for summary in message.summaries:
            _id(summary.camera_id, "camera_id")
            _count(summary.faces_present, "faces_present")
            _timestamp(summary.timestamp, "summary timestamp")
            if summary.faces_present:
                _distribution(summary.distribution, "distribution")
    elif isinstance(message, pb.AgentStatus):
        _id(message.agent_id, "agent_id")
        _id(message.classroom_id, "classroom_id")
        if message.state not in pb.AgentStatus.State.values():
            raise WireError(f"agent state {message.state} is not a known state")
        for name in ("version", "backend", "model_version", "detail"):
            _text(message, name)
        _repeated(message.cameras, "cameras", MAX_CAMERAS)
        _count(message.spool_depth, "spool_depth")
        _timestamp(message.timestamp, "status timestamp")


def label_of(index: int) -> int:
    """Protobuf Emotion value of model output index ``index``."""
    return index + 1
