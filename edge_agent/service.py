"""The running agent: cameras -> pipelines -> batches -> MQTT, under systemd.

One processing thread (this one) takes the newest frame of each camera in turn, so CPU use is set
by the cameras' fps caps, not by how fast frames arrive. Every ``output.interval_s`` it publishes
one batch (observations of all cameras + a summary per camera); every ``output.status_interval_s``
and whenever the state changes (a camera lost or back) it refreshes the retained status.

systemd integration is the ``sd_notify`` datagram protocol (:mod:`affectedge.systemd`): READY=1
once models are loaded and cameras started, WATCHDOG=1 from the processing loop itself (so a hung
inference gets the agent restarted), STOPPING=1 on SIGTERM, after which the spool is flushed and
OFFLINE published before exit.
"""

from __future__ import annotations

import itertools
import logging
import signal
import sqlite3
import threading
import time
from importlib import metadata
from pathlib import Path

from affectedge import codec
from affectedge.settings import ConfigError
from affectedge.systemd import notify as sd_notify
from affectedge.systemd import watchdog_period
from affectedge.v1 import affectedge_pb2 as pb
from edge_agent.capture import NETWORK_TIMEOUT_MS, Camera
from edge_agent.config import AgentConfig, SpoolSection
from edge_agent.emotion_model import EmotionModel, read_manifest
from edge_agent.faces.mtcnn import FaceDetector
from edge_agent.inference import ModelError
from edge_agent.pipeline import CameraPipeline
from edge_agent.publisher import Publisher, timestamp
from edge_agent.quality import QualityGate
from edge_agent.spool import DiskFull, Spool

log = logging.getLogger(__name__)


def version() -> str:
    try:
        return metadata.version("affectedge")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def load_models(config: AgentConfig) -> tuple[EmotionModel, FaceDetector]:
    m, d = config.model, config.detection
    model = EmotionModel.load(m.dir, m.backend, m.threads, int8=m.int8)
    detector = FaceDetector(m.dir / "mtcnn", m.backend, d.min_face_size, d.thresholds, d.scale_factor, m.threads)
    return model, detector


def model_version(models_dir: Path) -> str:
    """The manifest's version, which every batch carries: checked against the wire contract's cap here,
    so a long one stops the start-up in one line instead of every status message failing later."""
    version = read_manifest(models_dir)["version"]
    if len(version) > codec.TEXT_LIMITS["model_version"]:
        raise ModelError(f"{models_dir}/manifest.json: version has {len(version)} characters, more than the "
                         f"{codec.TEXT_LIMITS['model_version']} the wire contract allows; re-export with a shorter "
                         "--version")
    return version


