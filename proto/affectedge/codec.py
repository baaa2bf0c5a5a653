"""Encoding and validating wire messages: protobuf by default, JSON for debugging.

Validation lives here, once, for both ends: every distribution has exactly 7 finite values in
[0, 1], ids match the topic rules. A payload that fails is a :class:`WireError`, never a crash.
"""

from __future__ import annotations

import math
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from affectedge.labels import EMOTIONS
from affectedge.topics import ID_PATTERN
from affectedge.v1 import affectedge_pb2 as pb

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
M = TypeVar("M", bound=Message)


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


def _distribution(values, what: str) -> None:
    if len(values) != len(EMOTIONS):
        raise WireError(f"{what} has {len(values)} values; it must have exactly {len(EMOTIONS)}")
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in values):
        raise WireError(f"{what} has values outside [0, 1]")


def _id(value: str, what: str) -> None:
    if not ID_PATTERN.match(value):
        raise WireError(f"{what} {value[:70]!r} is not a valid id")


def validate(message: Message) -> None:
    """Raise WireError if ``message`` breaks the contract's invariants."""
    if isinstance(message, pb.ObservationBatch):
        _id(message.agent_id, "agent_id")
        _id(message.classroom_id, "classroom_id")
        for obs in message.observations:
            _id(obs.camera_id, "camera_id")
            _distribution(obs.probabilities, "probabilities")
            if obs.label == pb.EMOTION_UNSPECIFIED:
                raise WireError("observation label is unspecified")
        for summary in message.summaries:
            _id(summary.camera_id, "camera_id")
            if summary.faces_present:
                _distribution(summary.distribution, "distribution")
    elif isinstance(message, pb.AgentStatus):
        _id(message.agent_id, "agent_id")
        _id(message.classroom_id, "classroom_id")


def label_of(index: int) -> int:
    """Protobuf Emotion value of model output index ``index``."""
    return index + 1
