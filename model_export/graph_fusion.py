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

Release files (``model_export ensemble`` and ``optimize``, not exported members) also get their
self-attention fused: Keras' ``MultiHeadAttention`` comes out of tf2onnx as 19 nodes (three
projections, each reshaped and biased, a scale, five transposes, two batched products, a softmax
and the reshape joining the heads) that become one ``com.microsoft.Attention`` node, ONNX Runtime's
fused CPU kernel, with the three projection weights concatenated. That op is ONNX Runtime's own,
so :func:`expand_attention` writes it back as standard operators for TensorRT (``model_export
build``). Members keep the plain form, which :mod:`model_export.warm_start` reads weights from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from model_export import PARITY_TOLERANCE

log = logging.getLogger(__name__)

SQRT_HALF = 1 / np.sqrt(2)
ORT_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators, where Attention lives
FUSED_KINDS = ("layer_norm", "gelu", "attention")
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


Swaps = list[tuple[onnx.NodeProto, onnx.NodeProto | None]]  # (node, what takes its place; None drops it)


def _in_place_of(replaced: list[onnx.NodeProto], fused: onnx.NodeProto) -> Swaps:
    """Drop ``replaced`` and put ``fused`` where the last of them (the pattern's output) was: ``fused``
    reads only what the pattern read from outside, all of it computed before there, so the graph
    stays in topological order."""
    return [(node, None) for node in replaced[:-1]] + [(replaced[-1], fused)]


def _layer_norm(g: _Graph, reciprocal: onnx.NodeProto) -> Swaps | None:
    """Match tf2onnx's LayerNorm around its ``Reciprocal`` (of ``Sqrt(variance + eps)``):

    ``mean = GAP(x); d = x - mean; var = GAP(d·d); r = 1/Sqrt(var + eps); k = r·gamma;
    y = x·k + (beta + (-mean)·k)``, all of it swapped for one ``LayerNormalization``.
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
    return _in_place_of([mean, diff, square, variance, add_eps, sqrt, reciprocal, scale, scaled_x, negated,
                         scaled_mean, shift, out], fused)


def _gelu(g: _Graph, erf: onnx.NodeProto) -> Swaps | None:
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


def _perm(node: onnx.NodeProto | None) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None) if node else None


class _Projection(NamedTuple):
    """One of attention's query, key and value: the nodes computing it and what they compute."""

    nodes: list[onnx.NodeProto]
    x: str
    kernel: str
    bias: str | None
    scale: float | None
    heads: tuple[int, int]  # (heads, head size)


def _projection(g: _Graph, name: str, perm: list[int], scaled: bool = False) -> _Projection | None:
    """Walk back from one attention operand: ``Transpose(perm)`` of ``[Mul(scale) of] [Add(bias) of]
    Reshape(to heads) of MatMul(x, kernel)`` (tf2onnx drops a bias that is all zeros, as in a freshly
    initialised layer)."""
    transpose = g.made_by(name, "Transpose")
    if _perm(transpose) != perm:
        return None
    scale, mul = None, None
    source = transpose.input[0]
    if scaled:
        mul = g.made_by(source, "Mul")
        scale = mul and g.scalar(mul.input[1])
        if scale is None:
            return None
        source = mul.input[0]
    bias = g.made_by(source, "Add")
    reshape = g.made_by(bias.input[0] if bias else source, "Reshape")
    matmul = reshape and g.made_by(reshape.input[0], "MatMul")
    if not matmul or matmul.input[1] not in g.weights or reshape.input[1] not in g.weights:
        return None
    if bias and bias.input[1] not in g.weights:
        return None
    nodes = [n for n in (matmul, reshape, bias, mul, transpose) if n is not None]
    if any(len(g.consumers.get(n.output[0], [])) != 1 for n in nodes):
        return None
    heads = tuple(int(d) for d in numpy_helper.to_array(g.weights[reshape.input[1]])[-2:])
    return _Projection(nodes, matmul.input[0], matmul.input[1], bias.input[1] if bias else None, scale, heads)


