"""The quality gate: only faces the model can read are labelled, and every rejection is counted.

Three cheap measurements, all from what the pipeline already has:

* size — inter-ocular distance in frame pixels (robust to how loosely the detector boxes a face);
* sharpness — variance of the Laplacian of the 48x48 aligned crop, i.e. of exactly what the model
  sees (motion blur, out-of-focus webcams);
* yaw — from the landmarks: where the nose falls between the eyes along the eye line. With the
  nose tip about one half inter-ocular distance in front of the eye plane, its offset from the eye
  midpoint is ``tan(yaw)`` half-distances, so yaw = atan(2 * (r - 0.5)) for r in [0, 1] along
  the eye line (0.5 = frontal). Measuring along the eye line makes it insensitive to head roll.

A rejected face is counted under its first failing reason (the constants below), reported per camera in
each :class:`CameraSummary`, so an installer can see "most faces too small: move the camera".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.config import QualitySection

TOO_SMALL, TURNED_AWAY, BLURRY = "too_small", "turned_away", "blurry"
#: landmarks so degenerate (coincident, collinear) that no alignment exists; counted, never labelled
UNALIGNED = "unaligned"


@dataclass(frozen=True)
class Quality:
    eye_distance: float
    sharpness: float
    yaw_deg: float
    detector_confidence: float
    score: float            # 0..1; 0.5 or more per factor means it passed that gate
    reason: str | None      # None: accepted


def eye_distance(landmarks: np.ndarray) -> float:
    return float(np.linalg.norm(landmarks[1] - landmarks[0]))


def yaw_degrees(landmarks: np.ndarray) -> float:
    """Head yaw estimated from the 5 landmarks (left eye, right eye, nose, mouth corners)."""
    left, right, nose = landmarks[0], landmarks[1], landmarks[2]
    axis = right - left
    length2 = float(axis @ axis)
    if length2 < 1e-6:
        return 90.0
    r = float((nose - left) @ axis) / length2
    return math.degrees(math.atan(2.0 * (r - 0.5)))


def sharpness(crop: np.ndarray) -> float:
    return float(cv2.Laplacian(crop, cv2.CV_32F).var())


def _ramp(value: float, threshold: float) -> float:
    """0.5 at the threshold, 1.0 at twice it: how comfortably a measurement passed."""
    return 1.0 if threshold <= 0 else float(np.clip(0.5 * value / threshold, 0.0, 1.0))


class QualityGate:
    def __init__(self, config: QualitySection):
        self.config = config

    def assess(self, landmarks: np.ndarray, crop: np.ndarray, confidence: float) -> Quality:
        c = self.config
        eyes, sharp, yaw = eye_distance(landmarks), sharpness(crop), yaw_degrees(landmarks)
        score = (_ramp(eyes, c.min_eye_distance_px) * _ramp(sharp, c.min_sharpness)
                 * float(np.clip(1.0 - 0.5 * abs(yaw) / c.max_yaw_deg, 0.0, 1.0)))
        reason = (TOO_SMALL if eyes < c.min_eye_distance_px
                  else TURNED_AWAY if abs(yaw) > c.max_yaw_deg
                  else BLURRY if sharp < c.min_sharpness
                  else None)
        return Quality(eyes, sharp, yaw, confidence, score, reason)
