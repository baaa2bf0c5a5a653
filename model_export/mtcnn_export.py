"""Convert the ``mtcnn`` package's own P-Net/R-Net/O-Net to ONNX, so the edge detects faces without TensorFlow.

The weights are the ones the pip package ships (``mtcnn/assets/weights/*.lz4``), loaded into the
package's Keras networks and traced with tf2onnx. Two fix-ups follow the conversion:

* Keras computes PReLU as ``relu(x) - alpha * relu(-x)`` and tf2onnx keeps those five ops; they are
  fused back into one ONNX ``PRelu`` (same maths, a third of the memory passes, and TensorRT has a
  native PReLU layer).
* Inputs/outputs get stable names (``input`` -> ``boxes``[, ``landmarks``], ``scores``) and symbolic
  dims (``batch``, ``height``, ``width``) instead of tf2onnx's ``Identity:0`` / ``unk__12``.

Output order is part of the contract: ``edge_agent.faces.mtcnn`` reads results positionally.
Every exported net is checked with ``onnx.checker`` and compared with its Keras original before
the file is written.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from model_export import OPSET, PARITY_TOLERANCE

log = logging.getLogger(__name__)

#: Where the edge looks for the nets (``<models>/mtcnn``, see edge_agent.config).
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "mtcnn"



def detector_dir(models_dir: Path) -> Path:
    """The MTCNN nets to use with ``models_dir``: its own ``mtcnn/``, else the shipped :data:`MODEL_DIR`.

    Why: ``model_export export`` and ``ensemble`` write only the emotion model, so the folders they
    write have no ``mtcnn/``; the detector does not change with the emotion model.
    """
    for folder in (models_dir / "mtcnn", MODEL_DIR):
        if all((folder / f"{net}.onnx").exists() for net in ("pnet", "rnet", "onet")):
            return folder
    raise FileNotFoundError(f"no MTCNN nets (pnet/rnet/onet.onnx) in {models_dir / 'mtcnn'} or {MODEL_DIR}: "
                            f"write them with `python -m model_export.mtcnn_export {MODEL_DIR}`")


#: name -> (stage id in the ``mtcnn`` package, Keras input shape, output names in Keras order)
NETS: dict[str, tuple[int, tuple[int | None, ...], tuple[str, ...]]] = {
    "pnet": (1, (None, None, None, 3), ("boxes", "scores")),
    "rnet": (2, (None, 24, 24, 3), ("boxes", "scores")),
    "onet": (3, (None, 48, 48, 3), ("boxes", "landmarks", "scores")),
}


def keras_nets() -> dict:
    """The package's three Keras networks with its shipped weights, keyed like :data:`NETS`."""
    from mtcnn import MTCNN

    detector = MTCNN(device="CPU:0")
    return {name: detector.get_stage(stage_id=stage_id).model for name, (stage_id, _, _) in NETS.items()}


def _fuse_prelu(graph: onnx.GraphProto) -> int:
    """Replace ``Add(Relu(x), Mul(Relu(Neg(x)), -alpha))`` by ``PRelu(x, alpha)``; returns how many."""
    producer = {out: node for node in graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}
    fused, dead, new_nodes = 0, set(), {}
    for add in graph.node:
        if add.op_type != "Add":
            continue
        parents = [producer.get(name) for name in add.input]
        relu = next((p for p in parents if p is not None and p.op_type == "Relu"), None)
        mul = next((p for p in parents if p is not None and p.op_type == "Mul"), None)
        if relu is None or mul is None:
            continue
        neg_relu = next((producer.get(i) for i in mul.input if producer.get(i) is not None), None)
        slope_name = next((i for i in mul.input if i in inits), None)
        if neg_relu is None or neg_relu.op_type != "Relu" or slope_name is None:
            continue
        neg = producer.get(neg_relu.input[0])
        if neg is None or neg.op_type != "Neg" or neg.input[0] != relu.input[0]:
            continue
        slope = -numpy_helper.to_array(inits[slope_name])
        slope_init = numpy_helper.from_array(slope.astype(np.float32), f"{add.output[0]}/prelu_slope")
        graph.initializer.append(slope_init)
        new_nodes[id(add)] = helper.make_node(
            "PRelu", [relu.input[0], slope_init.name], list(add.output), name=f"{add.name}/prelu"
        )
        dead.update(id(n) for n in (relu, mul, neg_relu, neg))
        fused += 1
    kept = [new_nodes.get(id(n), n) for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for node in graph.node for i in node.input}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return fused


