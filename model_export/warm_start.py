"""Warm-start a Keras encoder from an exported ``encoder.onnx``, so a shipped encoder can train on.

Why: ``runs/`` is not in git, so the Keras checkpoint behind a shipped encoder may be gone while
its ONNX file (``models/members/<name>/``) is kept. tf2onnx keeps every weight as an initializer
named after the Keras layer that owned it (``encoder_1/<layer>_<uniquifier>/...``), with each
BatchNorm folded into the conv before it. So the weights map back one layer type at a time, in
call order, and :func:`load_encoder` then checks the rebuilt encoder against ONNX Runtime on real
faces: a naming change in a future tf2onnx fails loudly instead of training from wrong weights.

A folded BatchNorm cannot be split back into its statistics. It comes back as ``x + bias`` in
inference mode, and :func:`_recalibrate` re-derives moving statistics from training faces (with a
matching scale and offset, so inference is unchanged) so that training-mode batch statistics
start where the folded layer was.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

import keras
import numpy as np
import onnx
from keras import layers
from onnx import numpy_helper

from edge_agent.emotion_model import ModelError, face_tensor
from model_export import PARITY_TOLERANCE
from model_export.loading import load_onnx

log = logging.getLogger(__name__)

#: Keras layer types whose weights an exported encoder carries, by tf2onnx scope name
SCOPES = {
    "conv2d": layers.Conv2D,
    "batch_normalization": layers.BatchNormalization,
    "layer_normalization": layers.LayerNormalization,
    "multi_head_attention": layers.MultiHeadAttention,
    "dense": layers.Dense,
}
_SCOPE = re.compile(r"^(?P<kind>conv2d|batch_normalization|layer_normalization|multi_head_attention|dense"
                    r"|position_embedding|embedding)(?:_(?P<index>\d+))?_\d+$")


def _scoped_weights(model: onnx.ModelProto) -> dict[str, list[dict[str, np.ndarray]]]:
    """Initializers grouped as ``{kind: [weights of the 1st layer, of the 2nd, ...]}`` in Keras call order.

    A tf2onnx scope is the Keras layer name plus a uniquifier: ``conv2d_1`` is Keras' ``conv2d``,
    ``conv2d_1_2`` its ``conv2d_1``; the Keras index orders the layers of one kind.
    """
    found: dict[str, dict[int, dict[str, np.ndarray]]] = defaultdict(dict)
    for tensor in model.graph.initializer:
        parts = tensor.name.split("/")
        match = _SCOPE.match(parts[1]) if len(parts) > 2 else None
        if match:
            weights = found[match["kind"]].setdefault(int(match["index"] or 0), {})
            weights["/".join(parts[2:])] = numpy_helper.to_array(tensor)
    return {kind: [layers_[i] for i in sorted(layers_)] for kind, layers_ in found.items()}


def _layers_of(encoder: keras.Model, kind: type) -> list:
    return [layer for layer in encoder.layers if type(layer) is kind]


def _positions(encoder: keras.Model) -> list:
    return [layer for layer in encoder.layers if hasattr(layer, "pos")]


def _pick(weights: dict[str, np.ndarray], *suffixes: str) -> np.ndarray:
    for suffix in suffixes:
        for name, value in weights.items():
            if name.endswith(suffix):
                return value
    raise ModelError(f"no initializer ending in {' or '.join(suffixes)} among {sorted(weights)}")


def _assign(encoder: keras.Model, onnx_weights: dict[str, list[dict[str, np.ndarray]]]) -> None:
    counts = {kind: len(onnx_weights.get(kind, [])) for kind in SCOPES}
    expected = {kind: len(_layers_of(encoder, cls)) for kind, cls in SCOPES.items()}
    if counts != expected:
        raise ModelError(f"the ONNX encoder's layers {counts} do not match the architecture {expected}: "
                         "pass the member's own architecture (its manifest's 'architecture')")
    convs = _layers_of(encoder, layers.Conv2D)
    norms = iter(_layers_of(encoder, layers.BatchNormalization))
    folded = iter(onnx_weights["batch_normalization"])
    for conv, weights in zip(convs, onnx_weights["conv2d"], strict=True):
        kernel = _pick(weights, "merged_input:0", "ReadVariableOp:0").transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if conv.use_bias:  # tf2onnx drops an all-zero bias
            bias = weights.get("Squeeze:0", np.zeros(kernel.shape[-1], np.float32))
            conv.set_weights([kernel, bias])
            continue
        conv.set_weights([kernel])
        norm, bias = next(norms), _pick(next(folded), "batchnorm/sub:0")
        # identity scale, the folded offset as beta; _recalibrate gives it real statistics
        norm.set_weights([np.ones_like(bias), bias, np.zeros_like(bias), np.full_like(bias, 1 - norm.epsilon)])
    for norm, weights in zip(_layers_of(encoder, layers.LayerNormalization),
                             onnx_weights["layer_normalization"], strict=True):
        norm.set_weights([_pick(weights, "Reshape:0").ravel(), _pick(weights, "Reshape_1:0").ravel()])
    for mha, weights in zip(_layers_of(encoder, layers.MultiHeadAttention),
                            onnx_weights["multi_head_attention"], strict=True):
        for part, kernel, bias in (("query", "query_1/Reshape:0", "query_1/Add/ReadVariableOp:0"),
                                   ("key", "key_1/Reshape:0", "key_1/Add/ReadVariableOp:0"),
                                   ("value", "value_1/Reshape:0", "value_1/Add/ReadVariableOp:0"),
                                   ("output", "attention_output_1/Reshape_1:0",
                                    "attention_output_1/BiasAdd/ReadVariableOp:0")):
            dense = getattr(mha, f"_{part}_dense")  # EinsumDense: (in, heads, key_dim) / (heads, key_dim, out)
            dense.set_weights([_pick(weights, kernel).reshape(dense.kernel.shape),
                               _pick(weights, bias).reshape(dense.bias.shape)])
    for dense, weights in zip(_layers_of(encoder, layers.Dense), onnx_weights["dense"], strict=True):
        dense.set_weights([_pick(weights, "Cast/ReadVariableOp:0"), _pick(weights, "BiasAdd/ReadVariableOp:0")])
    position, = _positions(encoder)
    position.set_weights([_pick(onnx_weights["position_embedding"][0], "ReadVariableOp:0")])
    pooling = onnx_weights["embedding"][0]  # SequencePooling's scoring Dense
    encoder.get_layer("embedding").set_weights([_pick(pooling, "Cast/ReadVariableOp:0"),
                                                _pick(pooling, "Add/ReadVariableOp:0")])


def _recalibrate(encoder: keras.Model, faces: np.ndarray) -> None:
    """Give each folded BatchNorm the statistics of its input on ``faces``, inference unchanged.

    With moving mean ``m``, variance ``v``, scale ``sqrt(v + eps)`` and offset ``m + b`` the layer
    still computes ``x + b`` in inference mode, and about the same in training mode.
    """
    norms = _layers_of(encoder, layers.BatchNormalization)
    probe = keras.Model(encoder.input, [norm.input for norm in norms])
    outputs = probe.predict(face_tensor(faces), batch_size=256, verbose=0)
    for norm, x in zip(norms, outputs, strict=True):
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        mean, var = x.mean(axis=0), x.var(axis=0)
        _, bias, _, _ = norm.get_weights()
        norm.set_weights([np.sqrt(var + norm.epsilon), mean + bias, mean, var])


def _check_outputs(encoder: keras.Model, x: np.ndarray, expected: np.ndarray, what: str, why: str) -> float:
    """The largest difference between ``encoder`` on ``x`` and ``expected``; refused above the tolerance."""
    diff = float(np.abs(np.asarray(encoder.predict(x, batch_size=256, verbose=0)) - expected).max())
    if not diff <= PARITY_TOLERANCE:
        raise ModelError(f"{what} (max |diff| {diff:.2e}): {why}")
    return diff


def load_encoder(encoder: keras.Model, onnx_path: Path, faces: np.ndarray) -> float:
    """Copy the weights of ``onnx_path`` into ``encoder`` (same architecture) and check them.

    ``faces`` (N, 48, 48) uint8 are training faces: BatchNorm statistics come from them and the
    rebuilt encoder must match ONNX Runtime on them. Returns the largest difference found.
    """
    import onnxruntime as ort

    model = load_onnx(onnx_path, "pass --init-from a folder written by `model_export export` (e.g. models/members/v2)")
    _assign(encoder, _scoped_weights(model))
    _recalibrate(encoder, faces)
    x = face_tensor(faces[:256])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    diff = _check_outputs(encoder, x, session.run(None, {session.get_inputs()[0].name: x})[0],
                          f"{onnx_path} did not load into the Keras encoder",
                          "it was not exported from this architecture by `model_export export`")
    log.info("warm start from %s: Keras matches ONNX Runtime to %.1e on %d faces", onnx_path, diff, len(x))
    return diff


def grow(small: keras.Model, big: keras.Model, faces: np.ndarray) -> float:
    """Copy ``small`` into the deeper and/or wider ``big`` so that ``big`` computes the same function.

    Why: the shipped encoder underfits (the release scores 0.73 on its training faces, 0.65 on val), and
    a larger one trained from random weights needs far more epochs than a CPU session has. Grown
    from a trained one, it starts at the small encoder's accuracy and only has to learn the rest.
    ``big`` has the same stem and ``embed_dim``; its extra transformer blocks start as the identity
    (attention output and MLP output weights zero, so each residual branch adds nothing) and its
    extra MLP units in the old blocks get zero output weights, as in Net2Net (Chen et al., 2016).
    Returns the largest difference between the two encoders on ``faces``, refused above 1e-4.
    """
    def mlps_of(model: keras.Model) -> list[tuple[layers.Dense, layers.Dense]]:
        found = _layers_of(model, layers.Dense)  # (hidden, output) per block, in block order
        return list(zip(found[::2], found[1::2], strict=True))

    for kind in (layers.Conv2D, layers.BatchNormalization):
        for old, new in zip(_layers_of(small, kind), _layers_of(big, kind), strict=True):
            new.set_weights(old.get_weights())
    for old, new in zip([*_positions(small), small.get_layer("embedding")],
                        [*_positions(big), big.get_layer("embedding")], strict=True):
        new.set_weights(old.get_weights())
    small_norms, big_norms = _layers_of(small, layers.LayerNormalization), _layers_of(big, layers.LayerNormalization)
    for old, new in zip(small_norms[:-1], big_norms, strict=False):  # two per block, in block order
        new.set_weights(old.get_weights())
    big_norms[-1].set_weights(small_norms[-1].get_weights())  # the final one, after the blocks
    small_mlps, big_mlps = mlps_of(small), mlps_of(big)
    small_attention = _layers_of(small, layers.MultiHeadAttention)
    big_attention = _layers_of(big, layers.MultiHeadAttention)
    for old, new in zip(small_attention, big_attention, strict=False):
        new.set_weights(old.get_weights())
    for (old_in, old_out), (new_in, new_out) in zip(small_mlps, big_mlps, strict=False):
        units = old_in.units
        kernel, bias = new_in.get_weights()
        kernel[:, :units], bias[:units] = old_in.get_weights()
        bias[units:] = 0.0
        new_in.set_weights([kernel, bias])
        kernel, bias = old_out.get_weights()
        new_out.set_weights([np.concatenate([kernel, np.zeros((new_in.units - units, kernel.shape[1]),
                                                               np.float32)]), bias])
    depth = len(small_attention)
    for attention, (_, mlp_out) in zip(big_attention[depth:], big_mlps[depth:], strict=True):
        output = attention._output_dense
        output.set_weights([np.zeros_like(w) for w in output.get_weights()])
        mlp_out.set_weights([np.zeros_like(w) for w in mlp_out.get_weights()])
    x = face_tensor(faces[:256])
    diff = _check_outputs(big, x, small.predict(x, batch_size=256, verbose=0),
                          "the grown encoder differs from the one it was grown from",
                          "train without --depth/--mlp-dim to keep the member's size")
    log.info("grown from %d to %d transformer blocks, MLP %d -> %d units: same outputs to %.1e",
             depth, len(big_attention), small_mlps[0][0].units, big_mlps[0][0].units, diff)
    return diff
