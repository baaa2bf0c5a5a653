"""One camera's frames -> per-learner emotion observations.

Per processed frame: detect (every k-th frame) or follow tracks by optical flow, align each visible
face onto the model's 48x48 template, gate it on quality, and embed the accepted faces in one
encoder call (each through the next view of its track's cycle, when the model has one). The
embeddings go into a per-track ring of the model's window length T. At each publishing tick
:meth:`CameraPipeline.collect` runs the BiLSTM head once over the last T embeddings of every track
seen since the previous tick (one batched call), so the head's cost is per learner per second, not
per frame. Frames, crops and embeddings never leave this object.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Protocol

import cv2
import numpy as np

from affectedge import codec
from affectedge.v1 import affectedge_pb2 as pb
from edge_agent.config import DetectionSection
from edge_agent.faces.align import align_face
from edge_agent.publisher import timestamp
from edge_agent.quality import UNALIGNED, Quality, QualityGate
from edge_agent.tracking import Tracker

STAGES = ("decode", "detect", "track", "align", "encode", "head", "publish")


class Detector(Protocol):
    def detect(self, frame_bgr: np.ndarray, max_faces: int | None = None) -> list: ...


class Model(Protocol):
    window: int
    embed_dim: int
    views: tuple  # the view cycle (edge_agent.faces.views.View), empty when the model has none

    def embed(self, faces: np.ndarray, views: np.ndarray | None = None) -> np.ndarray: ...

    def classify(self, windows: np.ndarray) -> np.ndarray: ...


def wall_clock(monotonic_s: float) -> float:
    """The wall-clock time of the instant ``monotonic_s`` (a ``time.monotonic()`` value). Frames are stamped
    monotonic and converted here, once, as an observation leaves: a clock step (NTP, an admin) between
    frames would otherwise give a window spanning the step, or ending after the batch's ``sent_at``."""
    return time.time() - (time.monotonic() - monotonic_s)


