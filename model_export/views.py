"""Test-time views of a face: its mirror image and small rotations, in NumPy and as ONNX nodes.

Why: an encoder's embedding of a face changes with the face's pose in the crop, and the mean of
its embeddings over a few views makes fewer mistakes than any one (MODEL_CARD.md, "more test-time
views than the mirror": the ±8° rotations of the face and its mirror gained 0.4–0.7 points on
three releases, at three times the encoder passes). :mod:`model_export.ensemble` builds the views
into the fused encoder, so the edge runs them without knowing.

A rotation is a fixed bilinear warp about the crop's centre with the border reflected as OpenCV's
``BORDER_REFLECT_101`` does: four taps per output pixel. In ONNX that is a ``Gather`` of the
taps and a weighted sum (a few kB of constants, plain ops that ONNX Runtime and TensorRT run at
opset 13 and later, which ``model_export export`` requires), and :func:`rotate` is the same
arithmetic in NumPy, which the parity check compares the fused graph against.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from edge_agent.faces.align import SIZE

INT64_MIN = -(2**63)


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
    return (np.stack(index, -1).reshape(-1, 4), np.stack(weight, -1).reshape(-1, 4).astype(np.float32))


def rotate(faces: np.ndarray, degrees: float) -> np.ndarray:
    """``(N, H, W[, 1])`` float faces rotated by ``degrees``: the arithmetic the ONNX nodes do."""
    index, weight = taps(degrees, faces.shape[1])
    flat = faces.reshape(len(faces), -1)
    return (flat[:, index] * weight).sum(-1, dtype=np.float32).reshape(faces.shape)


def mirror(faces: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(faces[:, :, ::-1])


def all_views(faces: np.ndarray, mirrored: bool, rotations: tuple[float, ...]) -> list[np.ndarray]:
    """The views in the fused encoder's order: the face (and its mirror), then each rotation of those."""
    base = [faces, mirror(faces)] if mirrored else [faces]
    return base + [rotate(view, angle) for angle in rotations for view in base]


def describe(mirrored: bool, rotations: tuple[float, ...]) -> str:
    """The manifest's ``test_time_augmentation``: what each member's embedding is the mean of."""
    if not mirrored and not rotations:
        return "none"
    base = "the face and its mirror image" if mirrored else "the face"
    if not rotations:
        return f"each member: mean of {base}"
    return f"each member: mean of {base}, as is and rotated by {', '.join(f'{a:+g}°' for a in rotations)}"


def nodes(feed: str, mirrored: bool, rotations: tuple[float, ...]) -> tuple[list, list, str, int]:
    """ONNX nodes turning ``feed`` (N, S, S, 1) into all views stacked on the batch axis (V*N, S, S, 1),
    in :func:`all_views`' order. Returns (nodes, initializers, output name, V)."""
    made, weights = [], []
    base = [feed]
    if mirrored:
        weights += [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
                    (("mirror_starts", [-1]), ("mirror_ends", [INT64_MIN]), ("mirror_axes", [2]),
                     ("mirror_steps", [-1]))]
        made.append(helper.make_node("Slice", [feed, "mirror_starts", "mirror_ends", "mirror_axes", "mirror_steps"],
                                     [f"{feed}_mirror"], name="mirror"))
        base.append(f"{feed}_mirror")
    views = list(base)
    if rotations:
        weights += [numpy_helper.from_array(np.array([-1, SIZE * SIZE], np.int64), "views_flat"),
                    numpy_helper.from_array(np.array([-1, SIZE, SIZE, 1], np.int64), "views_face"),
                    numpy_helper.from_array(np.array([2], np.int64), "views_tap_axis")]
    for angle in rotations:
        tag = f"rotate{angle:+g}".replace("+", "p").replace("-", "m").replace(".", "_")
        index, weight = taps(angle)
        weights += [numpy_helper.from_array(index, f"{tag}_index"), numpy_helper.from_array(weight, f"{tag}_weight")]
        for view in base:
            out = f"{view}_{tag}"
            made += [
                helper.make_node("Reshape", [view, "views_flat"], [f"{out}_flat"]),
                helper.make_node("Gather", [f"{out}_flat", f"{tag}_index"], [f"{out}_taps"], axis=1),
                helper.make_node("Mul", [f"{out}_taps", f"{tag}_weight"], [f"{out}_weighted"]),
                helper.make_node("ReduceSum", [f"{out}_weighted", "views_tap_axis"], [f"{out}_sum"], keepdims=0),
                helper.make_node("Reshape", [f"{out}_sum", "views_face"], [out]),
            ]
            views.append(out)
    if len(views) == 1:
        return made, weights, feed, 1
    made.append(helper.make_node("Concat", views, ["face_views"], axis=0, name="all_views"))
    return made, weights, "face_views", len(views)
