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


def undecodable(path: Path) -> DatasetError:
    """The error for an image file OpenCV cannot decode: one wording whether or not faces are detected."""
    return DatasetError(f"cannot decode image {path}: not a JPEG/PNG/BMP/WebP file")


def read_face(path: Path) -> np.ndarray:
    """Read any image (gray or colour, any size) as a 48x48 gray face crop."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise undecodable(path)
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


def parity_faces(root: Path, least: int) -> np.ndarray:
    """Up to 32 faces per class of ``root`` for a parity check, at least ``least`` of them.

    Why: the checks run the head and clip models on whole windows of these faces; with fewer than
    one window they failed deep inside NumPy (a reshape of an empty array) after the export's work.
    """
    faces = load_class_folders(root, limit_per_class=32).images
    if len(faces) < least:
        raise DatasetError(f"{root} holds {len(faces)} faces, and the parity check needs at least {least} "
                           "(one window of the model): use a folder with more faces")
    return faces


#: FER+ vote columns for which a face is not used: its majority is none of the 7 classes
FERPLUS_REJECTS = ("contempt", "unknown", "NF")


def _pixels(text: str, where: str) -> np.ndarray:
    """A FER2013 ``pixels`` field as a 48x48 uint8 face; ``where`` ("FILE row N") names it in errors."""
    try:
        values = np.asarray(text.split(), dtype=np.int64)
    except ValueError:
        raise DatasetError(f"{where}: the pixels field holds a value that is not a whole number: "
                           "fix or delete the row (FER2013 pixels are 2304 numbers 0-255)") from None
    if values.size != 48 * 48:
        raise DatasetError(f"{where}: the pixels field has {values.size} values; FER2013 rows hold 2304 (48x48): "
                           "fix or delete the row")
    if values.min() < 0 or values.max() > 255:
        raise DatasetError(f"{where}: a pixel is outside 0-255 ({values.min()} to {values.max()}): "
                           "fix or delete the row")
    return values.astype(np.uint8).reshape(48, 48)


def _emotion(text: str, where: str) -> int:
    """A FER2013 ``emotion`` code (0-6) as an index into EMOTIONS."""
    code = int(text) if text.strip().isdecimal() else -1
    if not 0 <= code < len(FER2013_CODES):
        raise DatasetError(f"{where}: emotion {text!r} is not a FER2013 code 0-6 "
                           f"({', '.join(FER2013_CODES)}): fix or delete the row")
    return EMOTIONS.index(FER2013_CODES[code])


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
            where = f"{path} row {reader.line_num}"
            labels.append(_emotion(row["emotion"], where))
            images.append(_pixels(row["pixels"], where))
    if not images:
        raise DatasetError(f"{path} has no rows with Usage in {sorted(usage)}")
    return Faces(np.stack(images), np.asarray(labels, dtype=np.int64), [str(path)] * len(labels))


def _ferplus_label(votes: dict, where: str) -> int | None:
    """The class of one FER+ row: the most-voted of all 10 columns, or None when that is
    contempt/unknown/not-a-face, a tie, or no vote at all."""
    columns = FERPLUS_COLUMNS + FERPLUS_REJECTS
    try:
        counts = [int(votes.get(c) or 0) for c in columns]
    except ValueError:
        raise DatasetError(f"{where}: a vote count is not a whole number: fix or delete the row") from None
    best = max(counts)
    if best == 0 or counts.count(best) > 1 or counts.index(best) >= len(FERPLUS_COLUMNS):
        return None
    return EMOTIONS.index(canonical(FERPLUS_COLUMNS[counts.index(best)]))


def load_ferplus(fer_csv: Path, votes_csv: Path, usage: set[str]) -> Faces:
    """FER+ relabelling: pixels from ``fer2013.csv``, majority vote from ``fer2013new.csv``.

    Rows whose majority is contempt/unknown/not-a-face, or that tie, are dropped.
    """
    if not fer_csv.is_file():
        raise DatasetError(f"{fer_csv} does not exist: FER+ votes ({votes_csv.name}) take their pixels from "
                           "the original fer2013.csv; put it next to them")
    with fer_csv.open(newline="") as handle:
        pixel_rows = [(r["Usage"], r["pixels"]) for r in csv.DictReader(handle)]
    with votes_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(FERPLUS_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{votes_csv} lacks the FER+ vote column(s) {sorted(missing)}")
        vote_rows = list(reader)
    if len(vote_rows) != len(pixel_rows):
        raise DatasetError(f"{votes_csv} has {len(vote_rows)} rows but {fer_csv} has {len(pixel_rows)}: "
                           "FER+ votes go row by row with fer2013.csv; use the two files as published")
    images, labels = [], []
    for n, ((row_usage, pixels), votes) in enumerate(zip(pixel_rows, vote_rows, strict=True), start=2):
        label = _ferplus_label(votes, f"{votes_csv} row {n}") if row_usage in usage else None
        if label is not None:
            images.append(_pixels(pixels, f"{fer_csv} row {n}"))
            labels.append(label)
    if not images:
        raise DatasetError(f"{votes_csv} has no row with Usage in {sorted(usage)} and a clear FER+ majority for "
                           "one of the 7 classes: check that it is the FER+ fer2013new.csv")
    return Faces(np.stack(images), np.asarray(labels, dtype=np.int64), [str(votes_csv)] * len(labels))


def _ferplus_pixels(votes_csv: Path) -> Path:
    """FER+ votes take their pixels from the original ``fer2013.csv`` next to them."""
    return votes_csv.with_name("fer2013.csv")


def split_source(path: Path, split: str) -> Path:
    """The file or folder :func:`load_split` reads ``split`` from (see there)."""
    if path.is_file() and path.suffix == ".csv":
        return path
    if (path / split).is_dir():
        return path / split
    if path.is_dir():
        return path
    if path.exists():
        raise DatasetError(f"{path} is neither a folder nor a .csv file: pass a class-folder tree or a FER2013 CSV")
    raise DatasetError(f"{path} does not exist: pass a class-folder tree or a FER2013 CSV")


def load_split(path: Path, split: str) -> Faces:
    """Load one split from a class-folder tree, a FER2013 CSV or a FER+ pair.

    ``path`` may be ``DATA`` (with ``DATA/<split>/<class>/``), a class folder tree itself, a
    ``fer2013.csv`` (split chosen by its Usage column), or a ``fer2013new.csv`` next to ``fer2013.csv``.
    """
    usage = {"train": {"Training"}, "val": {"PublicTest"}, "test": {"PrivateTest"}}[split]
    source = split_source(path, split)
    if source.is_dir():
        return load_class_folders(source)
    if source.name == "fer2013new.csv":
        return load_ferplus(_ferplus_pixels(source), source, usage)
    return load_fer2013_csv(source, usage)


def source_stamp(path: Path, split: str) -> str:
    """What ``split`` is read from: resolved path, file count and latest change of its files.

    A cached split is stale when it differs: another ``--data``, or faces added, removed or replaced.
    """
    source = split_source(path, split)
    if source.is_dir():
        files = [p for p in source.rglob("*") if p.is_file()]
    else:
        files = [p for p in (source, _ferplus_pixels(source)) if p.is_file()]
    latest = max((p.stat().st_mtime_ns for p in files), default=0)
    return f"{source.resolve()} ({len(files)} files, latest change {latest} ns)"


def load_cached(path: Path, split: str, cache_dir: Path) -> Faces:
    """``load_split`` with an ``.npz`` cache, so a resumed run does not decode 30k JPEGs again.

    The cache records :func:`source_stamp` and is rebuilt when the data differs from it.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / f"{split}.npz"
    stamp = source_stamp(path, split)
    if cache.exists():
        with np.load(cache) as data:
            recorded = str(data["source"]) if "source" in data.files else "data it did not record"
            if recorded == stamp:
                return Faces(data["images"], data["labels"], [])
        log.info("the cached %s faces in %s came from %s; reading %s", split, cache, recorded, stamp)
    faces = load_split(path, split)
    np.savez(cache, images=faces.images, labels=faces.labels, source=np.asarray(stamp))
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
