"""Cameras: newest frame wins (drops counted), files loop, a missing source is retried until it appears."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from edge_support import SAMPLE

from edge_agent.capture import Camera, describe, is_file


def short_clip(path: Path, frames: int = 10, fps: int = 50) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (160, 120))
    for i in range(frames):
        writer.write(np.full((120, 160, 3), i * 20, np.uint8))
    writer.release()
    return path


def test_sources_and_credentials_in_logs():
    assert describe("rtsp://admin:s3cret@10.0.0.5:554/stream") == "rtsp://10.0.0.5:554/stream"
    assert not is_file("0") and not is_file("/dev/video2") and not is_file("http://cam/mjpg")
    assert is_file("clip.mp4")


def test_file_loops_and_a_slow_consumer_gets_the_newest_frame(tmp_path: Path):
    camera = Camera("cam0", str(short_clip(tmp_path / "c.mp4")), fps=100)
    arrived = threading.Event()
    camera.start(arrived)
    try:
        indexes = []
        deadline = time.monotonic() + 10
        while len(indexes) < 4 and time.monotonic() < deadline:
            time.sleep(0.25)  # a slow pipeline: ~12 frames arrive between takes at the file's 50 fps
            frame = camera.take()
            if frame is not None:
                indexes.append(frame.index)
                assert camera.take() is None  # each frame is handed out once
    finally:
        camera.stop()
    assert arrived.is_set() and camera.tried.is_set()
    assert indexes[-1] > 10  # the 10-frame file looped
    assert all(b - a > 1 for a, b in itertools.pairwise(indexes))  # stale frames skipped
    assert camera.frames_dropped > 0


def test_fps_cap_limits_decoded_frames(tmp_path: Path):
    camera = Camera("cam0", str(short_clip(tmp_path / "c.mp4")), fps=5)
    camera.start()
    taken = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < 2.0:
            taken += camera.take() is not None
            time.sleep(0.01)
    finally:
        camera.stop()
    assert 7 <= taken <= 12  # 5 frames/s of a 50 frames/s file


def test_missing_source_is_retried_until_it_appears(tmp_path: Path):
    path = tmp_path / "later.mp4"
    camera = Camera("cam0", str(path), fps=10, max_backoff_s=1)
    camera.start()
    try:
        assert camera.tried.wait(5)
        assert not camera.connected and camera.take() is None
        shutil.copy(SAMPLE, path)
        deadline = time.monotonic() + 10
        frame = None
        while frame is None and time.monotonic() < deadline:
            time.sleep(0.05)
            frame = camera.take()
        assert frame is not None and camera.connected
        assert frame.image.shape == (480, 640, 3)
    finally:
        camera.stop()
