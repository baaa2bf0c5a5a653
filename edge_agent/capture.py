"""Cameras: a reader thread per source that always holds the newest frame.

A lab PC's webcam delivers 30 frames/s whether or not we keep up; queuing them would make every
label late. So a reader thread grabs continuously, decodes only as often as the fps cap allows
(``grab()`` without ``retrieve()`` skips the decode of a V4L2/MJPEG frame) and keeps just the
newest decoded frame; a frame replaced before the pipeline took it is counted as dropped.
Sources that fail (unplugged USB camera, RTSP stream down) are reopened with exponential
back-off; video files loop, paced at their own frame rate, so a file behaves like a camera.
Frames live only in memory.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)
# OpenCV's own warnings ("can't open camera by index") duplicate our log lines in a worse form
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
#: give up opening or reading a network stream after this long, so a dead camera cannot hang us
NETWORK_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class Frame:
    image: np.ndarray   # BGR uint8
    timestamp: float    # time.monotonic() when it was grabbed: a wall-clock step cannot reorder or stretch frames
    index: int          # per-camera counter of decoded frames


def describe(source: str) -> str:
    """The source without credentials, for logs (``rtsp://user:pass@host/s?pwd=x`` -> ``rtsp://host/s``).

    Everything up to the last '@' goes (a password may itself hold '@' or '/'), and so does the
    query string, where many IP cameras take ``?user=...&pwd=...``.
    """
    scheme = _URL.match(source)
    if scheme is None:
        return source
    rest = re.split(r"[?#]", source[scheme.end():], maxsplit=1)[0]  # first: a query may hold '@' too
    return scheme.group() + rest.rpartition("@")[2]


def is_v4l2(source: str) -> bool:
    """A V4L2 camera: an index ("0"), or a device node, also via a stable udev link such as
    ``/dev/v4l/by-id/usb-...-video-index0`` (which OpenCV's FFmpeg backend would not open)."""
    return source.isdigit() or os.path.realpath(source).startswith("/dev/video")


def is_file(source: str) -> bool:
    return not (is_v4l2(source) or _URL.match(source))


def open_capture(source: str, width: int | None = None, height: int | None = None) -> cv2.VideoCapture:
    """Open a V4L2 index/device, a URL or a file; the returned capture may be not opened."""
    if is_v4l2(source):
        capture = cv2.VideoCapture(int(source) if source.isdigit() else source, cv2.CAP_V4L2)
        # one driver buffer: the frame we grab is the newest, not one queued seconds ago
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    elif _URL.match(source):
        capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG, [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS,
        ])
    else:
        capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG)
    if width and height and capture.isOpened():
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    return capture


class Camera:
    """One source, read on its own thread; :meth:`take` hands out each new frame at most once."""

    def __init__(self, camera_id: str, source: str, fps: float, width: int | None = None,
                 height: int | None = None, max_backoff_s: float = 30.0):
        self.id = camera_id
        self.source = source
        self.min_interval = 1.0 / fps
        self.size = (width, height)
        self.max_backoff_s = max_backoff_s
        self.connected = False
        self.tried = threading.Event()  # set once the first open attempt is over, either way
        self.frames_dropped = 0
        self._frame: Frame | None = None
        self._fresh = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"camera-{camera_id}", daemon=True)

    def start(self, new_frame: threading.Event | None = None) -> None:
        """Start reading; ``new_frame`` is set whenever a frame arrives (one event for all cameras)."""
        self._notify = new_frame
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(NETWORK_TIMEOUT_MS / 1000 + 2)

    def take(self) -> Frame | None:
        """The newest frame if it has not been taken yet, else None."""
        with self._cond:
            if not self._fresh:
                return None
            self._fresh = False
            return self._frame

    def _publish(self, frame: Frame) -> None:
        with self._cond:
            if self._fresh:
                self.frames_dropped += 1
            self._frame, self._fresh = frame, True
        if self._notify is not None:
            self._notify.set()

    def _run(self) -> None:
        backoff = 1.0
        index = 0
        file = is_file(self.source)
        while not self._stop.is_set():
            capture = open_capture(self.source, *self.size)
            self.connected = capture.isOpened()
            self.tried.set()
            if not capture.isOpened():
                capture.release()
                log.warning("camera %s: cannot open %s; retrying in %.0f s",
                            self.id, describe(self.source), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            log.info("camera %s: opened %s", self.id, describe(self.source))
            native = capture.get(cv2.CAP_PROP_FPS) if file else 0.0
            # a file is paced at its own rate; a camera paces itself
            frame_period = 1.0 / native if file and 0 < native < 1000 else 0.0
            next_frame = next_decode = time.monotonic()
            grabbed = 0  # since opening or looping; a file that yields nothing is not looped forever
            while not self._stop.is_set():
                if frame_period:
                    self._stop.wait(max(0.0, next_frame - time.monotonic()))
                    next_frame = max(next_frame + frame_period, time.monotonic() - frame_period)
                if not capture.grab():
                    if file and grabbed:
                        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # loop
                        grabbed = 0
                        continue
                    break
                grabbed += 1
                now = time.monotonic()
                if now < next_decode:
                    continue
                ok, image = capture.retrieve()
                if not ok:
                    break
                backoff = 1.0
                next_decode = max(next_decode + self.min_interval, now - self.min_interval)
                index += 1
                self._publish(Frame(image, now, index))
            capture.release()
            self.connected = False
            if not self._stop.is_set():
                log.warning("camera %s: stream from %s ended; reopening in %.0f s",
                            self.id, describe(self.source), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)


def has_frames(path: str) -> bool:
    """Whether ``path`` opens as a video with a frame OpenCV decodes: ``bench`` asks before it loads the
    models, so a wrong file is a one-line error instead of a failure after seconds of start-up."""
    capture = open_capture(path)
    try:
        return capture.isOpened() and capture.read()[0]
    finally:
        capture.release()


def read_file(path: str):
    """Every frame of a video file once, as fast as it decodes (for ``edge-agent bench``)."""
    capture = open_capture(path)
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open video {path}: check the path and that it is a video file")
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                return
            yield image
    finally:
        capture.release()