class StageClock:
    """Wall time per pipeline stage, for ``edge-agent bench`` (the service runs without one)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.samples[stage].append(time.perf_counter() - start)


def _no_clock(stage: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


class Window:
    """The last T embeddings of one track (a ring), with their capture times (monotonic) and quality.

    ``cycled``: the model sees a track's faces through a view cycle, so a young track's window is
    padded with its embeddings in turn (views 0, 1, 2, 0, 1, 2, ...: consecutive views, as the head
    learnt them) rather than its first one over and over (view 0 only)."""

    def __init__(self, length: int, dim: int, cycled: bool = False):
        self.cycled = cycled
        self.embeddings = np.zeros((length, dim), np.float32)
        self.times = np.zeros(length)
        self.scores = np.zeros(length, np.float32)  # the quality gate's combined score per face
        self.count = 0

    def push(self, embedding: np.ndarray, t: float, quality: Quality) -> None:
        i = self.count % len(self.times)
        self.embeddings[i], self.times[i] = embedding, t
        self.scores[i] = quality.score
        self.count += 1

    def sequence(self) -> np.ndarray:
        """(T, D), oldest first; a track younger than T repeats its first embedding in front (or, with
        ``cycled``, all it has in turn, ending on the newest)."""
        length = len(self.times)
        if self.count < length and self.cycled:
            order = (np.arange(length) - length) % self.count
        elif self.count < length:
            order = np.concatenate([np.zeros(length - self.count, int), np.arange(self.count)])
        else:
            order = (np.arange(length) + self.count) % length
        return self.embeddings[order]

    def observation(self, camera_id: str, track_id: int, probs: np.ndarray) -> pb.EmotionObservation:
        n = min(self.count, len(self.times))
        first, last = self.times[:n].min(), self.times[:n].max()
        end = wall_clock(last)  # one conversion: the window is exactly as long as its frames span
        best = int(np.argmax(probs))
        return pb.EmotionObservation(
            camera_id=camera_id, track_id=track_id,
            window_start=timestamp(end - (last - first)), window_end=timestamp(end),
            label=codec.label_of(best), probabilities=probs.tolist(), confidence=float(probs[best]),
            frames=n,
            # only the combined score leaves the process (the coordinator weighs by it): a learner's
            # face size, sharpness, head yaw and detector confidence are measurements of a person,
            # and the privacy promise is labels only, so those FaceQuality fields stay unset
            quality=pb.FaceQuality(score=float(self.scores[:n].mean())))


class CameraPipeline:
    def __init__(self, camera_id: str, detector: Detector, model: Model, gate: QualityGate,
                 detection: DetectionSection, ids: Iterator[int], clock: StageClock | None = None):
        self.camera_id = camera_id
        self.detector = detector
        self.model = model
        self.gate = gate
        self.every = detection.every
        self.max_faces = detection.max_faces
        self.tracker = Tracker(ids, detection.iou_threshold, detection.max_missed, detection.max_faces)
        self.stage = clock or _no_clock
        self.windows: dict[int, Window] = {}
        self.frames = 0
        self._fresh: set[int] = set()      # tracks with a new embedding since the last collect
        self._rejected: Counter[str] = Counter()
        self._frames_at_collect = 0

    def process(self, image: np.ndarray, t: float) -> None:
        """Run one BGR frame captured at ``t`` (``time.monotonic()``, see :func:`wall_clock`) through the pipeline."""
        with self.stage("track"):
            gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            self.tracker.follow(gray)
        if self.frames % self.every == 0:
            with self.stage("detect"):
                faces = self.detector.detect(image, max_faces=self.max_faces)
            with self.stage("track"):
                self.tracker.match(faces)
        self.frames += 1
        crops, accepted = [], []
        with self.stage("align"):
            for track in self.tracker.visible():
                try:
                    crop = align_face(gray, track.landmarks)
                except ValueError:
                    self._rejected[UNALIGNED] += 1
                    continue
                quality = self.gate.assess(track.landmarks, crop, track.score)
                if quality.reason:
                    self._rejected[quality.reason] += 1
                else:
                    crops.append(crop)
                    accepted.append((track.id, quality))
        live = {t.id for t in self.tracker.tracks}
        for gone in self.windows.keys() - live:
            del self.windows[gone]
            self._fresh.discard(gone)
        if not crops:
            return
        with self.stage("encode"):
            # a model with a view cycle sees a track's k-th embedded face through its view k mod V
            seen = np.array([self.windows[i].count if i in self.windows else 0 for i, _ in accepted])
            embeddings = self.model.embed(np.stack(crops), seen)
        for (track_id, quality), embedding in zip(accepted, embeddings, strict=True):
            window = self.windows.get(track_id)
            if window is None:
                window = self.windows[track_id] = Window(self.model.window, self.model.embed_dim,
                                                         bool(self.model.views))
            window.push(embedding, t, quality)
            self._fresh.add(track_id)

    def collect(self, now: float, frames_dropped: int = 0
                ) -> tuple[list[pb.EmotionObservation], pb.CameraSummary]:
        """Observations of the tracks seen since the last call, and this camera's summary."""
        ids = sorted(self._fresh)
        observations = []
        with self.stage("head"):
            if ids:
                probs = self.model.classify(np.stack([self.windows[i].sequence() for i in ids]))
                observations = [self.windows[i].observation(self.camera_id, i, p)
                                for i, p in zip(ids, probs, strict=True)]
        summary = pb.CameraSummary(
            camera_id=self.camera_id, timestamp=timestamp(now), faces_present=len(ids),
            distribution=np.mean(probs, axis=0).tolist() if ids else [],
            frames_processed=self.frames - self._frames_at_collect, frames_dropped=frames_dropped,
            rejected=dict(self._rejected))
        self._fresh.clear()
        self._rejected.clear()
        self._frames_at_collect = self.frames
        return observations, summary
