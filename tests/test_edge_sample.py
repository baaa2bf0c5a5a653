"""The committed sample clip: what the demo and the edge tests play as a camera."""

from __future__ import annotations

import itertools

import cv2
from conftest import MODELS
from edge_support import SAMPLE, needs_models

from edge_agent.capture import read_file
from edge_agent.faces.mtcnn import FaceDetector


def test_sample_is_a_small_640x480_clip_of_about_20_seconds():
    assert SAMPLE.stat().st_size <= 3 * 2**20
    capture = cv2.VideoCapture(str(SAMPLE))
    size = (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    seconds = capture.get(cv2.CAP_PROP_FRAME_COUNT) / capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    assert size == (640, 480)
    assert 18 <= seconds <= 22


@needs_models
def test_the_detector_finds_all_four_learners():
    detector = FaceDetector(MODELS / "mtcnn", backend="onnxruntime")
    checked = found_all = 0
    for frame in itertools.islice(read_file(str(SAMPLE)), 0, None, 7):  # every 7th frame: all phases
        checked += 1
        found_all += len(detector.detect(frame)) == 4
    assert checked >= 70
    assert found_all / checked >= 0.95
