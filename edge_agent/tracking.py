"""Anonymous face tracks: the detector runs every k frames, optical flow carries faces in between.

Detection is the expensive stage (an MTCNN image pyramid), so it runs on every ``k``-th frame
only. In between, each track's 5 landmarks are followed with pyramidal Lucas-Kanade optical flow
(checked forward *and* backward, so a point that slid onto the background is caught); the box
moves and scales with them. That keeps the landmarks exact enough to align the face on every
frame, which a box-only motion model (constant velocity, Kalman) could not. On detection frames,
detections are matched to the flow-propagated boxes by IoU (greedy, best overlap first);
unmatched detections start new tracks, and a track unmatched by ``max_missed`` consecutive
detections ends.

Track ids are a plain counter shared by all cameras of one agent: they say "the same face as a
moment ago", never who it is, and they start again from 1 when the agent restarts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

_LK = dict(winSize=(15, 15), maxLevel=3,
           criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))
#: forward-backward disagreement (pixels) above which a tracked landmark is not trusted
MAX_FB_ERROR = 1.5


@dataclass
class Track:
    id: int
    box: np.ndarray         # float32 [x1, y1, x2, y2]
    landmarks: np.ndarray   # float32 (5, 2)
    score: float            # detector confidence of the last matching detection
    missed: int = 0         # consecutive detections that did not match this track
    visible: bool = True    # landmarks are valid for the current frame


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4) -> (N, M)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-6)


class Tracker:
    """Tracks of one camera. Call :meth:`follow` on every frame, then :meth:`match` on detection frames."""

    def __init__(self, ids: Iterator[int] | None = None, iou_threshold: float = 0.3,
                 max_missed: int = 2, max_tracks: int = 16):
        self.ids = ids if ids is not None else itertools.count(1)
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.max_tracks = max_tracks
        self.tracks: list[Track] = []
        self._prev: np.ndarray | None = None

    def follow(self, gray: np.ndarray) -> None:
        """Move every visible track's landmarks from the previous frame to ``gray`` by optical flow."""
        prev, self._prev = self._prev, gray
        moving = [t for t in self.tracks if t.visible]
        if prev is None or not moving or prev.shape != gray.shape:
            return
        old = np.concatenate([t.landmarks for t in moving]).reshape(-1, 1, 2)
        new, ok, _ = cv2.calcOpticalFlowPyrLK(prev, gray, old, None, **_LK)
        back, ok_back, _ = cv2.calcOpticalFlowPyrLK(gray, prev, new, None, **_LK)
        good = (ok[:, 0] == 1) & (ok_back[:, 0] == 1) & (np.linalg.norm(back - old, axis=2)[:, 0] < MAX_FB_ERROR)
        old, new, good = old.reshape(-1, 5, 2), new.reshape(-1, 5, 2), good.reshape(-1, 5)
        for track, src, dst, g in zip(moving, old, new, good, strict=True):
            if g.sum() < 3:
                track.visible = False  # lost until a detection picks it up again
                continue
            shift = np.median(dst[g] - src[g], axis=0)
            spread_src = np.linalg.norm(src[g] - src[g].mean(0), axis=1).mean()
            spread_dst = np.linalg.norm(dst[g] - dst[g].mean(0), axis=1).mean()
            scale = float(np.clip(spread_dst / max(spread_src, 1e-3), 0.8, 1.25))
            center = (track.box[:2] + track.box[2:]) / 2 + shift
            half = (track.box[2:] - track.box[:2]) / 2 * scale
            track.box = np.concatenate([center - half, center + half]).astype(np.float32)
            # points that failed follow the face's overall motion
            track.landmarks = np.where(g[:, None], dst, src + shift).astype(np.float32)

    def match(self, faces: Sequence) -> None:
        """Update tracks with this frame's detections (objects with ``box``, ``landmarks``, ``score``)."""
        unmatched = list(range(len(faces)))
        matched: set[int] = set()
        if self.tracks and faces:
            overlap = iou(np.stack([t.box for t in self.tracks]), np.stack([f.box for f in faces]))
            for flat in np.argsort(overlap, axis=None)[::-1]:
                ti, fi = np.unravel_index(flat, overlap.shape)
                if overlap[ti, fi] < self.iou_threshold:
                    break
                if ti in matched or fi not in unmatched:
                    continue
                track, face = self.tracks[ti], faces[fi]
                track.box = np.asarray(face.box, np.float32)
                track.landmarks = np.asarray(face.landmarks, np.float32)
                track.score, track.missed, track.visible = float(face.score), 0, True
                matched.add(ti)
                unmatched.remove(fi)
        for i, track in enumerate(self.tracks):
            if i not in matched:
                track.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.max_missed]
        for fi in sorted(unmatched, key=lambda i: -float(faces[i].score)):
            if len(self.tracks) >= self.max_tracks:
                break
            face = faces[fi]
            self.tracks.append(Track(next(self.ids), np.asarray(face.box, np.float32),
                                     np.asarray(face.landmarks, np.float32), float(face.score)))

    def visible(self) -> list[Track]:
        return [t for t in self.tracks if t.visible]
