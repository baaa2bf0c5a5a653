"""Tracking: ids stay with faces across frames, optical flow follows motion, tracks end and never reuse ids."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import cv2
import numpy as np
from conftest import MODELS
from edge_support import SAMPLE, needs_models

from edge_agent.capture import read_file
from edge_agent.faces.mtcnn import FaceDetector
from edge_agent.tracking import Tracker, iou


@dataclass
class Det:
    box: np.ndarray
    landmarks: np.ndarray
    score: float = 0.99


def justin_scene(shared_media, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """justin.jpg on a 640x480 textured canvas, shifted by (dx, dy) with sub-pixel accuracy."""
    face = cv2.imread(str(shared_media / "justin.jpg"))
    canvas = np.full((480, 640, 3), 128, np.uint8)
    matrix = np.float32([[1, 0, 120 + dx], [0, 1, 40 + dy]])
    return cv2.warpAffine(face, matrix, (640, 480), dst=canvas, borderMode=cv2.BORDER_TRANSPARENT)


def test_iou():
    a = np.float32([[0, 0, 10, 10]])
    b = np.float32([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou(a, b), [[1.0, 1 / 3, 0.0]], rtol=1e-6)


@needs_models
def test_optical_flow_follows_a_moving_face_between_detections(shared_media):
    detector = FaceDetector(MODELS / "mtcnn", backend="onnxruntime")
    tracker = Tracker()
    first = justin_scene(shared_media)
    tracker.follow(cv2.cvtColor(first, cv2.COLOR_BGR2GRAY))
    tracker.match(detector.detect(first))
    (track,) = tracker.tracks
    start = track.landmarks.copy()
    for step in range(1, 13):  # 2.5 px right and 1.5 px down per frame, no detection
        tracker.follow(cv2.cvtColor(justin_scene(shared_media, 2.5 * step, 1.5 * step), cv2.COLOR_BGR2GRAY))
    assert tracker.visible() == [track] and track.id == 1
    np.testing.assert_allclose(track.landmarks - start, np.tile([30.0, 18.0], (5, 1)), atol=1.0)
    # the next detection lands on the tracked box, so the id carries on
    tracker.match(detector.detect(justin_scene(shared_media, 30, 18)))
    assert [t.id for t in tracker.tracks] == [1] and track.missed == 0


def test_tracks_end_after_max_missed_and_ids_are_never_reused():
    ids = itertools.count(1)
    tracker = Tracker(ids, max_missed=2, max_tracks=2)
    landmarks = np.float32([[30, 40], [50, 40], [40, 50], [32, 60], [48, 60]])
    a = Det(np.float32([20, 20, 60, 70]), landmarks)
    b = Det(np.float32([200, 20, 240, 70]), landmarks + np.float32([180, 0]))
    c = Det(np.float32([400, 20, 440, 70]), landmarks + np.float32([380, 0]), 0.5)
    tracker.match([a, b, c])  # max_tracks=2: the best-scored two become tracks
    assert [t.id for t in tracker.tracks] == [1, 2]
    tracker.match([b])
    tracker.match([b])
    assert [(t.id, t.missed) for t in tracker.tracks] == [(1, 2), (2, 0)]
    tracker.match([b])  # third miss in a row ends track 1
    assert [t.id for t in tracker.tracks] == [2]
    tracker.match([b, a])  # the same face coming back is a new anonymous track
    assert [t.id for t in tracker.tracks] == [2, 3]


@needs_models
def test_ids_stay_with_the_learners_of_the_sample_video():
    detector = FaceDetector(MODELS / "mtcnn", backend="onnxruntime")
    tracker = Tracker(max_tracks=16)
    four = 0
    for index, frame in enumerate(itertools.islice(read_file(str(SAMPLE)), 160)):
        tracker.follow(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
        if index % 5 == 0:
            tracker.match(detector.detect(frame))
        four += len(tracker.visible()) == 4
    # four learners, four ids, over 160 frames (6.4 s) of drifting, swaying faces and one expression change
    assert sorted(t.id for t in tracker.tracks) == [1, 2, 3, 4]
    assert four >= 152