def _attention(g: _Graph, softmax: onnx.NodeProto) -> Swaps | None:
    """Match Keras' ``MultiHeadAttention(h, h)`` as tf2onnx writes it, around its ``Softmax``:
    ``scores = K·Qᵀ`` over ``(N, heads, keys, queries)``, softmax over the keys, transposed back,
    times V, heads joined by a ``Reshape``, all of it swapped for one ``Attention`` node."""
    scores = g.made_by(softmax.input[0], "MatMul")
    flip = g.sole_consumer(softmax.output[0], "Transpose")
    mix = flip and g.sole_consumer(flip.output[0], "MatMul")
    join = mix and g.sole_consumer(mix.output[0], "Transpose")
    out = join and g.sole_consumer(join.output[0], "Reshape")
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if not (scores and out and axis == 2 and _perm(flip) == [0, 1, 3, 2] and _perm(join) == [0, 2, 1, 3]
            and mix.input[0] == flip.output[0]):
        return None
    key = _projection(g, scores.input[0], [0, 2, 1, 3])
    query = _projection(g, scores.input[1], [0, 2, 3, 1], scaled=True)
    value = _projection(g, mix.input[1], [0, 2, 1, 3])
    parts = (query, key, value)
    if not all(parts) or len({p.x for p in parts}) != 1 or len({p.heads for p in parts}) != 1:
        return None
    kernels = [numpy_helper.to_array(g.weights[p.kernel]) for p in parts]
    (heads, size), width = query.heads, kernels[0].shape[1]
    if any(k.shape != kernels[0].shape for k in kernels) or heads * size != width:
        return None
    biases = [numpy_helper.to_array(g.weights[p.bias]) if p.bias else np.zeros(width, np.float32) for p in parts]
    stem = out.name.rsplit("/", 2)[0] if "/" in out.name else out.output[0]
    weight, bias = f"{stem}/qkv_kernel", f"{stem}/qkv_bias"
    for name, value_ in ((weight, np.concatenate(kernels, axis=1)),
                         (bias, np.concatenate([b.reshape(-1) for b in biases]))):
        g.weights[name] = numpy_helper.from_array(value_.astype(np.float32), name)
        g.graph.initializer.append(g.weights[name])
    fused = helper.make_node("Attention", [query.x, weight, bias], [out.output[0]], name=f"{stem}/attention",
                             domain=ORT_DOMAIN, num_heads=heads, scale=query.scale)
    return _in_place_of([*query.nodes, *key.nodes, *value.nodes, scores, softmax, flip, mix, join, out], fused)