def _rename_io(graph: onnx.GraphProto, output_names: tuple[str, ...]) -> None:
    """Name the input ``input`` and the outputs per :data:`NETS`; name the dynamic dims."""
    renames = {graph.input[0].name: "input"}
    renames.update({out.name: new for out, new in zip(graph.output, output_names, strict=True)})
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (*graph.input, *graph.output):
        value.name = renames[value.name]
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):  # only batch and P-Net's NHWC height/width are dynamic
                dim.dim_param = ("batch", "height", "width")[index]


def convert(model, input_shape: tuple[int | None, ...], output_names: tuple[str, ...]) -> onnx.ModelProto:
    """Trace one Keras net with tf2onnx and apply the fix-ups described in the module docstring."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec(input_shape, tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_function(tf.function(model.call), input_signature=spec, opset=OPSET)
    fused = _fuse_prelu(proto.graph)
    _rename_io(proto.graph, output_names)
    onnx.checker.check_model(proto, full_check=True)
    log.debug("converted %s: %d PReLU fused", model.name, fused)
    return proto


def parity(model, proto: onnx.ModelProto, inputs: np.ndarray) -> float:
    """Largest |ONNX Runtime - Keras| over all outputs for ``inputs`` (NHWC float32, MTCNN-normalised)."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"input": inputs})
    theirs = [np.asarray(t) for t in model(inputs)]
    return float(np.max([np.abs(a - b).max() for a, b in zip(ours, theirs, strict=True)]))  # NaN stays NaN


def _probe_inputs(name: str) -> list[np.ndarray]:
    """Inputs that exercise every dynamic dim: odd/even sizes for P-Net, batches of 1 and 7 for the rest.

    Values are smooth images plus noise in MTCNN's [-1, 1] range; the tests repeat the check on real
    face crops (tests/test_mtcnn.py).
    """
    rng = np.random.default_rng(0)
    _, shape, _ = NETS[name]
    sizes = [(1, 12, 12), (1, 37, 50), (2, 96, 71)] if name == "pnet" else [(1, *shape[1:3]), (7, *shape[1:3])]
    out = []
    for batch, h, w in sizes:
        ramp = np.linspace(-1, 1, h * w, dtype=np.float32).reshape(1, h, w, 1)
        noise = rng.normal(0, 0.3, size=(batch, h, w, 3)).astype(np.float32)
        out.append(np.clip(ramp + noise, -1, 1))
    return out


def _shapes(values) -> dict[str, list[int | str]]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def export_mtcnn(out_dir: Path) -> dict:
    """Write ``out_dir/{pnet,rnet,onet}.onnx``; returns ``{name: {"sha256", "inputs", "outputs"}}``.

    ``inputs``/``outputs`` map tensor names to shapes (symbolic dims as strings). Raises
    ``RuntimeError`` when a converted net drifts from its Keras original.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, model in keras_nets().items():
        _, input_shape, output_names = NETS[name]
        proto = convert(model, input_shape, output_names)
        drift = float(np.max([parity(model, proto, x) for x in _probe_inputs(name)]))
        if not drift <= PARITY_TOLERANCE:  # NaN fails too
            raise RuntimeError(f"{name}: ONNX differs from Keras by {drift:.2e} (> {PARITY_TOLERANCE:.0e})")
        data = proto.SerializeToString()
        (out_dir / f"{name}.onnx").write_bytes(data)

        report[name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "inputs": _shapes(proto.graph.input),
            "outputs": _shapes(proto.graph.output),
        }
        log.info("wrote %s (%d bytes, max |ONNX-Keras| %.1e)", out_dir / f"{name}.onnx", len(data), drift)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else MODEL_DIR
    for net, info in export_mtcnn(target).items():
        print(net, info)
