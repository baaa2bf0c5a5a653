"""The wire contract: generated code is current, no field can carry pixels, labels line up."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from affectedge import codec, topics
from affectedge.labels import EMOTIONS, canonical
from affectedge.v1 import affectedge_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "proto/affectedge/v1/affectedge.proto")],
        check=True,
    )
    for name in ("affectedge_pb2.py", "affectedge_pb2.pyi", "affectedge_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "affectedge/v1" / name, ROOT / "proto/affectedge/v1" / name, shallow=False), (
            f"{name} is stale: run `make proto`"
        )


def _fields(descriptor, seen=None):
    seen = seen or set()
    if descriptor.full_name in seen:
        return
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        yield descriptor.full_name, field
        if field.message_type is not None:
            yield from _fields(field.message_type, seen)


def test_no_message_can_carry_pixels_or_embeddings() -> None:
    for message in (pb.ObservationBatch, pb.AgentStatus, pb.ClassroomState, pb.AdaptationSignal):
        for owner, field in _fields(message.DESCRIPTOR):
            assert field.type != FieldDescriptor.TYPE_BYTES, f"{owner}.{field.name} is bytes"
            if field.is_repeated and field.type == FieldDescriptor.TYPE_FLOAT:
                assert field.name in ("probabilities", "distribution"), f"{owner}.{field.name} is a float vector"


def test_repeated_floats_are_capped_at_seven_by_validation() -> None:
    batch = pb.ObservationBatch(agent_id="a1", classroom_id="room-1")
    obs = batch.observations.add(camera_id="cam0", label=pb.HAPPY)
    obs.probabilities.extend([0.1] * 128)  # an embedding smuggled as probabilities
    with pytest.raises(codec.WireError, match="exactly 7"):
        codec.decode(codec.encode(batch), pb.ObservationBatch)


def test_emotion_enum_matches_label_order() -> None:
    for i, name in enumerate(EMOTIONS):
        assert pb.Emotion.Name(codec.label_of(i)) == name.upper()
    assert len(pb.Emotion.keys()) == len(EMOTIONS) + 1


def test_codec_round_trips_protobuf_and_json() -> None:
    batch = pb.ObservationBatch(agent_id="lab-pc-1", classroom_id="room-1", seq=7)
    batch.observations.add(camera_id="cam0", track_id=3, label=pb.SAD, probabilities=[0, 0, 0, 0, 1, 0, 0])
    for fmt in ("protobuf", "json"):
        payload = codec.encode(batch, fmt)
        back = codec.decode(payload, pb.ObservationBatch, codec.content_type(batch, fmt))
        assert back == batch
    with pytest.raises(codec.WireError):
        codec.decode(b"\xff\x00garbage", pb.ObservationBatch)
    with pytest.raises(codec.WireError, match="agent_id"):
        codec.decode(codec.encode(pb.ObservationBatch(agent_id="a/b", classroom_id="r")), pb.ObservationBatch)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda b: setattr(b.observations[0], "confidence", float("nan")), "confidence"),
        (lambda b: setattr(b.observations[0].quality, "score", 1.5), "quality score"),
        (lambda b: setattr(b.observations[0], "label", 9), "label 9"),
        (lambda b: setattr(b.observations[0], "track_id", 3_000_000_000), "track_id"),
        (lambda b: setattr(b.observations[0].window_end, "seconds", 300_000_000_000), "window_end"),
        (lambda b: setattr(b.summaries[0], "faces_present", 3_000_000_000), "faces_present"),
        (lambda b: setattr(b, "model_version", "v" * 65), "model_version"),
        (lambda b: setattr(b, "seq", 2**63), "seq"),
    ],
)
def test_values_no_column_can_hold_are_wire_errors(spoil, message) -> None:
    """What would make the coordinator's database refuse a row is refused on the wire instead."""
    batch = pb.ObservationBatch(agent_id="a1", classroom_id="room-1")
    obs = batch.observations.add(camera_id="cam0", track_id=1, label=pb.HAPPY, confidence=0.9,
                                 probabilities=[0, 0, 0, 1, 0, 0, 0])
    obs.window_end.FromSeconds(1_700_000_000)
    batch.summaries.add(camera_id="cam0", faces_present=1, distribution=[0, 0, 0, 1, 0, 0, 0])
    codec.validate(batch)
    spoil(batch)
    with pytest.raises(codec.WireError, match=message):
        codec.decode(codec.encode(batch), pb.ObservationBatch)


