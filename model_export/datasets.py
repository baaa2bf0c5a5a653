"""Loading labelled faces: class folders, the FER2013 CSV and FER+ vote files.

Everything is returned as ``uint8`` arrays of shape ``(N, 48, 48)`` plus integer labels in the
canonical :data:`affectedge.labels.EMOTIONS` order, so training and evaluation never care which
format the data came in.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from affectedge.labels import EMOTIONS, canonical
from edge_agent.faces.align import to_model_input

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
FER2013_CODES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear")


class DatasetError(ValueError):
    """A dataset path or file that cannot be read as labelled faces."""


@dataclass
class Faces:
    """Face crops (N, 48, 48) uint8 and labels (N,) int in EMOTIONS order."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(EMOTIONS))


def read_face(path: Path) -> np.ndarray:
    """Read any image (gray or colour, any size) as a 48x48 gray face crop."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"cannot decode image {path}: not a JPEG/PNG/BMP/WebP file")
    return to_model_input(image)


def load_class_folders(root: Path, limit_per_class: int | None = None) -> Faces:
    """Read ``root/<class>/*.jpg``; class names are matched case-insensitively with synonyms."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory: pass a folder holding one sub-folder per class")
    images, labels, paths, unknown = [], [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = canonical(folder.name)
        if label is None:
            unknown.append(folder.name)
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files[:limit_per_class]:
            images.append(read_face(path))
            labels.append(EMOTIONS.index(label))
            paths.append(str(path))
    if unknown:
        log.warning("skipped class folders with unknown names in %s: %s", root, ", ".join(unknown))
    if not images:
        raise DatasetError(
            f"no labelled images under {root}: expected sub-folders named like {', '.join(EMOTIONS)}"
        )
    return Faces(np.stack(images), np.asarray(labels, dtype=np.int64), paths)


def _pixels(text: str) -> np.ndarray:
    values = np.asarray(text.split(), dtype=np.uint8)
    if values.size != 48 * 48:
        raise DatasetError(f"a pixels field has {values.size} values; FER2013 rows hold 2304 (48x48)")
    return values.reshape(48, 48)


def load_fer2013_csv(path: Path, usage: set[str]) -> Faces:
    """Read the original ``emotion,pixels,Usage`` CSV, keeping rows whose Usage is in ``usage``."""
    images, labels = [], []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"emotion", "pixels", "Usage"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path} lacks the FER2013 column(s) {sorted(missing)}")
        for row in reader:
            if row["Usage"] not in usage:
                continue
            images.append(_pixels(row["pixels"]))
            labels.append(EMOTIONS.index(FER2013_CODES[int(row["emotion"])]))
    if not images:
        raise DatasetError(f"{path} has no rows with Usage in {sorted(usage)}")
    return Faces(np.stack(images), np.asarray(labels, dtype=np.int64), [str(path)] * len(labels))


def load_ferplus(fer_csv: Path, votes_csv: Path, usage: set[str]) -> Faces:
    """FER+ relabelling: pixels from ``fer2013.csv``, majority vote from ``fer2013new.csv``.

    Rows whose majority is contempt/unknown/not-a-face, or that tie, are dropped.
    """
    with fer_csv.open(newline="") as handle:
        pixel_rows = [(r["Usage"], r["pixels"]) for r in csv.DictReader(handle)]
    images, labels = [], []
    with votes_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(FERPLUS_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{votes_csv} lacks the FER+ vote column(s) {sorted(missing)}")
        for (row_usage, pixels), votes in zip(pixel_rows, reader, strict=True):
            if row_usage not in usage:
                continue
            counts = [int(votes[c] or 0) for c in FERPLUS_COLUMNS]
            other = sum(int(votes.get(c) or 0) for c in ("contempt", "unknown", "NF"))
            best = max(counts)
            if best == 0 or best <= other or counts.count(best) > 1:
                continue
            images.append(_pixels(pixels))
            labels.append(EMOTIONS.index(canonical(FERPLUS_COLUMNS[counts.index(best)])))
    return Faces(np.stack(images), np.asarray(labels, dtype=np.int64), [str(votes_csv)] * len(labels))


def load_split(path: Path, split: str) -> Faces:
    """Load one split from a class-folder tree, a FER2013 CSV or a FER+ pair.

    ``path`` may be ``DATA`` (with ``DATA/<split>/<class>/``), a class folder tree itself, a
    ``fer2013.csv`` (split chosen by its Usage column), or a ``fer2013new.csv`` next to ``fer2013.csv``.
    """
    usage = {"train": {"Training"}, "val": {"PublicTest"}, "test": {"PrivateTest"}}[split]
    if path.is_file() and path.suffix == ".csv":
        if path.name == "fer2013new.csv":
            return load_ferplus(path.with_name("fer2013.csv"), path, usage)
        return load_fer2013_csv(path, usage)
    if (path / split).is_dir():
        return load_class_folders(path / split)
    if path.is_dir():
        return load_class_folders(path)
    raise DatasetError(f"{path} does not exist: pass a class-folder tree or a FER2013 CSV")


def load_cached(path: Path, split: str, cache_dir: Path) -> Faces:
    """``load_split`` with an ``.npz`` cache, so a resumed run does not decode 30k JPEGs again."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / f"{split}.npz"
    if cache.exists():
        data = np.load(cache)
        return Faces(data["images"], data["labels"], [])
    faces = load_split(path, split)
    np.savez(cache, images=faces.images, labels=faces.labels)
    return faces


@dataclass
class Clips:
    """Real face clips: frames (N, T, 48, 48) uint8 and labels (N,)."""

    frames: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_clip_folders(root: Path, window: int) -> Clips:
    """``root/<class>/<clip>/<frame images>`` (frames in name order) -> clips of ``window`` frames.

    Each clip folder holds the face crops of one learner over time (e.g. from a video dataset);
    ``window`` frames are taken evenly spaced over it, so clips of any length fit the head.
    """
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory: pass DIR/<class>/<clip>/<frames>")
    frames, labels, unknown = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = canonical(folder.name)
        if label is None:
            unknown.append(folder.name)
            continue
        for clip in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = sorted(p for p in clip.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                continue
            picks = np.linspace(0, len(files) - 1, window).round().astype(int)
            frames.append(np.stack([read_face(files[i]) for i in picks]))
            labels.append(EMOTIONS.index(label))
    if unknown:
        log.warning("skipped class folders with unknown names in %s: %s", root, ", ".join(unknown))
    if not frames:
        raise DatasetError(f"no clips under {root}: expected <class>/<clip>/<frame images>")
    return Clips(np.stack(frames), np.asarray(labels, dtype=np.int64))
