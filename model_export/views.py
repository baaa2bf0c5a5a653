"""Test-time views of a face as ONNX nodes, and how a manifest describes them.

The views themselves (the mirror image, rotations, :class:`~edge_agent.faces.views.View`) live in
:mod:`edge_agent.faces.views`, the NumPy the edge runs; here they become graph nodes with the same
arithmetic. A rotation is a ``Gather`` of four taps per pixel and a weighted sum (a few kB of
constants, plain ops that ONNX Runtime and TensorRT run at opset 13 and later, which ``model_export
export`` requires). :mod:`model_export.ensemble` builds them into the fused encoder (views averaged
per frame, ``--rotate``) or into ``clip.onnx`` (views spread over the window, ``--cycle``).
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from edge_agent.faces.align import SIZE
from edge_agent.faces.views import View, taps, view_set

INT64_MIN = -(2**63)


def all_views(faces: np.ndarray, mirrored: bool, rotations: tuple[float, ...]) -> list[np.ndarray]:
    """The views in the fused encoder's order: the face (and its mirror), then each rotation of those."""
    return [view.apply(faces) for view in view_set(mirrored, rotations)]


def describe(mirrored: bool, rotations: tuple[float, ...]) -> str:
    """The manifest's ``test_time_augmentation``: what each member's embedding is the mean of."""
    if not mirrored and not rotations:
        return "none"
    base = "the face and its mirror image" if mirrored else "the face"
    if not rotations:
        return f"each member: mean of {base}"
    return f"each member: mean of {base}, as is and rotated by {', '.join(f'{a:+g}°' for a in rotations)}"


def describe_cycle(cycle: tuple[View, ...]) -> str:
    """The manifest's ``test_time_augmentation`` for views spread over the window."""
    return (f"one view per frame, in turn along each track ({len(cycle)}: "
            f"{', '.join(str(view) for view in cycle)}); the head sees them all in a window")


class _Builder:
    """Nodes and constants for views of graph tensors; each constant and each mirror image is added
    once, each node named after the tensor it reads, so several views of several tensors share one
    graph (the face's mirror and its rotations share one ``Slice``)."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.weights: dict[str, object] = {}
        self._mirrored: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self.weights:
            self.weights[name] = numpy_helper.from_array(array, name)
        return name

    def mirror(self, feed: str) -> str:
        """(N, S, S, 1) -> its left-right mirror image."""
        args = [self.const(f"mirror_{name}", np.array(v, np.int64)) for name, v in
                (("starts", [-1]), ("ends", [INT64_MIN]), ("axes", [2]), ("steps", [-1]))]
        out = f"{feed}_mirror"
        if out not in self._mirrored:
            self._mirrored.add(out)
            self.nodes.append(helper.make_node("Slice", [feed, *args], [out], name=out))
        return out

    def rotate(self, feed: str, angle: float) -> str:
        """(N, S, S, 1) -> rotated by ``angle`` degrees: four taps per pixel, weighted and summed."""
        tag = f"rotate{angle:+g}".replace("+", "p").replace("-", "m").replace(".", "_")
        index, weight = taps(angle)
        flat = self.const("views_flat", np.array([-1, SIZE * SIZE], np.int64))
        face = self.const("views_face", np.array([-1, SIZE, SIZE, 1], np.int64))
        axis = self.const("views_tap_axis", np.array([2], np.int64))
        index_name, weight_name = self.const(f"{tag}_index", index), self.const(f"{tag}_weight", weight)
        out = f"{feed}_{tag}"
        self.nodes += [
            helper.make_node("Reshape", [feed, flat], [f"{out}_flat"]),
            helper.make_node("Gather", [f"{out}_flat", index_name], [f"{out}_taps"], axis=1),
            helper.make_node("Mul", [f"{out}_taps", weight_name], [f"{out}_weighted"]),
            helper.make_node("ReduceSum", [f"{out}_weighted", axis], [f"{out}_sum"], keepdims=0),
            helper.make_node("Reshape", [f"{out}_sum", face], [out]),
        ]
        return out

    def view(self, feed: str, view: View) -> str:
        seen = self.mirror(feed) if view.mirror else feed
        return self.rotate(seen, view.rotate) if view.rotate else seen


def nodes(feed: str, mirrored: bool, rotations: tuple[float, ...]) -> tuple[list, list, str, int]:
    """ONNX nodes turning ``feed`` (N, S, S, 1) into all views stacked on the batch axis (V*N, S, S, 1),
    in :func:`all_views`' order. Returns (nodes, initializers, output name, V)."""
    build = _Builder()
    views = [build.view(feed, view) for view in view_set(mirrored, rotations)]
    if len(views) == 1:
        return build.nodes, list(build.weights.values()), feed, 1
    build.nodes.append(helper.make_node("Concat", views, ["face_views"], axis=0, name="all_views"))
    return build.nodes, list(build.weights.values()), "face_views", len(views)


def cycle_nodes(feed: str, cycle: tuple[View, ...], window: int) -> tuple[list, list, str]:
    """ONNX nodes turning a clip ``feed`` (N, T, S, S, 1) into its frames (N*T, S, S, 1), frame t
    seen through ``cycle[t mod V]``, as the edge sees a track's frames. Returns (nodes,
    initializers, output name)."""
    build = _Builder()
    frames = [f"{feed}_t{t}" for t in range(window)]
    # the sizes as an input: Split takes them so from opset 13, and from 18 needs them (or num_outputs)
    sizes = build.const("views_split_frames", np.ones(window, np.int64))
    build.nodes.append(helper.make_node("Split", [feed, sizes], [f"{name}_5d" for name in frames], axis=1))
    face = build.const("views_face", np.array([-1, SIZE, SIZE, 1], np.int64))
    one_frame = build.const("views_one_frame", np.array([-1, 1, SIZE, SIZE, 1], np.int64))
    all_frames = build.const("views_all_frames", np.array([-1, SIZE, SIZE, 1], np.int64))
    seen = []
    for t, name in enumerate(frames):
        build.nodes.append(helper.make_node("Reshape", [f"{name}_5d", face], [name]))
        out = build.view(name, cycle[t % len(cycle)])
        build.nodes.append(helper.make_node("Reshape", [out, one_frame], [f"{name}_seen"]))
        seen.append(f"{name}_seen")
    build.nodes += [helper.make_node("Concat", seen, [f"{feed}_seen"], axis=1),
                    helper.make_node("Reshape", [f"{feed}_seen", all_frames], [f"{feed}_frames"])]
    return build.nodes, list(build.weights.values()), f"{feed}_frames"
