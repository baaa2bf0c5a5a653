"""``model_export.graph_fusion`` / ``model_export optimize``: a tf2onnx encoder's LayerNorms, GELUs and
self-attention become kernels ONNX Runtime fuses, its outputs stay the same, the attention goes back
to standard operators for TensorRT, and a folder's manifest follows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS

from edge_agent.emotion_model import ModelError, face_tensor, sha256
from model_export.datasets import load_class_folders
from model_export.graph_fusion import ORT_DOMAIN, expand_attention, fuse, fuse_folder

#: a shipped member exported before this pass existed: g5t's architecture, 6 blocks, 3-stage conv stem
UNFUSED = MODELS / "members" / "g6t"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def faces(fer_val: Path) -> np.ndarray:
    return load_class_folders(fer_val, limit_per_class=4).images


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def _embed(model: onnx.ModelProto | Path, faces: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"face": face_tensor(faces)})[0]


def test_layer_norms_and_gelus_are_rewritten_and_compute_the_same(faces: np.ndarray) -> None:
    before = onnx.load(str(UNFUSED / "encoder.onnx"))
    assert _ops(before)["Reciprocal"] == 13 and _ops(before)["Erf"] == 12  # 13 LayerNorms, 12 GELUs

    fused, counts = fuse(onnx.load(str(UNFUSED / "encoder.onnx")))
    ops = _ops(fused)
    assert counts == {"layer_norm": 13, "gelu": 12, "attention": 0}
    assert ops["LayerNormalization"] == 13
    assert not ops["Reciprocal"] and not ops["Sqrt"] and not ops["Neg"] and not ops["Sub"]
    assert len(fused.graph.node) < len(before.graph.node) - 13 * 12
    np.testing.assert_allclose(_embed(fused, faces), _embed(UNFUSED / "encoder.onnx", faces), atol=1e-5)


def test_onnx_runtime_runs_each_gelu_as_one_kernel(tmp_path: Path) -> None:
    """The point of the GELU rewrite: ONNX Runtime's own optimiser recognises it."""
    fused, _ = fuse(onnx.load(str(UNFUSED / "encoder.onnx")))

    def optimised_ops(model: onnx.ModelProto, name: str) -> Counter:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return _ops(onnx.load(str(tmp_path / name)))

    assert optimised_ops(fused, "fused.onnx")["Gelu"] == 12
    assert optimised_ops(fused, "fused.onnx")["Erf"] == 0
    unfused = optimised_ops(onnx.load(str(UNFUSED / "encoder.onnx")), "unfused.onnx")
    assert unfused["Gelu"] == 0 and unfused["Erf"] == 12  # what the exported graph ran before


def test_self_attention_becomes_one_onnx_runtime_kernel_and_computes_the_same(faces: np.ndarray) -> None:
    before = _ops(onnx.load(str(UNFUSED / "encoder.onnx")))
    fused, counts = fuse(onnx.load(str(UNFUSED / "encoder.onnx")), attention=True)
    ops = _ops(fused)
    assert counts == {"layer_norm": 13, "gelu": 12, "attention": 6}
    assert ops["Attention"] == 6 and all(n.domain == ORT_DOMAIN for n in fused.graph.node if n.op_type == "Attention")
    assert ops["Softmax"] == 1  # the attention pooling's, which is not self-attention
    # per block: the three projections, the two batched products and the five transposes between them
    assert ops["MatMul"] == before["MatMul"] - 6 * 5 and ops["Transpose"] == before["Transpose"] - 6 * 5
    assert any(o.domain == ORT_DOMAIN for o in fused.opset_import)
    np.testing.assert_allclose(_embed(fused, faces), _embed(UNFUSED / "encoder.onnx", faces), atol=1e-5)


def test_expanded_attention_is_standard_onnx_and_computes_the_same(faces: np.ndarray) -> None:
    """What ``model_export build`` hands TensorRT's parser, which has no ONNX Runtime contrib operators."""
    fused, _ = fuse(onnx.load(str(UNFUSED / "encoder.onnx")), attention=True)
    portable = expand_attention(fused)
    assert all(n.domain in ("", "ai.onnx") for n in portable.graph.node)
    assert all(o.domain != ORT_DOMAIN for o in portable.opset_import)
    assert _ops(portable)["Softmax"] == 7
    np.testing.assert_allclose(_embed(portable, faces), _embed(fused, faces), atol=1e-5)
    assert expand_attention(portable).SerializeToString() == portable.SerializeToString()


def test_attention_with_a_mask_is_not_expanded_into_something_else() -> None:
    fused, _ = fuse(onnx.load(str(UNFUSED / "encoder.onnx")), attention=True)
    node = next(n for n in fused.graph.node if n.op_type == "Attention")
    node.input.append("face")  # a fourth input: the mask, which the expansion does not implement
    with pytest.raises(ModelError, match="no mask"):
        expand_attention(fused)


def test_a_fused_graph_is_left_as_it_is() -> None:
    fused, _ = fuse(onnx.load(str(UNFUSED / "encoder.onnx")), attention=True)
    again, counts = fuse(onnx.ModelProto.FromString(fused.SerializeToString()), attention=True)
    assert counts == {"layer_norm": 0, "gelu": 0, "attention": 0}
    assert again.SerializeToString() == fused.SerializeToString()