def open_spool(section: SpoolSection) -> Spool:
    """The spool, or a ConfigError naming ``spool.path``: caught at start-up, not by a crash loop.
    A full disk is no config error: it exits 1, which systemd restarts, so the agent starts once
    space is freed (the config error's 2 it would not restart)."""
    try:
        return Spool(section.path, section.max_batches)
    except DiskFull as exc:
        raise SystemExit(f"edge-agent: {exc} (systemd restarts the agent until it starts)") from None
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"spool.path = {section.path}: cannot open it ({exc}); point spool.path at a file in a "
                          "writable directory, or move a corrupt file away (it holds only unsent batches)") from None


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        # config errors (spool, TLS files) first, before the model load logs anything
        self.spool = open_spool(config.spool)
        self.publisher = Publisher(config.mqtt, config.agent, self.spool, model_version(config.model.dir))
        self.model, detector = load_models(config)
        gate = QualityGate(config.quality)
        ids = itertools.count(1)  # anonymous track ids, shared by the cameras, restart at 1
        self.cameras = [Camera(c.id, c.source, c.fps, c.width, c.height, config.mqtt.max_backoff_s)
                        for c in config.cameras]
        self.pipelines = {c.id: CameraPipeline(c.id, detector, self.model, gate, config.detection, ids)
                          for c in config.cameras}
        self.stopping = threading.Event()
        self._fps = {c.id: 0.0 for c in config.cameras}
        self._dropped_reported = {c.id: 0 for c in config.cameras}

    def status(self, state: int | None = None, detail: str | None = None) -> pb.AgentStatus:
        """The current status; ONLINE, or DEGRADED while a camera delivers no frames, unless ``state``."""
        lost = [c.id for c in self.cameras if not c.connected]
        if state is None:
            state = pb.AgentStatus.DEGRADED if lost else pb.AgentStatus.ONLINE
        if detail is None:
            detail = f"camera not delivering frames: {', '.join(lost)}" if lost else ""
        return pb.AgentStatus(
            agent_id=self.config.agent.id, classroom_id=self.config.agent.classroom, state=state,
            timestamp=timestamp(time.time()), version=version(), backend=self.model.backend,
            model_version=self.model.version,
            cameras=[pb.CameraHealth(camera_id=c.id, connected=c.connected, fps=self._fps[c.id],
                                     frames_dropped=c.frames_dropped) for c in self.cameras],
            spool_depth=self.spool.depth, spool_dropped=self.spool.dropped,
            detail=detail)

    def publish(self, elapsed: float) -> None:
        """One batch: every camera's observations and summary for the last ``elapsed`` seconds."""
        now = time.time()
        observations, summaries = [], []
        for camera in self.cameras:
            dropped = camera.frames_dropped - self._dropped_reported[camera.id]
            self._dropped_reported[camera.id] = camera.frames_dropped
            found, summary = self.pipelines[camera.id].collect(now, dropped)
            self._fps[camera.id] = summary.frames_processed / max(elapsed, 1e-3)
            observations.extend(found)
            summaries.append(summary)
        self.publisher.publish_batch(observations, summaries)

    def run(self) -> None:
        """Process until SIGTERM/SIGINT, then shut down cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        new_frame = threading.Event()
        for camera in self.cameras:
            camera.start(new_frame)
        # from here on every way out stops the camera threads: one left inside OpenCV at exit aborts the process
        try:
            for camera in self.cameras:  # so the first status tells the truth about the cameras
                camera.tried.wait(NETWORK_TIMEOUT_MS / 1000 + 1)
            self.publisher.start(self.status)
            self._loop(new_frame)
        finally:
            self.shutdown()

    def _loop(self, new_frame: threading.Event) -> None:
        """Process frames, publish batches and statuses and ping the watchdog until asked to stop."""
        sd_notify("READY=1")
        log.info("agent %s/%s running: %d camera(s), model %s on %s, publishing to %s:%d",
                 self.config.agent.classroom, self.config.agent.id, len(self.cameras),
                 self.model.version, self.model.backend, self.config.mqtt.host, self.config.mqtt.port)
        out = self.config.output
        last_publish = last_status = last_ping = time.monotonic()
        ping_every = watchdog_period()
        degraded = None  # forces the first report
        while not self.stopping.is_set():
            new_frame.wait(0.05)
            new_frame.clear()
            for camera in self.cameras:
                frame = camera.take()
                if frame is not None:
                    self.pipelines[camera.id].process(frame.image, frame.timestamp)
            now = time.monotonic()
            if now - last_publish >= out.interval_s:
                self.publish(now - last_publish)
                last_publish = now
            lost = not all(c.connected for c in self.cameras)
            if lost != degraded or now - last_status >= out.status_interval_s:
                status = self.status()
                self._report(status)
                self.publisher.publish_status(status)
                degraded, last_status = lost, now
            if ping_every and now - last_ping >= ping_every:
                sd_notify("WATCHDOG=1")
                last_ping = now

    def _report(self, status: pb.AgentStatus) -> None:
        """One log line for the admin: how each camera is doing and whether batches are piling up."""
        cameras = ", ".join(f"{c.camera_id} {'up' if c.connected else 'DOWN'} {c.fps:.1f} fps "
                            f"{c.frames_dropped} dropped" for c in status.cameras)
        log.info("%s: %s; broker %s; spool %d waiting, %d dropped",
                 pb.AgentStatus.State.Name(status.state), cameras,
                 "connected" if self.publisher.connected.is_set() else "unreachable",
                 status.spool_depth, status.spool_dropped)

    def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        log.info("stopping: flushing the spool and publishing OFFLINE")
        for camera in self.cameras:
            camera.stop()
        self.publisher.stop(self.status(pb.AgentStatus.OFFLINE, "stopped"))
        self.spool.close()
