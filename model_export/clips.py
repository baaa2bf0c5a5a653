"""Synthesised clips: how the BiLSTM head learns time from still photos.

A clip of T frames is built from one face (the label) seen through webcam jitter: each frame is
one of several independently perturbed views, some frames are dropped (the previous one repeats,
as when the edge skips a frame), and some clips open with a few frames of a *different* expression
so the head learns that the latest frames decide the label (expression transitions).

Training works on an embedding bank — every face embedded under ``VIEWS`` jitters once — so a
head epoch costs no encoder passes at all.
"""

from __future__ import annotations

import keras
import numpy as np

from affectedge.labels import EMOTIONS
from model_export.augment import JITTER, perturb

VIEWS = 4
DROP_FRAME = 0.15
TRANSITION = 0.3


def embedding_bank(encoder: keras.Model, images: np.ndarray, rng: np.random.Generator,
                   views: int = VIEWS, batch: int = 1024) -> np.ndarray:
    """(N, 48, 48) uint8 -> (N, views, D) embeddings of jittered copies."""
    out = []
    for v in range(views):
        cfg = JITTER if v else JITTER.__class__(flip=0.0, rotate_deg=0, scale=0, shift_px=0,
                                                brightness=0, contrast=0, blur=0, noise=0, occlude=0)
        x = perturb(images, rng, cfg)[..., None]
        out.append(encoder.predict(x, batch_size=batch, verbose=0))
    return np.stack(out, axis=1)


def clip_indices(n: int, labels: np.ndarray, index: int, window: int,
                 rng: np.random.Generator, views: int) -> tuple[np.ndarray, np.ndarray]:
    """For clip of face ``index``: per frame, (face index, view index)."""
    faces = np.full(window, index)
    if rng.random() < TRANSITION:
        other = rng.integers(n)
        while labels[other] == labels[index]:
            other = rng.integers(n)
        faces[: rng.integers(1, window // 2)] = other
    frame_views = rng.integers(views, size=window)
    for t in range(1, window):
        if rng.random() < DROP_FRAME:
            faces[t], frame_views[t] = faces[t - 1], frame_views[t - 1]
    return faces, frame_views


class ClipBatches(keras.utils.PyDataset):
    """Batches of (clip embeddings (B, T, D), one-hot label[, class weight])."""

    def __init__(self, bank: np.ndarray, labels: np.ndarray, window: int, batch_size: int,
                 weights: np.ndarray | None, seed: int):
        super().__init__()
        self.bank, self.labels, self.window = bank, labels, window
        self.batch_size, self.weights, self.seed, self.epoch = batch_size, weights, seed, 0

    def __len__(self) -> int:
        return int(np.ceil(len(self.labels) / self.batch_size))

    def __getitem__(self, index: int):
        # validation clips are the same every epoch (seeded by batch only); training clips change
        rng = np.random.default_rng((self.seed, self.epoch if self.weights is not None else 0, index))
        start = index * self.batch_size
        idx = np.arange(start, min(start + self.batch_size, len(self.labels)))
        if self.weights is not None:
            idx = rng.integers(len(self.labels), size=len(idx))
        x = np.empty((len(idx), self.window, self.bank.shape[2]), np.float32)
        for row, i in enumerate(idx):
            faces, views = clip_indices(len(self.labels), self.labels, i, self.window, rng, self.bank.shape[1])
            x[row] = self.bank[faces, views]
        y = keras.utils.to_categorical(self.labels[idx], len(EMOTIONS))
        if self.weights is None:
            return x, y
        return x, y, self.weights[self.labels[idx]]

    def on_epoch_end(self) -> None:
        self.epoch += 1
