"""Cameras: newest frame wins (drops counted), files loop, a missing source is retried until it appears."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from edge_support import SAMPLE

from edge_agent.capture import Camera, describe, has_frames, is_file, is_v4l2
from edge_agent.pipeline import Window
from edge_agent.quality import Quality

ACCEPTED = Quality(eye_distance=30.0, sharpness=300.0, yaw_deg=0.0, detector_confidence=0.99, score=1.0, reason=None)


def short_clip(path: Path, frames: int = 10, fps: int = 50) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (160, 120))
    for i in range(frames):
        writer.write(np.full((120, 160, 3), i * 20, np.uint8))
    writer.release()
    return path


@pytest.mark.parametrize(("source", "shown"), [
    ("rtsp://admin:s3cret@10.0.0.5:554/stream", "rtsp://10.0.0.5:554/stream"),
    ("rtsp://admin:p@ss/w0rd@10.0.0.5/live", "rtsp://10.0.0.5/live"),
    ("http://10.0.0.6/video.cgi?user=admin&pwd=S3cret", "http://10.0.0.6/video.cgi"),
    ("rtsp://10.0.0.7/h264#token=S3cret", "rtsp://10.0.0.7/h264"),
    ("http://10.0.0.6/video.cgi?user=admin@school.edu&pwd=S3cret", "http://10.0.0.6/video.cgi"),
    ("http://cam/snap.jpg#user=a@b&pass=S3cret", "http://cam/snap.jpg"),
    ("/srv/clips/room 1.mp4", "/srv/clips/room 1.mp4"),
])
def test_credentials_never_reach_the_logs(source: str, shown: str):
    assert describe(source) == shown


def test_v4l2_devices_include_udev_links_and_files_do_not(tmp_path: Path):
    link = tmp_path / "usb-Logitech_Webcam-video-index0"
    link.symlink_to("/dev/video0")  # what /dev/v4l/by-id/ holds; the target need not exist here
    for source in ("0", "/dev/video2", str(link)):
        assert is_v4l2(source) and not is_file(source), source
    for source in ("clip.mp4", str(tmp_path / "clip.mp4"), "/dev/shm/clip.mp4", "rtsp://cam/stream"):
        assert not is_v4l2(source), source


def test_sources_kinds():
    assert not is_file("0") and not is_file("/dev/video2") and not is_file("http://cam/mjpg")
    assert is_file("clip.mp4")


def test_has_frames_only_for_a_video_that_decodes(tmp_path: Path):
    """What `edge-agent bench` asks before loading models: a text file or an empty video is no video."""
    (tmp_path / "notes.mp4").write_text("not a video\n")
    assert has_frames(str(short_clip(tmp_path / "clip.mp4", frames=1)))
    assert not has_frames(str(short_clip(tmp_path / "empty.mp4", frames=0)))
    assert not has_frames(str(tmp_path / "notes.mp4"))


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


def test_a_wall_clock_step_between_frames_does_not_stretch_the_window(tmp_path: Path, monkeypatch):
    """The wall clock steps an hour ahead (NTP, an admin) while a track's frames arrive: its observation's
    window must still be as long as its frames span, and end no later than the batch is sent."""
    camera = Camera("cam0", str(short_clip(tmp_path / "c.mp4")), fps=5)
    window = Window(4, 1)
    real_time = time.time
    camera.start()
    deadline = time.monotonic() + 20
    try:
        while window.count < 4 and time.monotonic() < deadline:
            if window.count == 2:
                monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
            frame = camera.take()
            if frame is not None:
                window.push(np.zeros(1, np.float32), frame.timestamp, ACCEPTED)
                last_taken = frame.timestamp
            time.sleep(0.01)
    finally:
        camera.stop()
    assert window.count == 4
    observation = window.observation("cam0", 1, np.full(7, 1 / 7))
    sent_at = time.time()  # what publish_batch stamps the batch with, on the stepped clock
    start, end = (stamp.ToNanoseconds() / 1e9 for stamp in (observation.window_start, observation.window_end))
    assert end - start == pytest.approx(last_taken - window.times.min(), abs=1e-3) and end - start < 60
    assert end <= sent_at


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


class MjpegCamera:
    """An IP camera on loopback: the sample video as an MJPEG stream over HTTP (multipart/x-mixed-replace)."""

    def __init__(self, port: int = 0):
        frames = [cv2.imencode(".jpg", image)[1].tobytes() for image in _sample_frames(30)]
        streams = self.streams = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                streams.append(self.connection)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for jpeg in itertools.cycle(frames):
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n")
                        self.wfile.write(b"Content-Length: %d\r\n\r\n" % len(jpeg) + jpeg + b"\r\n")
                        time.sleep(1 / 25)
                except OSError:  # the client or the server went away
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"

    def close(self) -> None:
        """Stop listening and cut the streams being served, as a camera that reboots does."""
        self.server.shutdown()
        self.server.server_close()
        for stream in self.streams:
            with contextlib.suppress(OSError):
                stream.shutdown(socket.SHUT_RDWR)


def _sample_frames(count: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(SAMPLE))
    frames = [capture.read()[1] for _ in range(count)]
    capture.release()
    return [cv2.resize(f, (320, 240)) for f in frames]


def _frames_within(camera: Camera, seconds: float) -> list:
    frames, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline and len(frames) < 5:
        frame = camera.take()
        if frame is not None:
            frames.append(frame)
        time.sleep(0.02)
    return frames


def test_network_camera_streams_and_is_reconnected_after_it_drops():
    server = MjpegCamera()
    port = server.server.server_address[1]
    camera = Camera("cam0", server.url, fps=15, max_backoff_s=1)
    camera.start()
    try:
        before = _frames_within(camera, 15)
        assert len(before) == 5 and before[0].image.shape == (240, 320, 3)
        server.close()  # the camera reboots: the stream ends, the port refuses for a while
        deadline = time.monotonic() + 15
        while camera.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not camera.connected
        server = MjpegCamera(port)
        after = _frames_within(camera, 20)
        assert len(after) == 5 and after[0].index > before[-1].index and camera.connected
    finally:
        camera.stop()
        server.close()
