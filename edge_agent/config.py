"""The edge agent's configuration: one TOML file (``/etc/affectedge/agent.toml`` when installed).

Every key has a default that suits one webcam on a lab PC, so a minimal file only names the
agent, its classroom and the broker. ``deploy/agent.example.toml`` documents every key. Relative
paths are relative to the working directory (the systemd unit sets ``/opt/affectedge``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from affectedge import codec, settings
from affectedge.settings import Section
from affectedge.topics import check_id

DEFAULT_PATH = Path("/etc/affectedge/agent.toml")
Score = Annotated[float, Field(ge=0, lt=1)]


def _check_id(value: str, info: ValidationInfo) -> str:
    """Ids become MQTT topic levels: the wire contract's rule, in one place (affectedge.topics)."""
    return check_id(value, info.field_name)


def _default_spool() -> Path:
    """systemd's StateDirectory= exports $STATE_DIRECTORY; elsewhere the working directory."""
    return Path(os.environ.get("STATE_DIRECTORY", ".")) / "spool.sqlite3"


class AgentSection(Section):
    id: str = "agent-1"
    classroom: str = "room-1"

    _ids = field_validator("id", "classroom")(_check_id)


class CameraSection(Section):
    id: str = "cam0"
    #: V4L2 index ("0"), device path ("/dev/video0"), RTSP/HTTP URL, or a video file (looped)
    source: str = "0"
    #: frames per second actually processed; extra frames are skipped before decoding where possible
    fps: float = Field(15.0, gt=0, le=120)
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)

    _ids = field_validator("id")(_check_id)

    @model_validator(mode="after")
    def _size_pair(self) -> CameraSection:
        """The capture asks the camera for a resolution only as a pair: one alone would be ignored."""
        if (self.width is None) != (self.height is None):
            raise ValueError("set both `width` and `height` to ask the camera for a resolution, or neither")
        return self


class DetectionSection(Section):
    #: run the detector on every k-th processed frame; faces are tracked in between
    every: int = Field(5, ge=1, le=100)
    min_face_size: int = Field(40, ge=12)
    thresholds: tuple[Score, Score, Score] = (0.6, 0.7, 0.7)
    scale_factor: float = Field(0.709, gt=0.1, lt=1.0)
    max_faces: int = Field(16, ge=1, le=256)
    #: a track not matched by this many consecutive detections is dropped
    max_missed: int = Field(2, ge=1)
    #: minimum box overlap for a detection to continue a track
    iou_threshold: float = Field(0.3, gt=0, lt=1)


class QualitySection(Section):
    #: inter-ocular distance in frame pixels below which a face is too small to read
    min_eye_distance_px: float = Field(14.0, ge=0)
    #: variance of the Laplacian of the 48x48 aligned crop below which it is too blurry
    min_sharpness: float = Field(100.0, ge=0)
    #: faces turned further than this (estimated from landmarks) are skipped
    max_yaw_deg: float = Field(40.0, gt=0, le=90)


class ModelSection(Section):
    #: holds manifest.json, encoder.onnx, head.onnx and mtcnn/*.onnx
    dir: Path = Path("models")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    #: inference threads per session; default: min(2, cores)
    threads: int | None = Field(None, ge=1, le=64)
    #: run the statically quantized encoder.int8.onnx on ONNX Runtime: faster on CPUs with VNNI
    #: (AVX-512 VNNI, AVX-VNNI), no faster on AVX2 alone; accuracy within 0.1 point (MODEL_CARD.md)
    int8: bool = False

    @model_validator(mode="after")
    def _int8_is_for_onnxruntime(self) -> ModelSection:
        if self.int8 and self.backend == "tensorrt":
            raise ValueError("int8 picks the ONNX Runtime encoder; for INT8 on TensorRT build the engine with "
                             "`model_export build --int8` and leave int8 = false")
        return self


class OutputSection(Section):
    #: seconds between observation batches (one observation per visible learner per batch). At most
    #: 1 s: the coordinator judges k-anonymity per second across a classroom's agents, so agents that
    #: publish less often rarely share a second and their class would be suppressed
    interval_s: float = Field(1.0, ge=0.1, le=1.0)
    #: seconds between retained status updates (also sent at once when the state changes)
    status_interval_s: float = Field(30.0, ge=1, le=3600)


class TlsSection(Section):
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsSection:
        if (self.cert is None) != (self.key is None):
            raise ValueError("set both `cert` and `key` for a client certificate, or neither")
        return self


class MqttSection(Section):
    #: an empty host would pass here and crash paho in the service (a restart loop): refused as a config error
    host: str = Field("localhost", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    #: "5" (content type as a message property) or "3.1.1" (for brokers without MQTT 5)
    protocol: Literal["5", "3.1.1"] = "5"
    format: Literal["protobuf", "json"] = "protobuf"
    keepalive_s: int = Field(30, ge=5, le=3600)
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsSection | None = None
    #: seconds between reconnect attempts grow from 1 to this
    max_backoff_s: int = Field(30, ge=1, le=3600)

    @model_validator(mode="after")
    def _password_needs_username(self) -> MqttSection:
        """MQTT sends a password only with a username: alone it would be dropped and the broker refuse us."""
        if self.password is not None and self.username is None:
            raise ValueError("`password` is set without `username`; set the username the broker knows this agent "
                             "by (coordinator provision-agent prints both), or remove the password")
        return self


class SpoolSection(Section):
    path: Path = Field(default_factory=_default_spool)
    #: batches kept while the broker is unreachable (about a day at 1 Hz); the oldest go first
    max_batches: int = Field(100_000, ge=1)


class AgentConfig(Section):
    agent: AgentSection = AgentSection()
    # at most codec.MAX_CAMERAS: a status names each camera and the contract bounds that list
    cameras: list[CameraSection] = Field(default_factory=lambda: [CameraSection()], min_length=1,
                                         max_length=codec.MAX_CAMERAS)
    detection: DetectionSection = DetectionSection()
    quality: QualitySection = QualitySection()
    model: ModelSection = ModelSection()
    output: OutputSection = OutputSection()
    mqtt: MqttSection = MqttSection()
    spool: SpoolSection = SpoolSection()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, cameras: list[CameraSection]) -> list[CameraSection]:
        seen: set[str] = set()
        for camera in cameras:  # names the id only: the sources may carry credentials
            if camera.id in seen:
                raise ValueError(f"camera id {camera.id!r} is used twice; camera ids must be unique")
            seen.add(camera.id)
        return cameras


def load(path: Path | str | None) -> AgentConfig:
    """Validated config (raises :class:`affectedge.settings.ConfigError` with a one-line message)."""
    return settings.load(path, AgentConfig)
