"""Views of an aligned face: its mirror image and small rotations, in NumPy.

Why: an encoder's embedding of a face changes with the face's pose in the crop, and a model that
sees a face through a few views makes fewer mistakes than one that sees it once (MODEL_CARD.md,
"more test-time views than the mirror"). A model can take its views two ways:

* averaged per frame, built into ``encoder.onnx`` (``model_export ensemble --rotate``): every
  view of every frame through the encoder, several passes per frame;
* spread over the window (the manifest's ``view_cycle``): frame t of a track is seen through view
  ``t mod V`` only, so a window of T frames holds every view at one encoder pass per frame, and
  the BiLSTM head, trained on windows like that, does the averaging.

A rotation is a fixed bilinear warp about the crop's centre with the border reflected as OpenCV's
``BORDER_REFLECT_101`` does: four taps per output pixel, which :mod:`model_export.views` also
writes as ONNX nodes, so the edge, the offline tools and the graphs compute the same views.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edge_agent.faces.align import SIZE


@lru_cache(maxsize=16)
def taps(degrees: float, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """For a rotation by ``degrees`` (counter-clockwise, about the centre), each output pixel's four
    source pixels (flat indices, ``(size*size, 4)`` int64) and their bilinear weights (float32)."""
    angle = np.deg2rad(degrees)
    centre = (size - 1) / 2
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    # the inverse map: where in the source each output pixel comes from
    dx, dy = xs - centre, ys - centre
    sx = np.cos(angle) * dx - np.sin(angle) * dy + centre
    sy = np.sin(angle) * dx + np.cos(angle) * dy + centre
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0

    def reflect(i: np.ndarray) -> np.ndarray:  # BORDER_REFLECT_101: -1 -> 1, size -> size - 2
        i = np.abs(i)
        return np.where(i > size - 1, 2 * (size - 1) - i, i).astype(np.int64)

    index = [reflect(y0 + oy) * size + reflect(x0 + ox) for oy, ox in ((0, 0), (0, 1), (1, 0), (1, 1))]
    weight = [(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]
    index_table = np.stack(index, -1).reshape(-1, 4)
    weight_table = np.stack(weight, -1).reshape(-1, 4).astype(np.float32)
    index_table.flags.writeable = weight_table.flags.writeable = False  # shared by every caller
    return index_table, weight_table


def rotate(faces: np.ndarray, degrees: float) -> np.ndarray:
    """``(N, H, W[, 1])`` float faces rotated by ``degrees``: the arithmetic the ONNX nodes do."""
    index, weight = taps(degrees, faces.shape[1])
    flat = faces.reshape(len(faces), -1)
    return (flat[:, index] * weight).sum(-1, dtype=np.float32).reshape(faces.shape)


def mirror(faces: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(faces[:, :, ::-1])


@dataclass(frozen=True)
class View:
    """The face, mirrored or not, then rotated by ``rotate`` degrees (counter-clockwise)."""

    mirror: bool = False
    rotate: float = 0.0

    @classmethod
    def from_manifest(cls, entry: dict) -> View:
        return cls(bool(entry["mirror"]), float(entry["rotate"]))

    def to_manifest(self) -> dict:
        return {"mirror": self.mirror, "rotate": self.rotate}

    def apply(self, faces: np.ndarray) -> np.ndarray:
        """``(N, H, W[, 1])`` float faces seen through this view."""
        seen = mirror(faces) if self.mirror else faces
        return rotate(seen, self.rotate) if self.rotate else seen

    def __str__(self) -> str:
        angle = f"rotated {self.rotate:+g}°" if self.rotate else ""
        return " ".join(filter(None, ["the mirror image" if self.mirror else "the face", angle]))


def view_set(mirrored: bool, rotations: tuple[float, ...]) -> tuple[View, ...]:
    """The face (and its mirror), then each rotation of those: the order every tool uses."""
    base = [View(), View(mirror=True)] if mirrored else [View()]
    return tuple(base + [View(v.mirror, angle) for angle in rotations for v in base])


def through(faces: np.ndarray, views: tuple[View, ...], which: np.ndarray) -> np.ndarray:
    """``(N, H, W, 1)`` float faces, face i seen through ``views[which[i]]`` (one warp per view used)."""
    out = np.empty_like(faces)
    for k in np.unique(which):
        chosen = which == k
        out[chosen] = views[k].apply(faces[chosen])
    return out
