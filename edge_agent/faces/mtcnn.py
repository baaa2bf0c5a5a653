"""MTCNN face detection in numpy/OpenCV over ONNX Runtime or TensorRT: no TensorFlow on the edge.

The three nets are the ``mtcnn`` pip package's own, exported by ``model_export.mtcnn_export``; the
cascade around them follows that package (1.0) step by step so the edge finds the same faces and
landmarks the reference does (tests/test_mtcnn.py checks it):

1. P-Net slides over an image pyramid; cells scoring > ``thresholds[0]`` become boxes (regression
   applied at once), suppressed per level (IoU 0.5) and across levels (IoU 0.7), then squared.
2. R-Net scores 24x24 crops of those boxes (batched), refines them, IoU-0.7 suppression, squared.
3. O-Net scores 48x48 crops, refines boxes, places the 5 landmarks, suppression by
   intersection-over-smaller-box 0.7.

``Face.landmarks`` is what :func:`edge_agent.faces.align.align_face` takes.

Where this differs from the package, on purpose:

* the pyramid stops at the last level >= 12 px; the package counts levels from the image size alone,
  so any ``min_face_size`` above 20 feeds P-Net a level smaller than its 12 px window and it returns
  no faces at all;
* crops are bilinear samples taken with ``cv2.warpAffine`` from the uint8 frame at exactly the
  positions ``tf.image.crop_and_resize`` samples (values differ by the uint8 rounding only);
* speed: crops go to R-Net/O-Net in batches (:data:`MAX_BATCH`), suppression is one matrix
  expression, the normalised frame and the crop buffers are reused from frame to frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_agent.inference import Session, open_session, run_in_batches

#: P-Net sees 12x12 windows with stride 2 (its receptive field and its pooling).
CELL, STRIDE = 12, 2
#: IoU thresholds of the package: P-Net within a level, P-Net across levels, R-Net, O-Net (by min area).
NMS_LEVEL, NMS_PYRAMID, NMS_RNET, NMS_ONET = 0.5, 0.7, 0.7, 0.7
#: Largest R-Net/O-Net batch per call: the default max batch of TensorRT engines built by
#: ``model_export build`` (``--max-batch 32``); more crops go in several calls.
MAX_BATCH = 32
#: Crop pixels outside the frame: the package pads with 0 after (x - 127.5) / 128; uint8 rounds to 128.
BORDER = 127.5


@dataclass
class Face:
    """One detected face in frame pixels.

    ``landmarks`` rows: left eye, right eye, nose, mouth left, mouth right ("left" = image left,
    the naming of the ``mtcnn`` package's keypoints and of :data:`edge_agent.faces.align.TEMPLATE`).
    """

    box: np.ndarray  # float32[4]: x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # float32[5, 2]: (x, y)


def sort_by_score(boxes: np.ndarray) -> np.ndarray:
    """Rows of ``[x1, y1, x2, y2, score, ...]`` by descending score (ties broken like the package)."""
    return boxes[np.argsort(boxes[:, 4])[::-1]]


def suppress(boxes: np.ndarray, threshold: float, by_min_area: bool = False) -> np.ndarray:
    """Indices of score-sorted ``boxes`` that survive the package's non-maximum suppression.

    A box is dropped when *any* higher-scored box overlaps it by more than ``threshold``, even one
    that was itself dropped ("fast NMS"). That is what the ``mtcnn`` package does, and unlike greedy
    NMS it is a single matrix expression. Overlap is IoU, or intersection over the smaller box.
    """
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1) * (y2 - y1)
    width = np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None])
    height = np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None])
    inter = np.maximum(width, 0) * np.maximum(height, 0)
    pair_area = np.minimum(area[:, None], area[None]) if by_min_area else area[:, None] + area[None] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        overlapped = np.triu(inter / pair_area > threshold, k=1)  # row i outranks column j when i < j
    return np.flatnonzero(~overlapped.any(axis=0))


def to_square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box's shorter side to its longer one around the same centre (in place)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += (w - side) / 2
    boxes[:, 1] += (h - side) / 2
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def refine(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply R-Net/O-Net box regression (offsets in units of box size, the package's +1 convention)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] += offsets * np.stack([w, h, w, h], axis=1)
    return boxes


def pyramid_scales(height: int, width: int, min_face_size: int, scale_factor: float) -> list[float]:
    """Scales at which a ``min_face_size`` face and every larger one fills P-Net's 12 px window."""
    scales, scale = [], CELL / min_face_size
    while min(height, width) * scale >= CELL:
        scales.append(scale)
        scale *= scale_factor
    return scales


def run_batched(session: Session, batch: np.ndarray) -> list[np.ndarray]:
    """``session.run`` over ``batch`` in runs of at most :data:`MAX_BATCH`."""
    return run_in_batches(session.run, {session.input_names[0]: batch}, MAX_BATCH)


class FaceDetector:
    """The MTCNN cascade; one instance per thread (it reuses its buffers between frames)."""

    def __init__(self, model_dir: Path, backend: str = "auto", min_face_size: int = 40,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), scale_factor: float = 0.709,
                 threads: int | None = None):
        if min_face_size < CELL:
            raise ValueError(f"min_face_size={min_face_size} is below MTCNN's {CELL} px window: use >= {CELL}")
        if not 0 < scale_factor < 1:
            raise ValueError(f"scale_factor={scale_factor} must lie in (0, 1), e.g. 0.709")
        if len(thresholds) != 3 or not all(0 <= t < 1 for t in thresholds):
            raise ValueError(f"thresholds={thresholds!r}: give three scores in [0, 1) for P-, R- and O-Net")
        self.min_face_size, self.scale_factor = min_face_size, scale_factor
        self.thresholds = tuple(float(t) for t in thresholds)
        model_dir = Path(model_dir)
        self._pnet, self._rnet, self._onet = (
            open_session(model_dir / f"{name}.onnx", backend, threads) for name in ("pnet", "rnet", "onet")
        )
        self.backend = self._pnet.backend
        self._frame = np.empty((0, 0, 3), np.float32)  # the normalised frame, reused while sizes repeat
        self._crops: dict[int, np.ndarray] = {}  # crop size -> uint8 (n, size, size, 3), grown on demand

    def detect(self, frame_bgr: np.ndarray, max_faces: int | None = None) -> list[Face]:
        """Faces in a BGR (or gray/BGRA) uint8 frame, best score first, at most ``max_faces``."""
        image = self._to_rgb(frame_bgr)
        boxes = self._propose(image)
        if len(boxes):
            boxes = self._refine(image, boxes)
        if not len(boxes):
            return []
        boxes, landmarks = self._output(image, boxes)
        height, width = image.shape[:2]
        np.clip(boxes[:, 0:4:2], 0, width - 1, out=boxes[:, 0:4:2])
        np.clip(boxes[:, 1:4:2], 0, height - 1, out=boxes[:, 1:4:2])
        return [
            Face(box=boxes[i, :4].astype(np.float32), score=float(boxes[i, 4]), landmarks=landmarks[i])
            for i in range(len(boxes) if max_faces is None else min(max_faces, len(boxes)))
        ]

    @staticmethod
    def _to_rgb(frame: np.ndarray) -> np.ndarray:
        if frame.dtype != np.uint8:
            raise ValueError(f"frame has dtype {frame.dtype}; pass an 8-bit image as OpenCV reads it")
        if frame.ndim == 2:
            return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        if frame.ndim == 3 and frame.shape[2] in (3, 4):
            return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB if frame.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
        raise ValueError(f"frame has shape {frame.shape}; pass HxW gray, HxWx3 BGR or HxWx4 BGRA")

    def _propose(self, image: np.ndarray) -> np.ndarray:
        """Stage 1: squared P-Net boxes ``(n, 5)`` [x1, y1, x2, y2, score] in frame pixels."""
        name = self._pnet.input_names[0]
        found = []
        for scale, level in self._pyramid(image):
            offsets, scores = self._pnet.run({name: level[None]})
            ys, xs = np.nonzero(scores[0, :, :, 1] > self.thresholds[0])
            if not len(ys):
                continue
            # the package's cell spans pixels [2x + 1, 2x + 12] and scales offsets by that 11 px width
            corners = np.stack([xs, ys, xs, ys], axis=1).astype(np.float32) * STRIDE
            corners[:, :2] += 1
            corners[:, 2:] += CELL
            boxes = np.empty((len(ys), 5), np.float32)
            boxes[:, :4] = (corners + offsets[0, ys, xs] * (CELL - 1)) / scale
            boxes[:, 4] = scores[0, ys, xs, 1]
            boxes = sort_by_score(boxes)
            found.append(boxes[suppress(boxes, NMS_LEVEL)])
        if not found:
            return np.empty((0, 5), np.float32)
        boxes = sort_by_score(np.concatenate(found))
        return to_square(boxes[suppress(boxes, NMS_PYRAMID)])

    def _pyramid(self, image: np.ndarray) -> Iterator[tuple[float, np.ndarray]]:
        """(scale, normalised level) pairs, largest first.

        Every level is area-resampled from the whole normalised frame, as the package does with
        TF's AREA resize (OpenCV's INTER_AREA computes the same weights); ``int()`` truncates sizes
        like the package. Cheaper sources were tried and rejected: resampling from the previous
        level, or from a frame box-averaged by 2/4/8, moves level values by only ~0.001 on average,
        yet the cascade amplifies that into different faces on some frames.
        """
        height, width = image.shape[:2]
        if self._frame.shape != image.shape:
            self._frame = np.empty(image.shape, np.float32)
        normalised = normalise(image, out=self._frame)
        for scale in pyramid_scales(height, width, self.min_face_size, self.scale_factor):
            size = (int(width * scale), int(height * scale))
            yield scale, cv2.resize(normalised, size, interpolation=cv2.INTER_AREA)

    def _refine(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2: R-Net keeps, re-scores and refines the proposals; returns them squared."""
        offsets, scores = run_batched(self._rnet, self._crop(image, boxes, 24))
        boxes = refine(boxes, offsets)
        boxes[:, 4] = scores[:, 1]
        boxes = sort_by_score(boxes[boxes[:, 4] > self.thresholds[1]])
        return to_square(boxes[suppress(boxes, NMS_RNET)])

    def _output(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 3: O-Net's final boxes ``(n, 5)`` and landmarks ``(n, 5, 2)``, best first."""
        offsets, points, scores = run_batched(self._onet, self._crop(image, boxes, 48))
        size = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], axis=1)
        # O-Net gives x1..x5 then y1..y5 relative to the box; the package offsets them by -1 px
        landmarks = points.reshape(-1, 2, 5).transpose(0, 2, 1) * size[:, None] + boxes[:, None, :2] - 1
        boxes = refine(boxes, offsets)
        boxes[:, 4] = scores[:, 1]
        order = np.argsort(boxes[:, 4])[::-1]
        order = order[boxes[order, 4] > self.thresholds[2]]
        boxes, landmarks = boxes[order], landmarks[order]
        keep = suppress(boxes, NMS_ONET, by_min_area=True)
        return boxes[keep], landmarks[keep].astype(np.float32)

    def _crop(self, image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
        """Normalised ``(n, size, size, 3)`` crops sampled where ``tf.image.crop_and_resize`` samples.

        The package normalises box corners by the image size and crop_and_resize maps them back
        with ``(dim - 1)``, so output pixel ``i`` reads source ``(dim - 1) / dim * (x1 + i * (x2 - x1) / (size - 1))``.
        """
        buffer = self._crops.get(size)
        if buffer is None or len(buffer) < len(boxes):
            buffer = self._crops[size] = np.empty((max(len(boxes), 64), size, size, 3), np.uint8)
        height, width = image.shape[:2]
        shrink = np.array([(width - 1) / width, (height - 1) / height], np.float64)
        corners = boxes[:, :4].astype(np.float64).reshape(-1, 2, 2) * shrink  # (n, [x1y1, x2y2], xy)
        steps = (corners[:, 1] - corners[:, 0]) / (size - 1)
        matrix = np.zeros((2, 3), np.float64)
        for i in range(len(boxes)):
            matrix[0, 0], matrix[1, 1] = steps[i]
            matrix[:, 2] = corners[i, 0]
            cv2.warpAffine(image, matrix, (size, size), dst=buffer[i],
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=(BORDER, BORDER, BORDER))
        return normalise(buffer[:len(boxes)])


def normalise(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB -> float32 in MTCNN's input range, ``(x - 127.5) / 128`` (into ``out`` if given)."""
    out = np.subtract(pixels, np.float32(127.5), out=out, dtype=np.float32)
    out *= np.float32(1 / 128)
    return out
