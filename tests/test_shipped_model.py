"""The model files in models/ are what the manifest says, and they work on real faces."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from affectedge.labels import EMOTIONS
from edge_agent.emotion_model import EmotionModel, ModelError, sha256
from model_export.datasets import load_class_folders
from model_export.evaluate import Predictor, metrics

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def test_manifest_matches_files() -> None:
    manifest = json.loads((MODELS / "manifest.json").read_text())
    assert manifest["classes"] == list(EMOTIONS)
    for name, entry in manifest["files"].items():
        path = MODELS / entry["file"]
        assert path.stat().st_size < 25 * 2**20, f"{name} is too large for git"
        assert sha256(path) == entry["sha256"], f"{name} changed without `model_export export`"
    assert manifest["files"]["encoder"]["inputs"] == {"face": ["N", 48, 48, 1]}
    assert manifest["files"]["head"]["inputs"] == {"embeddings": ["N", manifest["window"], manifest["embed_dim"]]}


def test_manifest_records_no_build_machine_path() -> None:
    """Every path a shipped manifest records is relative to the repository: it is read on other machines."""
    from model_export.manifest import PATH_SETTINGS

    def paths(node: object) -> list[str]:
        if isinstance(node, dict):
            named = [v for k, v in node.items() if k in (*PATH_SETTINGS, "folder", "source_checkpoint") and v]
            return [p for v in named for p in (v if isinstance(v, list) else [v])] + \
                [p for v in node.values() for p in paths(v)]
        return [p for v in node for p in paths(v)] if isinstance(node, list) else []

    for folder in [MODELS, *sorted((MODELS / "members").iterdir())]:
        recorded = paths(json.loads((folder / "manifest.json").read_text()))
        assert recorded and not [p for p in recorded if Path(p).is_absolute()], (folder, recorded)


@pytest.mark.parametrize("cwd", ["repository", "elsewhere"])
def test_training_settings_are_recorded_relative_to_the_repository(cwd: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from model_export.manifest import shown_training

    monkeypatch.chdir(ROOT if cwd == "repository" else tmp_path)
    settings = {"data": str(ROOT / "data"), "run_dir": str(ROOT / "runs" / "x"), "init_from": None,
                "teacher": [str(ROOT / "models"), "/elsewhere/v5"], "seed": 1337}
    assert shown_training(settings) == {"data": "data", "run_dir": "runs/x", "init_from": None,
                                        "teacher": ["models", "/elsewhere/v5"], "seed": 1337}


def test_shipped_encoder_is_its_members_on_their_views(fer_val: Path) -> None:
    """The shipped encoder was fused by `model_export ensemble` from models/members/: each member run
    alone gives its part of the embedding, on each view of the manifest's view cycle (frame k of a
    track through view k mod V) or, without one, on the face and its mirror image averaged."""
    import onnxruntime as ort

    from edge_agent.emotion_model import view_cycle
    from edge_agent.faces.views import View

    manifest = json.loads((MODELS / "manifest.json").read_text())
    cycle = view_cycle(manifest, MODELS)
    faces = load_class_folders(fer_val, limit_per_class=3).images
    x = faces[..., None].astype(np.float32) / 255.0
    shipped = EmotionModel.load(MODELS, backend="onnxruntime")
    alone = []
    for member in manifest["training"]["members"]:
        path = ROOT / member["folder"] / "encoder.onnx"
        assert sha256(path) == member["encoder_sha256"]
        alone.append(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))

    def members_on(view: View) -> np.ndarray:
        return np.concatenate([s.run(None, {"face": view.apply(x)})[0] for s in alone], axis=1)

    if cycle:
        for k, view in enumerate(cycle):
            np.testing.assert_allclose(shipped.embed(faces, np.full(len(faces), k)), members_on(view), atol=1e-5)
    else:
        mirrored = (members_on(View()) + members_on(View(mirror=True))) / 2
        np.testing.assert_allclose(shipped.embed(faces), mirrored, atol=1e-5)


def test_shipped_encoder_fuses_attention_and_expands_to_standard_onnx_for_tensorrt(fer_val: Path) -> None:
    """ONNX Runtime runs each member's self-attention blocks as one kernel each (`model_export
    optimize`); `model_export build` hands TensorRT the same encoder in standard operators."""
    import onnx
    import onnxruntime as ort

    from model_export.graph_fusion import ORT_DOMAIN, expand_attention

    manifest = json.loads((MODELS / "manifest.json").read_text())
    encoder = onnx.load(str(MODELS / "encoder.onnx"))
    blocks = sum(member["architecture"]["depth"] for member in manifest["training"]["members"])
    assert sum(n.op_type == "Attention" and n.domain == ORT_DOMAIN for n in encoder.graph.node) == blocks
    portable = expand_attention(encoder)
    assert {n.domain for n in portable.graph.node} <= {"", "ai.onnx"}
    x = load_class_folders(fer_val, limit_per_class=3).images[..., None].astype(np.float32) / 255.0
    embed = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"face": x})[0]
             for m in (encoder, portable)]
    np.testing.assert_allclose(embed[1], embed[0], atol=1e-5)


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(MODELS, copy)
    with (copy / "head.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        EmotionModel.load(copy)


def test_shipped_model_recognises_real_faces(fer_val: Path) -> None:
    """A stratified sample of 70 val faces per class (490): far above the 1/7 of chance."""
    faces = load_class_folders(fer_val, limit_per_class=70)
    model = EmotionModel.load(MODELS, backend="onnxruntime")
    probs = Predictor(model).still(faces.images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    report = metrics(faces.labels, probs)
    assert report["accuracy"] >= 0.55, report["accuracy"]
    assert report["per_class"]["happy"]["recall"] >= 0.7


def test_edge_runtime_does_not_import_tensorflow() -> None:
    code = ("import sys; from pathlib import Path; import numpy as np\n"
            "from edge_agent.emotion_model import EmotionModel\n"
            f"m = EmotionModel.load(Path({str(MODELS)!r}))\n"
            "m.classify(np.repeat(m.embed(np.zeros((2, 48, 48), np.uint8))[:, None], m.window, 1))\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras', 'mtcnn', 'tf2onnx')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_quantize_int8_keeps_accuracy(tmp_path: Path, fer_val: Path) -> None:
    from model_export import quantize

    copy = tmp_path / "models"
    shutil.copytree(MODELS, copy)
    subset = tmp_path / "val"
    for folder in fer_val.iterdir():
        (subset / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:40]:
            shutil.copy(path, subset / folder.name / path.name)
    result = quantize.run(copy, subset, subset, calib_size=128)
    assert (copy / "encoder.int8.onnx").exists()
    assert abs(result["accuracy_delta_points"]) <= 3.0  # 276 faces: one face is 0.36 points
    assert json.loads((copy / "manifest.json").read_text())["quantization"]["faces"] == result["faces"]
    EmotionModel.load(copy, int8=True)