def fuse(model: onnx.ModelProto, attention: bool = False) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``model`` with its LayerNorms and GELUs (and, with ``attention``, its self-attention) rewritten
    in place; returns it and how many of each.

    LayerNorms are left as they are below opset 17, which has no ``LayerNormalization``."""
    g = _Graph(model.graph)
    swaps: dict[int, onnx.NodeProto | None] = {}
    counts = dict.fromkeys(FUSED_KINDS, 0)
    has_layer_norm_op = any(o.domain in ("", "ai.onnx") and o.version >= 17 for o in model.opset_import)
    for node in list(model.graph.node):
        if node.op_type == "Reciprocal" and has_layer_norm_op:
            kind, pairs = "layer_norm", _layer_norm(g, node)
        elif node.op_type == "Erf":
            kind, pairs = "gelu", _gelu(g, node)
        elif node.op_type == "Softmax" and attention:
            kind, pairs = "attention", _attention(g, node)
        else:
            continue
        if pairs:
            swaps.update({id(old): new for old, new in pairs})
            counts[kind] += 1
    nodes = [swaps.get(id(n), n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes if n is not None)
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]  # e.g. the old epsilon constants
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if counts["attention"] and all(o.domain != ORT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    onnx.checker.check_model(model, full_check=True)
    log.info("fused %d LayerNorms, %d GELUs and %d attention blocks", counts["layer_norm"], counts["gelu"],
             counts["attention"])
    return model, counts


def expand_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with each ``com.microsoft.Attention`` written as standard ONNX operators
    (one projection, split into heads, scaled dot-product softmax, heads joined), for runtimes
    without ONNX Runtime's contrib operators, such as TensorRT's ONNX parser."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain != ORT_DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len([i for i in node.input if i]) != 3 or set(attrs) - {"num_heads", "scale"}:
            from edge_agent.emotion_model import ModelError

            raise ModelError(f"{node.name}: only self-attention as graph_fusion writes it (input, weights, bias; "
                             f"no mask) can be expanded; this node has inputs {list(node.input)} and {sorted(attrs)}")
        x, kernel, bias = node.input
        hidden = numpy_helper.to_array(weights[kernel]).shape[1] // 3
        heads = attrs["num_heads"]
        scale = attrs.get("scale") or (hidden // heads) ** -0.5
        p = f"{node.name}/expanded/"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([0, 0, 3, heads, hidden // heads], np.int64), p + "split_shape"),
            numpy_helper.from_array(np.array([0, 0, hidden], np.int64), p + "join_shape"),
            numpy_helper.from_array(np.array(scale, np.float32), p + "scale"),
            *(numpy_helper.from_array(np.array(i, np.int64), p + f"index{i}") for i in range(3)),
        ])
        nodes += [
            helper.make_node("MatMul", [x, kernel], [p + "qkv"]),
            helper.make_node("Add", [p + "qkv", bias], [p + "qkv_biased"]),
            helper.make_node("Reshape", [p + "qkv_biased", p + "split_shape"], [p + "heads"]),
            helper.make_node("Transpose", [p + "heads"], [p + "by_part"], perm=[2, 0, 3, 1, 4]),
            *(helper.make_node("Gather", [p + "by_part", p + f"index{i}"], [p + part], axis=0)
              for i, part in enumerate(("q", "k", "v"))),
            helper.make_node("Transpose", [p + "k"], [p + "k_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [p + "q", p + "k_t"], [p + "scores"]),
            helper.make_node("Mul", [p + "scores", p + "scale"], [p + "scaled"]),
            helper.make_node("Softmax", [p + "scaled"], [p + "weights"], axis=-1),
            helper.make_node("MatMul", [p + "weights", p + "v"], [p + "context"]),
            helper.make_node("Transpose", [p + "context"], [p + "by_token"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "by_token", p + "join_shape"], [node.output[0]]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(n.domain == ORT_DOMAIN for n in nodes):
        kept = [o for o in model.opset_import if o.domain != ORT_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    return model


def fuse_folder(models_dir: Path, faces: np.ndarray, tolerance: float = PARITY_TOLERANCE) -> dict:
    """Rewrite the ONNX files of an exported folder (``encoder``, ``head``, ``clip``, whichever it
    has) in place, self-attention included, and record their new sha256 in its manifest.

    Why a separate step: folders exported before this pass existed (the shipped release among
    them) would otherwise need their heads retrained to gain it. Each rewritten graph is run against
    the file it replaces on ``faces`` (uint8, ``(N, 48, 48)``, real faces) first, and nothing is
    written if any output moves by more than ``tolerance``. Returns, per file, the counts and max |Δ|.
    """
    import onnxruntime as ort

    from edge_agent.emotion_model import ModelError, face_tensor
    from model_export import manifest
    from model_export.loading import load_onnx

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
        original = load_onnx(path, "pass --models a folder written by `model_export export` or `ensemble`")
        before = run(original, feeds[name])
        if name == "encoder":  # the width spelled out: with fewer faces than a window (a member) -1 is ambiguous
            feeds["head"] = {"embeddings": before[: n_clips * window].reshape(n_clips, window, before.shape[1])}
        model, counts = fuse(original, attention=True)
        if not any(counts.values()):
            report[name] = {**counts, "note": "nothing left to fuse"}
            continue
        diff = float(np.abs(run(model, feeds[name]) - before).max())
        if not diff <= tolerance:  # NaN included
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
            for name in rewritten}, graph_fusion=_cumulative(recorded.get("graph_fusion", {}), report))
    return report


def _cumulative(previous: dict, report: dict) -> dict:
    """The manifest's record after this pass: per file, what every pass so far fused, and this
    pass's max |Δ| against the file it replaced; files left as they were keep their entry."""
    merged = dict(previous)
    for name, entry in report.items():
        if "max_abs_diff" not in entry:
            merged.setdefault(name, entry)
            continue
        old = previous.get(name, {})
        merged[name] = {**entry, **{kind: old.get(kind, 0) + entry[kind] for kind in FUSED_KINDS}}
    return merged
