"""The quality gate: each rejection reason on real faces, and the pipeline counting them per camera."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
from conftest import MODELS
from edge_support import needs_models

from edge_agent.config import DetectionSection, QualitySection
from edge_agent.faces.align import align_face
from edge_agent.faces.mtcnn import FaceDetector
from edge_agent.quality import BLURRY, TOO_SMALL, TURNED_AWAY, QualityGate, yaw_degrees

FRONTAL = np.float32([[30, 40], [50, 40], [40, 50], [32, 60], [48, 60]])
GATE = QualityGate(QualitySection())


@pytest.fixture(scope="module")
def justin(shared_media):
    """(frame, landmarks) of the real face photo."""
    frame = cv2.imread(str(shared_media / "justin.jpg"))
    detector = FaceDetector(MODELS / "mtcnn", backend="onnxruntime")
    (face,) = detector.detect(frame)
    return frame, face.landmarks


def rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    matrix = cv2.getRotationMatrix2D((40, 50), degrees, 1.0)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def test_yaw_is_zero_when_frontal_signed_when_turned_and_ignores_roll():
    assert yaw_degrees(FRONTAL) == pytest.approx(0.0, abs=1e-6)
    turned = FRONTAL.copy()
    turned[2, 0] = 50  # nose under the right eye
    assert yaw_degrees(turned) == pytest.approx(45.0, abs=1e-3)
    turned[2, 0] = 30
    assert yaw_degrees(turned) == pytest.approx(-45.0, abs=1e-3)
    assert yaw_degrees(rotate(turned, 30)) == pytest.approx(-45.0, abs=1e-3)


@needs_models
def test_a_good_face_passes(justin):
    frame, landmarks = justin
    quality = GATE.assess(landmarks, align_face(frame, landmarks), 0.99)
    assert quality.reason is None
    assert quality.score >= 0.5 and abs(quality.yaw_deg) < 10


@needs_models
def test_each_reason(justin):
    frame, landmarks = justin
    small = cv2.resize(frame, None, fx=0.15, fy=0.15, interpolation=cv2.INTER_AREA)
    small_marks = landmarks * 0.15
    assert GATE.assess(small_marks, align_face(small, small_marks), 0.9).reason == TOO_SMALL

    # sigma 8 px at an eye distance of 68 px is 2 px in the 48x48 crop the model reads
    blurred = cv2.GaussianBlur(frame, (0, 0), 8)
    assert GATE.assess(landmarks, align_face(blurred, landmarks), 0.9).reason == BLURRY

    turned = landmarks.copy()
    turned[2, 0] = turned[1, 0]  # the nose seen under one eye: head turned ~45 degrees
    assert GATE.assess(turned, align_face(frame, turned), 0.9).reason == TURNED_AWAY


@needs_models
def test_pipeline_counts_rejections_per_camera_and_labels_none_of_them(justin):
    from edge_agent.emotion_model import EmotionModel
    from edge_agent.pipeline import CameraPipeline

    frame, _ = justin
    canvas = np.full((480, 640, 3), 128, np.uint8)
    canvas[40:40 + frame.shape[0], 120:120 + frame.shape[1]] = cv2.GaussianBlur(frame, (0, 0), 8)
    model = EmotionModel.load(MODELS, backend="onnxruntime")
    detector = FaceDetector(MODELS / "mtcnn", backend="onnxruntime")
    pipeline = CameraPipeline("cam0", detector, model, GATE,
                              DetectionSection(every=2), itertools.count(1))
    for i in range(6):
        pipeline.process(canvas, 1000.0 + i / 10)
    observations, summary = pipeline.collect(1001.0)
    assert observations == []
    assert dict(summary.rejected) == {BLURRY: 6}
    assert summary.frames_processed == 6 and summary.faces_present == 0

    # the same face, sharp: labelled, with a 7-way distribution and the window it covers
    canvas[40:40 + frame.shape[0], 120:120 + frame.shape[1]] = frame
    for i in range(3):
        pipeline.process(canvas, 1002.0 + i / 10)
    observations, summary = pipeline.collect(1003.0)
    assert [o.track_id for o in observations] == [1]
    (obs,) = observations
    assert len(obs.probabilities) == 7 and obs.frames == 3
    # frames are stamped on the monotonic clock, the window on the wall clock: as long as the frames span
    assert obs.window_end.ToNanoseconds() - obs.window_start.ToNanoseconds() == pytest.approx(0.2e9, abs=1e3)
    assert summary.faces_present == 1 and len(summary.distribution) == 7 and not summary.rejected
