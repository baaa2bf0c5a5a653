"""Webcam-style augmentation of 48x48 faces, in numpy/OpenCV so any Keras backend can train on it.

Per face: horizontal flip, small rotation/scale/shift (one affine warp), brightness/contrast
jitter, occasional blur, sensor noise and a partial occlusion (a hand, a mug, a pen). The same
``perturb`` with milder settings makes frame-to-frame jitter when clips are synthesised.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.faces.align import SIZE


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5
    rotate_deg: float = 12.0
    scale: float = 0.1
    shift_px: float = 4.0
    brightness: float = 0.2
    contrast: float = 0.3
    blur: float = 0.15
    noise: float = 0.3
    occlude: float = 0.3


TRAIN = AugmentConfig()
#: Only the changes a face crop of the test set also shows (pose, framing, exposure), no blur,
#: noise or occluders: for a last fine-tune of an encoder trained with TRAIN.
LIGHT = AugmentConfig(rotate_deg=6.0, scale=0.05, shift_px=2.0, brightness=0.1, contrast=0.15,
                      blur=0.0, noise=0.0, occlude=0.0)
#: Frame-to-frame changes of one face on a webcam: a little motion, light and noise; no flips.
JITTER = AugmentConfig(flip=0.0, rotate_deg=4.0, scale=0.04, shift_px=1.5, brightness=0.08,
                       contrast=0.1, blur=0.2, noise=0.4, occlude=0.05)
#: The stage-1 choices of ``model_export train --augment``.
PRESETS = {"webcam": TRAIN, "light": LIGHT}


def perturb(faces: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = TRAIN) -> np.ndarray:
    """(N, 48, 48) uint8 -> (N, 48, 48) float32 in [0, 1], each face perturbed independently."""
    out = np.empty(faces.shape, dtype=np.float32)
    centre = (SIZE / 2, SIZE / 2)
    for i, face in enumerate(faces):
        if rng.random() < cfg.flip:
            face = face[:, ::-1]
        matrix = cv2.getRotationMatrix2D(
            centre, rng.uniform(-cfg.rotate_deg, cfg.rotate_deg), 1 + rng.uniform(-cfg.scale, cfg.scale)
        )
        matrix[:, 2] += rng.uniform(-cfg.shift_px, cfg.shift_px, size=2)
        face = cv2.warpAffine(np.ascontiguousarray(face), matrix, (SIZE, SIZE),
                              borderMode=cv2.BORDER_REFLECT_101)
        if rng.random() < cfg.blur:
            face = cv2.GaussianBlur(face, (3, 3), rng.uniform(0.5, 1.2))
        out[i] = face
    out /= 255.0
    n = len(faces)
    contrast = (1 + rng.uniform(-cfg.contrast, cfg.contrast, size=(n, 1, 1))).astype(np.float32)
    brightness = rng.uniform(-cfg.brightness, cfg.brightness, size=(n, 1, 1)).astype(np.float32)
    mean = out.mean(axis=(1, 2), keepdims=True)
    out = (out - mean) * contrast + mean + brightness
    noisy = rng.random(n) < cfg.noise
    out[noisy] += rng.normal(0, rng.uniform(0.01, 0.04), size=out[noisy].shape).astype(np.float32)
    for i in np.flatnonzero(rng.random(n) < cfg.occlude):
        h, w = rng.integers(8, 20, size=2)
        y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
        out[i, y:y + h, x:x + w] = rng.random()
    return np.clip(out, 0.0, 1.0, out=out)
