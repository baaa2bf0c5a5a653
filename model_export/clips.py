"""Synthesised clips: how the BiLSTM head learns time from still photos.

A clip of T frames is built from one face (the label) seen through webcam jitter: each frame is
one of several independently perturbed views, some frames are dropped (the previous one repeats,
as when the edge skips a frame), and some clips open with a few frames of a *different* expression
so the head learns that the latest frames decide the label (expression transitions).

Training (:class:`model_export.train.ClipBatches`) works on an embedding bank — every face
embedded under ``VIEWS`` jitters once — so a head epoch costs no encoder passes at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from edge_agent.faces.views import View
from model_export.augment import JITTER, perturb

log = logging.getLogger(__name__)

VIEWS = 4
DROP_FRAME = 0.15
TRANSITION = 0.3
OTHER_FACE_DRAWS = 32  # random tries for a face of another class before scanning the labels


def embedding_bank(embed: Callable[..., np.ndarray], images: np.ndarray,
                   rng: np.random.Generator, views: int = VIEWS, chunk: int = 2048,
                   cycle: tuple[View, ...] = ()) -> np.ndarray:
    """(N, 48, 48) uint8 -> (N, views, D): view 0 is the face as is, the others webcam-jittered.

    ``embed`` maps uint8 faces to embeddings (Keras during training, ONNX Runtime in evaluation
    and for an ensemble's fused encoder). With a view ``cycle`` there is one entry per view of the
    cycle instead, entry v seen through ``cycle[v]`` (``embed(faces, view)``), for clips whose
    frames cycle through the views as the edge's do; each entry is then the face as is for a random
    ``1 / views`` of the faces (the share of clean frames without a cycle) and jittered for the rest,
    so that no view is always the clean one: a head would learn to trust the frames at its position
    in the window, which at the edge are as noisy as the others. Tens of thousands of faces times ``views`` take minutes
    on a CPU (half an hour for a rotated-view encoder), hence the progress bar on a terminal and,
    where there is none (``nohup``, a CI log), a log line at each tenth with the time left.
    """
    clean_share = 1 / views
    views = len(cycle) or views
    parts: list[list[np.ndarray]] = [[] for _ in range(views)]
    total, done, started = views * len(images), 0, time.monotonic()
    next_report = step = max(1, total // 10)
    with tqdm(total=total, unit="face", desc="embedding views", disable=None) as bar:
        for start in range(0, len(images), chunk):
            batch = images[start:start + chunk]
            for view in range(views):
                shown = batch if view == 0 and not cycle else _jittered(batch, rng, clean_share if cycle else 0.0)
                parts[view].append(embed(shown, cycle[view]) if cycle else embed(shown))
                bar.update(len(batch))
                done += len(batch)
                if bar.disable and done >= next_report and done < total:
                    left = (time.monotonic() - started) * (total - done) / done
                    log.info("embedding views: %d of %d faces (%d%%), about %.0f min left", done, total,
                             100 * done // total, left / 60)
                    next_report = (done // step + 1) * step
    return np.stack([np.concatenate(p) for p in parts], axis=1)


def _jittered(faces: np.ndarray, rng: np.random.Generator, clean_share: float) -> np.ndarray:
    """``faces`` under webcam jitter, each but a random ``clean_share`` of them kept as they are."""
    shown = (perturb(faces, rng, JITTER) * 255).round().astype(np.uint8)
    if clean_share:  # no draw otherwise: banks without a cycle keep the random stream they always had
        clean = rng.random(len(faces)) < clean_share
        shown[clean] = faces[clean]
    return shown


def _other_class_face(n: int, labels: np.ndarray, index: int, rng: np.random.Generator) -> int | None:
    """A face of another class than face ``index``'s, or None when there is none.

    Random draws first: training asks this for about a third of its clips every epoch, and with a
    scan of all labels each time one epoch of FER2013's 28,709 clips took 0.83 s in
    :func:`clip_indices` against 0.47 s with draws. The scan only settles what the draws could not,
    such as a one-class folder in ``evaluate --clips``.
    """
    for _ in range(OTHER_FACE_DRAWS):
        other = int(rng.integers(n))
        if labels[other] != labels[index]:
            return other
    others = np.flatnonzero(labels[:n] != labels[index])
    return int(rng.choice(others)) if others.size else None


def clip_indices(n: int, labels: np.ndarray, index: int, window: int,
                 rng: np.random.Generator, views: int, cycle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For clip of face ``index``: per frame, (face index, view index).

    A transition opens the clip with 1 to ``max(1, window // 2 - 1)`` frames of a face of another
    class, so the last frame always shows the labelled face; there is none in a one-frame window or
    when every face has the same label (a one-class folder in ``evaluate --clips``). The views are
    drawn at random, or with ``cycle`` follow one another from a random first one, as the view cycle
    of a track at the edge does.
    """
    faces = np.full(window, index)
    if rng.random() < TRANSITION and window > 1:
        other = _other_class_face(n, labels, index, rng)
        if other is not None:
            faces[: rng.integers(1, max(2, window // 2))] = other
    frame_views = (rng.integers(views) + np.arange(window)) % views if cycle else rng.integers(views, size=window)
    for t in range(1, window):  # a dropped frame repeats the previous one, but the last shows the labelled face
        if rng.random() < DROP_FRAME and (t < window - 1 or faces[t - 1] == index):
            faces[t] = faces[t - 1]
            if not cycle:  # a cycle goes on: the edge only counts the frames it embeds
                frame_views[t] = frame_views[t - 1]
    return faces, frame_views