def test_agent_status_checks_state_lengths_and_counts() -> None:
    status = pb.AgentStatus(agent_id="a1", classroom_id="room-1", state=pb.AgentStatus.ONLINE,
                            backend="onnxruntime", version="1.0")
    codec.validate(status)
    for field, value, message in (("backend", "b" * 33, "backend"), ("version", "1" * 65, "version"),
                                  ("spool_depth", 3_000_000_000, "spool_depth"), ("state", 7, "state")):
        spoiled = pb.AgentStatus()
        spoiled.CopyFrom(status)
        setattr(spoiled, field, value)
        with pytest.raises(codec.WireError, match=message):
            codec.decode(codec.encode(spoiled), pb.AgentStatus)


def assert_refused_once_spoilt(message, spoils) -> None:
    """``message`` passes the wire checks; each (spoil, error) makes a copy that fails with that error."""
    kind = type(message)
    codec.decode(codec.encode(message), kind)
    for spoil, error in spoils:
        spoilt = kind()
        spoilt.CopyFrom(message)
        spoil(spoilt)
        with pytest.raises(codec.WireError, match=error):
            codec.decode(codec.encode(spoilt), kind)


def test_a_status_with_a_long_detail_or_too_many_cameras_is_a_wire_error() -> None:
    """The detail is stored and sent to every open dashboard with each state update: a megabyte there
    was a megabyte per dashboard tab four times a second."""
    status = pb.AgentStatus(agent_id="a1", classroom_id="room-1", state=pb.AgentStatus.DEGRADED,
                            detail="d" * 256)
    status.cameras.extend(pb.CameraHealth(camera_id=f"cam{i}") for i in range(16))
    assert_refused_once_spoilt(status, [(lambda s: setattr(s, "detail", "X" * 300), "detail has 300 characters"),
                                        (lambda s: s.cameras.add(camera_id="one-more"), "cameras has 17 entries")])


def test_a_batch_with_more_observations_or_summaries_than_an_agent_sends_is_a_wire_error() -> None:
    """Each observation is a row in the coordinator's memory: a batch is bounded by what an agent can send."""
    batch = pb.ObservationBatch(agent_id="a1", classroom_id="room-1")
    obs = pb.EmotionObservation(camera_id="cam0", track_id=1, label=pb.HAPPY, confidence=0.9,
                                probabilities=[0, 0, 0, 1, 0, 0, 0])
    batch.observations.extend([obs] * 16 * 256)  # 16 cameras of 256 faces
    batch.summaries.extend(pb.CameraSummary(camera_id=f"cam{i}") for i in range(16))
    assert_refused_once_spoilt(batch, [(lambda b: b.observations.append(obs), "observations has 4097 entries"),
                                       (lambda b: b.summaries.add(camera_id="one-more"), "summaries has 17 entries")])


def test_topics_round_trip_and_reject_wildcards() -> None:
    topic = topics.observations("room-1", "lab-pc-1")
    assert topic == "affectedge/v1/room-1/lab-pc-1/observations"
    assert topics.parse(topic) == ("room-1", "lab-pc-1", "observations")
    assert topics.parse("affectedge/v1/room-1/lab-pc-1/frames") is None
    assert topics.parse("other/v1/a/b/status") is None
    with pytest.raises(ValueError, match="valid id"):
        topics.status("room/1", "a")
    with pytest.raises(ValueError):
        topics.observations("room-1", "+")
    assert topics.shared(topics.ALL, "coordinators") == "$share/coordinators/affectedge/v1/+/+/+"


def test_label_synonyms() -> None:
    assert canonical("Happiness") == "happy"
    assert canonical(" ANGER ") == "angry"
    assert canonical("surprised") == "surprise"
    assert canonical("contempt") is None
