"""``model_export ensemble``: fused ONNX encoders compute exactly what their members compute alone,
the head trains on the joint embedding, and the edge loads the result (needs TensorFlow: slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")

from edge_agent.emotion_model import EmotionModel, ModelError, face_tensor  # noqa: E402
from model_export import ensemble, manifest, views  # noqa: E402
from model_export.datasets import load_class_folders  # noqa: E402
from model_export.model import ModelConfig, build_encoder  # noqa: E402
from model_export.onnx_export import convert  # noqa: E402

TINY = ModelConfig(stem_filters=(8, 8, 16), embed_dim=16, depth=1, heads=2, mlp_dim=16, window=4, lstm_units=8)
ROOT = Path(__file__).resolve().parents[1]


def _member(folder: Path, seed: int) -> Path:
    """An exported model folder holding a (randomly initialised) tiny encoder."""
    keras.utils.set_random_seed(seed)
    exported = convert(build_encoder(TINY), "face", (48, 48, 1), "embedding", folder / "encoder.onnx")
    manifest.update(folder, version=f"tiny-{seed}", embed_dim=TINY.embed_dim,
                    files={"encoder": manifest.file_entry(exported.path, folder)})
    return folder


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    return [_member(root / "a", 1), _member(root / "b", 2)]


@pytest.fixture(scope="module")
def faces(fer_val: Path) -> np.ndarray:
    return load_class_folders(fer_val, limit_per_class=4).images


def _run(model, faces: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if not isinstance(model, Path) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"face": faces[..., None].astype(np.float32) / 255.0})[0]


@pytest.mark.slow
def test_fused_encoder_is_the_members_side_by_side(members: list[Path], faces: np.ndarray) -> None:
    loaded = [ensemble.Member.load(m) for m in members]
    plain = _run(ensemble.fuse_encoders(loaded, mirror=False), faces)
    alone = [_run(m / "encoder.onnx", faces) for m in members]
    np.testing.assert_allclose(plain, np.concatenate(alone, axis=1), atol=1e-5)

    mirrored_model = ensemble.fuse_encoders(loaded, mirror=True)
    assert sum(n.op_type == "Attention" for n in mirrored_model.graph.node) == len(members) * TINY.depth
    mirrored = _run(mirrored_model, faces)
    flipped = [_run(m / "encoder.onnx", np.ascontiguousarray(faces[:, :, ::-1])) for m in members]
    expected = np.concatenate([(a + f) / 2 for a, f in zip(alone, flipped, strict=True)], axis=1)
    np.testing.assert_allclose(mirrored, expected, atol=1e-5)
    assert np.abs(mirrored - plain).max() > 1e-3  # the mirror view changes the embedding...
    np.testing.assert_allclose(_run(mirrored_model, np.ascontiguousarray(faces[:, :, ::-1])), mirrored,
                               atol=1e-5)  # ...and makes it blind to which way the face is mirrored


@pytest.mark.slow
def test_rotated_views_are_the_members_on_each_view_averaged(members: list[Path], faces: np.ndarray) -> None:
    loaded = [ensemble.Member.load(m) for m in members]
    model = ensemble.fuse_encoders(loaded, mirror=True, rotations=(8.0, -8.0))
    fused = _run(model, faces)
    x = faces.astype(np.float32) / 255.0
    expected = np.concatenate([np.mean([_run(m / "encoder.onnx", view * 255.0)
                                        for view in views.all_views(x, True, (8.0, -8.0))], axis=0)
                               for m in members], axis=1)
    np.testing.assert_allclose(fused, expected, atol=1e-5)
    assert np.abs(fused - _run(ensemble.fuse_encoders(loaded, mirror=True), faces)).max() > 1e-3
    np.testing.assert_allclose(_run(model, np.ascontiguousarray(faces[:, :, ::-1])), fused, atol=1e-5)


@pytest.mark.slow
def test_members_with_different_opsets_are_refused(members: list[Path]) -> None:
    a, b = (ensemble.Member.load(m) for m in members)
    b.encoder.opset_import[0].version = 13
    with pytest.raises(ModelError, match="same --opset"):
        ensemble.fuse_encoders([a, b], mirror=True)
    for member in (a, b):  # below 13 ReduceSum's axes are no input, and tf2onnx's encoder does not run
        member.encoder.opset_import[0].version = 12
    with pytest.raises(ModelError, match="opset 12: re-export them with --opset 13 or later"):
        ensemble.fuse_encoders([a, b], mirror=True)


def _tiny_data(data: Path, fer_val: Path, per_class: int) -> Path:
    """train/ and val/ with the first ``per_class`` val faces of each class: the heads only have to
    train, not to be good."""
    for split in ("train", "val"):
        for folder in fer_val.iterdir():
            (data / split / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir())[:per_class]:
                shutil.copy(path, data / split / folder.name / path.name)
    return data


@pytest.mark.slow
def test_ensemble_trains_a_head_the_edge_can_load(members: list[Path], tmp_path: Path, fer_val: Path,
                                                  faces: np.ndarray) -> None:
    data = _tiny_data(tmp_path / "data", fer_val, 8)
    out = tmp_path / "models"
    out.mkdir()
    (out / "encoder.int8.onnx").write_bytes(b"stale")  # a previous model's file must not survive
    checks = ensemble.run(members, out, tmp_path / "run", data, mirror=True, version="tiny-ensemble",
                          window=4, head_epochs=1, seed=0, verbose=0)
    assert checks["encoder_max_abs_diff"] <= 1e-4 and checks["clip_max_abs_prob_diff"] <= 1e-4
    assert checks["head_top1_agreement"] == 1.0 and checks["clip_top1_agreement"] == 1.0
    assert not (out / "encoder.int8.onnx").exists()

    written = json.loads((out / "manifest.json").read_text())
    assert written["embed_dim"] == 2 * TINY.embed_dim and written["window"] == 4
    assert [m["version"] for m in written["training"]["members"]] == ["tiny-1", "tiny-2"]
    model = EmotionModel.load(out, backend="onnxruntime")  # sha256 of every file checked
    emb = model.embed(faces)
    assert emb.shape == (len(faces), 32)
    windows = np.repeat(emb[:, None], 4, axis=1)
    probs = model.classify(windows)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # head.onnx is each member's own head on its own part of the embedding, the probabilities averaged
    heads = [keras.models.load_model(tmp_path / "run" / f"member{i}" / "head.keras") for i in range(2)]
    dim = TINY.embed_dim
    own = [heads[0].predict(windows[:, :, :dim], verbose=0), heads[1].predict(windows[:, :, dim:], verbose=0)]
    np.testing.assert_allclose(probs, (own[0] + own[1]) / 2, atol=1e-5)
    assert np.abs(own[0] - own[1]).max() > 1e-3  # two heads, not one counted twice
    # the faces are decoded once for the run, not once per member
    assert (tmp_path / "run" / "cache" / "train.npz").exists()
    assert not any((tmp_path / "run" / f"member{i}" / "cache").exists() for i in range(2))


@pytest.mark.slow
def test_a_cycle_ensemble_runs_one_pass_per_frame_and_its_clip_model_cycles_too(members: list[Path], tmp_path: Path,
                                                                             fer_val: Path, faces: np.ndarray) -> None:
    data = _tiny_data(tmp_path / "data", fer_val, 4)
    out = tmp_path / "models"
    checks = ensemble.run(members[:1], out, tmp_path / "run", data, mirror=True, version="tiny-cycle", window=4,
                          head_epochs=1, seed=0, verbose=0, rotations=(8.0, -8.0), cycle=True)
    assert max(checks["encoder_max_abs_diff"], checks["clip_max_abs_prob_diff"]) <= 1e-4
    written = json.loads((out / "manifest.json").read_text())
    assert [(v["mirror"], v["rotate"]) for v in written["view_cycle"]] == [
        (False, 0.0), (True, 0.0), (False, 8.0), (True, 8.0), (False, -8.0), (True, -8.0)]
    assert written["test_time_augmentation"].startswith("one view per frame, in turn along each track (6:")
    # the encoder is the member alone, one pass per face: the views are the frames' business
    np.testing.assert_allclose(_run(out / "encoder.onnx", faces), _run(members[0] / "encoder.onnx", faces),
                               atol=1e-5)
    model = EmotionModel.load(out, backend="onnxruntime")
    clip = faces[:8].reshape(2, 4, 48, 48)
    windows = np.stack([model.embed(c, np.arange(4)) for c in clip])
    probs = _run_clip(out / "clip.onnx", clip)
    np.testing.assert_allclose(probs, model.classify(windows), atol=1e-5)


def _run_clip(path: Path, clip: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"clip": face_tensor(clip.reshape(-1, 48, 48)).reshape(*clip.shape, 1)})[0]


def test_cli_export_refuses_an_opset_below_13(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "model_export", "export", "--run", str(tmp_path), "--opset", "12"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "argument --opset: '12' is not a whole number of at least 13" in result.stderr


@pytest.mark.parametrize("angle", ["0", "45", "x"])
def test_cli_refuses_a_rotation_outside_0_to_30_degrees(tmp_path: Path, angle: str) -> None:
    result = subprocess.run([sys.executable, "-m", "model_export", "ensemble", "--member", str(tmp_path),
                             "--rotate", angle], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"argument --rotate: {angle!r} is not an angle above 0 and at most 30 degrees" in result.stderr


def test_cli_names_a_missing_member(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "model_export", "ensemble", "--member", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"model_export ensemble: member encoder {tmp_path / 'nope' / 'encoder.onnx'} does not exist: "
        "export its run first: model_export export --out DIR"]


def test_a_member_whose_encoder_is_not_onnx_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "member"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"version": "junk", "embed_dim": 16}))
    (folder / "encoder.onnx").write_bytes(b"PK\x03\x04 a .keras file, say")
    with pytest.raises(ModelError) as raised:
        ensemble.Member.load(folder)
    assert str(raised.value) == (f"{folder / 'encoder.onnx'} is not a readable ONNX model: a member is a folder "
                                 "written by `model_export export`")


def _previous_model(out: Path) -> dict[str, bytes]:
    """A model already in --out, which a failed ensemble must leave as it was."""
    out.mkdir()
    shutil.copy(ROOT / "models" / "manifest.json", out / "manifest.json")
    (out / "encoder.onnx").write_bytes(b"the previous encoder")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_too_few_val_faces_for_a_window_are_refused_before_any_head_trains(members: list[Path], tmp_path: Path,
                                                                            fer_val: Path) -> None:
    from model_export.datasets import DatasetError

    data = _tiny_data(tmp_path / "data", fer_val, 1)
    for extra in sorted((data / "val").iterdir())[3:]:
        shutil.rmtree(extra)  # 3 val faces, fewer than the window of 4
    out = tmp_path / "models"
    before = _previous_model(out)
    with pytest.raises(DatasetError, match=r"holds 3 faces, and the parity check needs at least 4 \(one window"):
        ensemble.run(members, out, tmp_path / "run", data, mirror=True, version="v", window=4, head_epochs=1,
                     seed=0, verbose=0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_ensemble_that_fails_parity_leaves_out_as_it_was(members: list[Path], tmp_path: Path, fer_val: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = _tiny_data(tmp_path / "data", fer_val, 4)
    out = tmp_path / "models"
    before = _previous_model(out)
    real_parity = ensemble.parity

    def broken(*args, **kwargs) -> dict:  # what a model that outputs NaN measures
        return {**real_parity(*args, **kwargs), "head_max_abs_prob_diff": float("nan")}

    monkeypatch.setattr(ensemble, "parity", broken)
    with pytest.raises(ModelError, match="nothing was written to"):
        ensemble.run(members[:1], out, tmp_path / "run", data, mirror=False, version="v", window=4, head_epochs=1,
                     seed=0, verbose=0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "models", "run"]  # no staging folder left
