"""Keras -> ONNX with tf2onnx: encoder, temporal head and the fused clip model.

The edge runs the encoder once per face per frame and the head over cached embeddings, so the
two are exported separately; the fused clip model exists for offline evaluation and for users
who want one graph. Batch is dynamic everywhere.

Keras' exact GELU lowers to TensorFlow's ``Erfc``, which has no ONNX operator; tf2onnx leaves it
unconverted, and :func:`_lower_erfc` rewrites each one as ``1 - Erf(x)`` (exact, ONNX has Erf).
tf2onnx's ERROR lines about ``Erfc`` are therefore dropped (:class:`_HandledErfc`): an admin reading
an export log should see errors only for what is really left unconverted. Every graph then goes
through :func:`model_export.graph_fusion.fuse`, so ONNX Runtime runs each LayerNorm and GELU as one
kernel.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx
from onnx import helper, numpy_helper

from edge_agent.emotion_model import face_tensor
from model_export import OPSET, graph_fusion
from model_export.model import INPUT_SIZE, build_clip_model

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Exported:
    name: str
    path: Path
    inputs: dict[str, list]
    outputs: dict[str, list]


class _HandledErfc(logging.Filter):
    """Drops tf2onnx's "op ... Erfc is not supported" records: :func:`_lower_erfc` converts them."""

    PATTERN = re.compile(r"Tensorflow op \[[^\]]*: Erfc\] is not supported|Unsupported ops: Counter\(\{'Erfc': \d+\}\)")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.PATTERN.fullmatch(record.getMessage())


def _lower_erfc(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    count = sum(node.op_type == "Erfc" for node in graph.node)
    if not count:
        return model
    log.info("rewrote %d Erfc nodes (exact GELU) as 1 - Erf: ONNX has no Erfc operator", count)
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "erfc_one"))
    nodes = []
    for node in graph.node:
        if node.op_type != "Erfc":
            nodes.append(node)
            continue
        erf = f"{node.output[0]}_erf"
        nodes.append(helper.make_node("Erf", [node.input[0]], [erf], name=f"{node.name}_erf"))
        nodes.append(helper.make_node("Sub", ["erfc_one", erf], [node.output[0]], name=f"{node.name}_1m"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def convert(model: keras.Model, input_name: str, input_shape: tuple, output_name: str,
            path: Path, opset: int = OPSET) -> Exported:
    """Convert one Keras model with a single input and output; runs ``onnx.checker``."""
    spec = [tf.TensorSpec((None, *input_shape), tf.float32, name=input_name)]

    @tf.function(input_signature=spec, autograph=False)  # plain calls: nothing to convert, no warning
    def forward(x):
        return {output_name: model(x, training=False)}

    tf2onnx_log, handled = logging.getLogger("tf2onnx.tfonnx"), _HandledErfc()
    tf2onnx_log.addFilter(handled)
    try:
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
    finally:
        tf2onnx_log.removeFilter(handled)
    proto, _ = graph_fusion.fuse(_lower_erfc(proto))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return Exported(
        path.stem, path,
        {i.name: _shape(i) for i in proto.graph.input},
        {o.name: _shape(o) for o in proto.graph.output},
    )


def export_all(encoder: keras.Model, head: keras.Model | None, out_dir: Path, opset: int = OPSET) -> list[Exported]:
    """encoder.onnx ``(N,48,48,1)->(N,D)``, head.onnx ``(N,T,D)->(N,7)``, clip.onnx ``(N,T,48,48,1)->(N,7)``;
    the encoder alone when there is no ``head`` (an ensemble member)."""
    face = (INPUT_SIZE, INPUT_SIZE, 1)
    exported = [convert(encoder, "face", face, "embedding", out_dir / "encoder.onnx", opset)]
    if head is None:
        return exported
    window, dim = head.input_shape[1], head.input_shape[2]
    clip = build_clip_model(encoder, head, window)
    return [
        *exported,
        convert(head, "embeddings", (window, dim), "probs", out_dir / "head.onnx", opset),
        convert(clip, "clip", (window, *face), "probs", out_dir / "clip.onnx", opset),
    ]


def parity(encoder: keras.Model, head: keras.Model | None, out_dir: Path, faces: np.ndarray) -> dict:
    """Keras vs ONNX Runtime on real faces: max |Δ| per model and top-1 agreement of the clip model
    (the encoder alone when there is no ``head``: an ensemble member)."""
    import onnxruntime as ort

    def session(name: str):
        return ort.InferenceSession(str(out_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])

    x = face_tensor(faces)
    emb_keras = encoder.predict(x, batch_size=256, verbose=0)
    emb_onnx = session("encoder").run(None, {"face": x})[0]
    checks = {"faces": len(faces), "encoder_max_abs_diff": float(np.abs(emb_keras - emb_onnx).max())}
    if head is None:
        return checks
    window = head.input_shape[1]
    n_clips = len(faces) // window
    windows = emb_keras[: n_clips * window].reshape(n_clips, window, -1)
    head_keras = head.predict(windows, verbose=0)
    head_onnx = session("head").run(None, {"embeddings": windows})[0]
    clip_in = x[: n_clips * window].reshape(n_clips, window, *x.shape[1:])
    clip_keras = build_clip_model(encoder, head, window).predict(clip_in, verbose=0)
    clip_onnx = session("clip").run(None, {"clip": clip_in})[0]
    return {
        **checks,
        "head_max_abs_prob_diff": float(np.abs(head_keras - head_onnx).max()),
        "clip_max_abs_prob_diff": float(np.abs(clip_keras - clip_onnx).max()),
        "head_top1_agreement": float((head_keras.argmax(1) == head_onnx.argmax(1)).mean()),
        "clip_top1_agreement": float((clip_keras.argmax(1) == clip_onnx.argmax(1)).mean()),
    }