def test_optimize_rewrites_a_folder_and_its_manifest(tmp_path: Path, fer_val: Path) -> None:
    folder = tmp_path / "g6t"
    shutil.copytree(UNFUSED, folder)
    cmd = [sys.executable, "-m", "model_export", "optimize", "--models", str(folder), "--data", str(fer_val)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"layer_norm": 13, "gelu": 12, "attention": 6' in done.stdout

    recorded = json.loads((folder / "manifest.json").read_text())
    assert recorded["files"]["encoder"]["sha256"] == sha256(folder / "encoder.onnx")
    assert recorded["files"]["encoder"]["sha256"] != sha256(UNFUSED / "encoder.onnx")
    assert recorded["graph_fusion"]["encoder"]["max_abs_diff"] <= 1e-4
    assert recorded["version"] == json.loads((UNFUSED / "manifest.json").read_text())["version"]  # rest kept

    rewritten = (folder / "encoder.onnx").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "nothing left to fuse" in again.stdout
    assert (folder / "encoder.onnx").read_bytes() == rewritten


def test_a_rewrite_that_moves_the_outputs_writes_nothing(tmp_path: Path, faces: np.ndarray) -> None:
    folder = tmp_path / "g6t"
    shutil.copytree(UNFUSED, folder)
    before = (folder / "encoder.onnx").read_bytes(), (folder / "manifest.json").read_bytes()
    with pytest.raises(ModelError, match="the originals are untouched"):
        fuse_folder(folder, faces, tolerance=0.0)  # float rounding alone exceeds a zero tolerance
    assert ((folder / "encoder.onnx").read_bytes(), (folder / "manifest.json").read_bytes()) == before


def test_below_opset_17_layer_norms_stay_as_they_are() -> None:
    """ONNX has LayerNormalization from opset 17 on; an older export keeps its moments arithmetic."""
    model = onnx.load(str(UNFUSED / "encoder.onnx"))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 16
    fused, counts = fuse(model)
    assert counts == {"layer_norm": 0, "gelu": 12, "attention": 0}
    assert _ops(fused)["Reciprocal"] == 13 and not _ops(fused)["LayerNormalization"]


def _erfc_gelu(extra_reader: bool) -> onnx.ModelProto:
    """``y = 0.5·x·(1 - Erf(-x·(1/√2)))`` as tf2onnx writes it, with ``-x/√2`` also read by another node."""
    h = onnx.helper
    consts = {"half": 0.5, "root_half": float(1 / np.sqrt(2)), "one": 1.0}
    nodes = [h.make_node("Neg", ["x"], ["neg"]), h.make_node("Mul", ["neg", "root_half"], ["scaled"]),
             h.make_node("Erf", ["scaled"], ["erf"]), h.make_node("Sub", ["one", "erf"], ["erfc"]),
             h.make_node("Mul", ["half", "x"], ["half_x"]), h.make_node("Mul", ["half_x", "erfc"], ["y"])]
    outputs = [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])]
    if extra_reader:
        nodes.append(h.make_node("Identity", ["scaled"], ["also"]))
        outputs.append(h.make_tensor_value_info("also", onnx.TensorProto.FLOAT, [4]))
    weights = [onnx.numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    graph = h.make_graph(nodes, "gelu", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])], outputs,
                         initializer=weights)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("extra_reader", [False, True])
def test_a_gelu_is_rewritten_only_when_nothing_else_reads_its_inner_values(extra_reader: bool) -> None:
    model = _erfc_gelu(extra_reader)
    x = {"x": np.array([-2.0, -0.5, 0.3, 1.7], np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    fused, counts = fuse(model)
    after = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    assert counts["gelu"] == (0 if extra_reader else 1)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6)


def _optimize(folder: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_export", "optimize", "--models", str(folder), "--data",
                           str(data)], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_optimize_names_a_file_that_is_not_onnx(tmp_path: Path, fer_val: Path) -> None:
    folder = tmp_path / "g6t"
    shutil.copytree(UNFUSED, folder)
    (folder / "encoder.onnx").write_bytes(b"not a model")
    done = _optimize(folder, fer_val)
    assert (done.returncode, done.stderr) == (
        2, f"model_export optimize: {folder / 'encoder.onnx'} is not a readable ONNX model: pass --models a folder "
           "written by `model_export export` or `ensemble`\n")


def test_optimize_refuses_fewer_faces_than_the_heads_window(tmp_path: Path, fer_val: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("manifest.json", "encoder.onnx", "head.onnx", "clip.onnx"):
        shutil.copy(MODELS / name, folder / name)
    data = tmp_path / "faces" / "happy"
    data.mkdir(parents=True)
    for path in sorted((fer_val / "happy").iterdir())[:3]:
        shutil.copy(path, data / path.name)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    done = _optimize(folder, data.parent)
    assert (done.returncode, done.stderr) == (
        2, f"model_export optimize: {data.parent} holds 3 faces, and the parity check needs at least 8 (one window "
           "of the model): use a folder with more faces\n")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # a member (no head) has no windows to check: a few faces do for its encoder
    member = tmp_path / "g6t"
    shutil.copytree(UNFUSED, member)
    assert _optimize(member, data.parent).returncode == 0


def test_a_model_that_outputs_nan_is_not_rewritten(tmp_path: Path, faces: np.ndarray) -> None:
    """NaN > tolerance is False: a parity gate written that way would pass a broken model."""
    folder = tmp_path / "g6t"
    shutil.copytree(UNFUSED, folder)
    model = onnx.load(str(folder / "encoder.onnx"))
    weights = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # a kernel, not a constant of a pattern
    broken = onnx.numpy_helper.to_array(weights).copy()
    broken.flat[0] = np.nan
    weights.CopyFrom(onnx.numpy_helper.from_array(broken, weights.name))
    onnx.save(model, str(folder / "encoder.onnx"))
    assert np.isnan(_embed(folder / "encoder.onnx", faces)).all()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ModelError, match="differs from the original by nan"):
        fuse_folder(folder, faces)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
