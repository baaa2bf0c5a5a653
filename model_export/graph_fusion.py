"""Rewrite an exported encoder's LayerNorms and GELUs into forms ONNX Runtime runs as one kernel each.

Why: tf2onnx lowers Keras 3's ``LayerNormalization`` into the moments arithmetic TensorFlow runs
(mean, squared difference, variance, ``Sqrt``, ``Reciprocal``, scale and shift: 13 nodes), and the
exact GELU into ``0.5·x·erfc(-x/√2)``, which :mod:`model_export.onnx_export` has to spell
``1 - Erf(-x/√2)``. ONNX Runtime recognises neither, so each ViT block runs about 30 small
elementwise kernels where three fused ones would do, and on a 2-core CPU those took about 30 % of the encoder's
time. ONNX Runtime's own transformer optimizer matches none of these patterns. This pass rewrites

* each LayerNorm into the ONNX ``LayerNormalization`` operator (opset 17), and
* each GELU into ``x·0.5·(1 + Erf(x / √2))``, the form ONNX Runtime's ``GeluFusion`` turns into
  its ``Gelu`` kernel when it loads the model.

Both rewrites are exact in real arithmetic (``erfc(-u) = 1 + erf(u)``) and differ from the graph
they replace by float rounding only; callers check parity on real faces. Names of weights are
kept, so :mod:`model_export.warm_start` still finds a LayerNorm's scale and shift, and a graph that
has already been rewritten is left as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

SQRT_HALF = 1 / np.sqrt(2)
ROOT_TWO = "gelu_sqrt2"  # one shared constant, outside any Keras layer's scope (see warm_start)


class _Graph:
    """Producer and consumer lookups over one ONNX graph, and its constant initializers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.weights = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def made_by(self, name: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def sole_consumer(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def scalar(self, name: str) -> float | None:
        tensor = self.weights.get(name)
        if tensor is None:
            return None
        value = numpy_helper.to_array(tensor)
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    @staticmethod
    def other(node: onnx.NodeProto, name: str) -> str:
        """The input of a two-input ``node`` that is not ``name``."""
        return node.input[1] if node.input[0] == name else node.input[0]


def _layer_norm(g: _Graph, reciprocal: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """Match tf2onnx's LayerNorm around its ``Reciprocal`` (of ``Sqrt(variance + eps)``):

    ``mean = GAP(x); d = x - mean; var = GAP(d·d); r = 1/Sqrt(var + eps); k = r·gamma;
    y = x·k + (beta + (-mean)·k)``. Returns (the nodes it replaces, the ``LayerNormalization``).
    """
    sqrt = g.made_by(reciprocal.input[0], "Sqrt")
    add_eps = sqrt and g.made_by(sqrt.input[0], "Add")
    if not add_eps:
        return None
    eps_name = next((name for name in add_eps.input if name in g.weights), None)
    variance = eps_name and g.made_by(g.other(add_eps, eps_name), "GlobalAveragePool")
    square = variance and g.made_by(variance.input[0], "Mul")
    diff = square and square.input[0] == square.input[1] and g.made_by(square.input[0], "Sub")
    mean = diff and g.made_by(diff.input[1], "GlobalAveragePool")
    if not mean or mean.input[0] != diff.input[0]:
        return None
    x = diff.input[0]
    scale = g.sole_consumer(reciprocal.output[0], "Mul")
    gamma = scale and g.other(scale, reciprocal.output[0])
    users = g.consumers.get(scale.output[0], []) if scale else []
    if gamma not in g.weights or len(users) != 2:
        return None
    scaled_x = next((n for n in users if n.op_type == "Mul" and x in n.input), None)
    scaled_mean = next((n for n in users if n is not scaled_x and n.op_type == "Mul"), None)
    negated = scaled_mean and g.made_by(g.other(scaled_mean, scale.output[0]), "Neg")
    shift = scaled_mean and g.sole_consumer(scaled_mean.output[0], "Add")
    beta = shift and g.other(shift, scaled_mean.output[0])
    out = scaled_x and g.sole_consumer(scaled_x.output[0], "Add")
    if not (negated and negated.input[0] == mean.output[0] and beta in g.weights and out
            and shift.output[0] in out.input):
        return None
    for name in (gamma, beta):  # LayerNormalization takes (C,) where the moments graph broadcast (1, C)
        flat = numpy_helper.to_array(g.weights[name]).reshape(-1)
        g.weights[name].CopyFrom(numpy_helper.from_array(flat, name))
    fused = helper.make_node("LayerNormalization", [x, gamma, beta], [out.output[0]], axis=-1,
                             epsilon=g.scalar(eps_name), name=f"{out.name or out.output[0]}/layer_norm")
    return [mean, diff, square, variance, add_eps, sqrt, reciprocal, scale, scaled_x, negated, scaled_mean,
            shift, out], fused


def _gelu(g: _Graph, erf: onnx.NodeProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]] | None:
    """Match ``1 - Erf(Neg(x)·(1/√2))`` (Transposes may sit between) and return node swaps that
    make it ``1 + Erf(x / √2)``: the ``Neg``/``Mul`` pair becomes one ``Div``, the ``Sub`` an ``Add``."""
    one_minus = g.sole_consumer(erf.output[0], "Sub")
    if not one_minus or one_minus.input[1] != erf.output[0] or g.scalar(one_minus.input[0]) != 1.0:
        return None
    name = erf.input[0]
    while (node := g.made_by(name, "Transpose")) is not None:
        name = node.input[0]
        if len(g.consumers[node.output[0]]) != 1:
            return None
    times = g.made_by(name, "Mul")
    negated = times and next(filter(None, (g.made_by(i, "Neg") for i in times.input)), None)
    constant = times and negated and g.scalar(g.other(times, negated.output[0]))
    # the sign flips on the way to Erf only: anything else reading -x/√2 would get x/√2
    if (constant is None or abs(constant - SQRT_HALF) > 1e-6 or len(g.consumers[negated.output[0]]) != 1
            or len(g.consumers[times.output[0]]) != 1):
        return None
    if ROOT_TWO not in g.weights:
        g.weights[ROOT_TWO] = numpy_helper.from_array(np.array(np.sqrt(2), np.float32), ROOT_TWO)
        g.graph.initializer.append(g.weights[ROOT_TWO])
    divide = helper.make_node("Div", [negated.input[0], ROOT_TWO], [times.output[0]], name=f"{times.name}/div")
    plus = helper.make_node("Add", [erf.output[0], one_minus.input[0]], [one_minus.output[0]],
                            name=f"{one_minus.name}/plus")
    return [(negated, None), (times, divide), (one_minus, plus)]


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``model`` with its LayerNorms and GELUs rewritten (in place); returns it and how many of each.

    LayerNorms are left as they are below opset 17, which has no ``LayerNormalization``."""
    g = _Graph(model.graph)
    swaps: dict[int, onnx.NodeProto | None] = {}
    counts = {"layer_norm": 0, "gelu": 0}
    has_layer_norm_op = any(o.domain in ("", "ai.onnx") and o.version >= 17 for o in model.opset_import)
    for node in list(model.graph.node):
        if node.op_type == "Reciprocal" and has_layer_norm_op and (match := _layer_norm(g, node)):
            replaced, fused = match
            swaps.update({id(n): None for n in replaced})
            swaps[id(replaced[-1])] = fused
            counts["layer_norm"] += 1
        elif node.op_type == "Erf" and (pairs := _gelu(g, node)):
            swaps.update({id(old): new for old, new in pairs})
            counts["gelu"] += 1
    nodes = [swaps.get(id(n), n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes if n is not None)
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]  # e.g. the old epsilon constants
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    log.info("fused %d LayerNorms and %d GELUs", counts["layer_norm"], counts["gelu"])
    return model, counts


def fuse_folder(models_dir: Path, faces: np.ndarray, tolerance: float = 1e-4) -> dict:
    """Rewrite the ONNX files of an exported folder (``encoder``, ``head``, ``clip``, whichever it
    has) in place, and record their new sha256 in its manifest.

    Why a separate step: folders exported before this pass existed (the shipped release among
    them) would otherwise need their heads retrained to gain it. Each rewritten graph is run against
    the file it replaces on ``faces`` (uint8, ``(N, 48, 48)``, real faces) first, and nothing is
    written if any output moves by more than ``tolerance``. Returns, per file, the counts and max |Δ|.
    """
    import onnxruntime as ort

    from edge_agent.emotion_model import ModelError, face_tensor
    from model_export import manifest

    def run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> np.ndarray:
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)[0]

    recorded = manifest.read(models_dir)
    window = int(recorded.get("window", 8))
    x = face_tensor(faces)
    n_clips = len(x) // window
    feeds = {"encoder": {"face": x}, "clip": {"clip": x[: n_clips * window].reshape(n_clips, window, *x.shape[1:])}}
    rewritten, report = {}, {}
    for name in ("encoder", "head", "clip"):
        path = models_dir / f"{name}.onnx"
        if not path.exists():
            continue
        before = run(path, feeds[name])
        if name == "encoder":
            feeds["head"] = {"embeddings": before[: n_clips * window].reshape(n_clips, window, -1)}
        model, counts = fuse(onnx.load(str(path)))
        if not any(counts.values()):
            report[name] = {**counts, "note": "nothing left to fuse"}
            continue
        diff = float(np.abs(run(model, feeds[name]) - before).max())
        if diff > tolerance:
            raise ModelError(f"fused {path.name} differs from the original by {diff:.2g} (> {tolerance}) on real "
                             "faces; the originals are untouched")
        rewritten[name] = model
        report[name] = {**counts, "max_abs_diff": diff, "faces": len(faces)}
    for name, model in rewritten.items():
        onnx.save(model, str(models_dir / f"{name}.onnx"))
    if rewritten:
        files = recorded.get("files", {})
        manifest.update(models_dir, files={
            name: {**files.get(name, {}), **manifest.file_entry(models_dir / f"{name}.onnx", models_dir)}
            for name in rewritten}, graph_fusion=report)
    return report
