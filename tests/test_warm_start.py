"""``model_export train --init-from``: an exported encoder.onnx comes back into Keras exactly and
training continues from it (needs TensorFlow: slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")

from edge_agent.emotion_model import ModelError  # noqa: E402
from model_export import cli, ensemble, manifest  # noqa: E402
from model_export.datasets import load_class_folders  # noqa: E402
from model_export.model import ModelConfig, build_encoder  # noqa: E402
from model_export.onnx_export import convert  # noqa: E402
from model_export.train import TrainConfig, encoder_of, train_encoder  # noqa: E402
from model_export.warm_start import grow, load_encoder  # noqa: E402

# two blocks, so a mix-up of which block's weights go where cannot pass the parity check
SMALL = ModelConfig(stem_filters=(8, 8, 16), embed_dim=16, depth=2, heads=2, mlp_dim=16, window=4, lstm_units=8)
ROOT = Path(__file__).resolve().parents[1]


def _randomised(cfg: ModelConfig, seed: int) -> keras.Model:
    """An encoder whose every weight, BatchNorm statistics included, is random and distinct."""
    keras.utils.set_random_seed(seed)
    encoder = build_encoder(cfg)
    rng = np.random.default_rng(seed)
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
        elif isinstance(layer, keras.layers.LayerNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape) if i == 0 else rng.normal(0, 0.2, w.shape)
                               for i, w in enumerate(layer.get_weights())])
        elif layer.weights:
            layer.set_weights([w + rng.normal(0, 0.05, w.shape) for w in layer.get_weights()])  # biases too
    return encoder


@pytest.fixture(scope="module")
def member(tmp_path_factory) -> Path:
    """An exported model folder (manifest.json + encoder.onnx) of a random SMALL encoder."""
    folder = tmp_path_factory.mktemp("member")
    exported = convert(_randomised(SMALL, 7), "face", (48, 48, 1), "embedding", folder / "encoder.onnx")
    manifest.update(folder, version="small-7", embed_dim=SMALL.embed_dim, architecture=SMALL.to_dict(),
                    files={"encoder": manifest.file_entry(exported.path, folder)})
    return folder


@pytest.fixture(scope="module")
def faces(fer_val: Path) -> np.ndarray:
    return load_class_folders(fer_val, limit_per_class=12).images


def _member_outputs(member: Path, faces: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(member / "encoder.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"face": faces[..., None].astype(np.float32) / 255.0})[0]


@pytest.mark.slow
def test_exported_encoder_loads_back_exactly(member: Path, faces: np.ndarray) -> None:
    fresh = build_encoder(SMALL)  # other random weights, other layer names
    x = faces[..., None].astype(np.float32) / 255.0
    expected = _member_outputs(member, faces)
    assert np.abs(fresh.predict(x, verbose=0) - expected).max() > 1e-2  # not equal by accident

    assert load_encoder(fresh, member / "encoder.onnx", faces) <= 1e-4
    np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, atol=1e-4)
    # training-mode BatchNorm starts where the folded layer was: its statistics are the data's
    norm = next(layer for layer in fresh.layers if isinstance(layer, keras.layers.BatchNormalization))
    gamma, _, mean, var = norm.get_weights()
    first_conv = keras.Model(fresh.input, norm.input).predict(x, verbose=0).reshape(-1, len(var))
    np.testing.assert_allclose(mean, first_conv.mean(axis=0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(var, first_conv.var(axis=0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gamma, np.sqrt(var + norm.epsilon), rtol=1e-6)


@pytest.mark.slow
def test_shipped_members_can_train_on(faces: np.ndarray) -> None:
    """What `--init-from models/members/<name>` relies on, for the real files in models/: the shipped
    release's members and the earlier ones kept (v2 records no stem_depths: the legacy stem)."""
    shipped = json.loads((ROOT / "models" / "manifest.json").read_text())
    folders = {ROOT / member["folder"] for member in shipped["training"]["members"]}
    for folder in folders | set((ROOT / "models" / "members").iterdir()):
        architecture = json.loads((folder / "manifest.json").read_text())["architecture"]
        assert load_encoder(build_encoder(ModelConfig.from_dict(architecture)), folder / "encoder.onnx", faces) <= 1e-4


@pytest.mark.slow
def test_another_architecture_is_refused(member: Path, faces: np.ndarray) -> None:
    deeper = build_encoder(replace(SMALL, depth=3))
    with pytest.raises(ModelError, match="do not match the architecture"):
        load_encoder(deeper, member / "encoder.onnx", faces)


@pytest.fixture(scope="module")
def data(tmp_path_factory, fer_val: Path) -> Path:
    """train/ and val/ of 8 faces per class: a run only has to train, not to be good."""
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "val"):
        for folder in fer_val.iterdir():
            (root / split / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir())[:8]:
                shutil.copy(path, root / split / folder.name / path.name)
    return root


@pytest.mark.slow
def test_training_continues_from_the_exported_encoder(member: Path, tmp_path: Path, data: Path,
                                                      faces: np.ndarray) -> None:
    # XLA off: on a run this small its compile would take most of the test's time
    cfg = TrainConfig(data=str(data), run_dir=str(tmp_path / "run"), epochs=1, batch_size=16,
                      learning_rate=0.0, init_from=str(member / "encoder.onnx"), xla="off")
    best = train_encoder(cfg, SMALL, resume=False, verbose=0)
    # at a learning rate of zero only the BatchNorm statistics move: the encoder is still the member
    x = faces[..., None].astype(np.float32) / 255.0
    expected = _member_outputs(member, faces)
    trained = encoder_of(keras.models.load_model(best)).predict(x, verbose=0)
    assert np.abs(trained - expected).max() < 0.05 * np.abs(expected).max()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["init_from"] == cfg.init_from

    # the trained encoder is exported as a new member, which can warm-start the next run in turn
    out = tmp_path / "member"
    assert cli.main(["export", "--run", str(tmp_path / "run"), "--out", str(out), "--data", str(data / "val"),
                     "--encoder-only", "--version", "small-next"]) == 0
    written = json.loads((out / "manifest.json").read_text())
    assert sorted(written["files"]) == ["encoder"] and not (out / "head.onnx").exists()
    assert written["architecture"]["depth"] == SMALL.depth and written["embed_dim"] == SMALL.embed_dim
    assert written["parity"]["encoder_max_abs_diff"] <= 1e-4
    assert ensemble.Member.load(out).summary()["version"] == "small-next"
    assert load_encoder(build_encoder(SMALL), out / "encoder.onnx", faces) <= 1e-4


def test_cli_names_a_folder_without_a_manifest(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "model_export", "train", "--data", str(tmp_path),
                             "--init-from", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"model_export train: model manifest {tmp_path / 'nope' / 'manifest.json'} does not exist: "
        "pass --init-from a folder written by `model_export export` (e.g. models/members/v2)"]


@pytest.mark.slow
def test_a_member_grows_into_a_larger_encoder_that_computes_the_same(member: Path, faces: np.ndarray) -> None:
    small = build_encoder(SMALL)
    load_encoder(small, member / "encoder.onnx", faces)
    big = build_encoder(replace(SMALL, depth=3, mlp_dim=24))
    assert big.count_params() > small.count_params()
    assert grow(small, big, faces) <= 1e-5
    np.testing.assert_allclose(big.predict(faces[..., None] / 255.0, verbose=0), _member_outputs(member, faces),
                               atol=1e-4)


@pytest.mark.slow
def test_training_grows_a_member_and_trains_its_new_weights(member: Path, tmp_path: Path, data: Path,
                                                            faces: np.ndarray) -> None:
    bigger = replace(SMALL, depth=3, mlp_dim=24)
    runs = {}
    for lr in (0.0, 1e-2):
        cfg = TrainConfig(data=str(data), run_dir=str(tmp_path / f"run-{lr}"), epochs=1, batch_size=16,
                          learning_rate=lr, init_from=str(member / "encoder.onnx"), xla="off")
        runs[lr] = encoder_of(keras.models.load_model(train_encoder(cfg, bigger, resume=False, verbose=0)))
    # grown, at a learning rate of zero: the member's function (BatchNorm statistics aside)
    expected = _member_outputs(member, faces)
    grown = runs[0.0].predict(faces[..., None] / 255.0, verbose=0)
    assert np.abs(grown - expected).max() < 0.05 * np.abs(expected).max()
    # the new block's residual branches start at zero and learn: their output weights move off it
    new_block_outputs = [layer for layer in runs[0.0].layers if isinstance(layer, keras.layers.Dense)][-1:]
    assert all(not np.any(w) for layer in new_block_outputs for w in layer.get_weights())
    trained = [layer for layer in runs[1e-2].layers if isinstance(layer, keras.layers.Dense)][-1]
    assert np.abs(trained.get_weights()[0]).max() > 1e-6


def test_cli_refuses_to_shrink_a_member(member: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "model_export", "train", "--data", str(tmp_path),
                             "--init-from", str(member), "--depth", "1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"model_export train: --depth 1 is smaller than the --init-from encoder's {SMALL.depth}: "
        "an encoder can only be grown; leave it out to keep the member's"]


def test_an_init_from_encoder_that_is_not_onnx_is_named(tmp_path: Path, faces: np.ndarray) -> None:
    junk = tmp_path / "encoder.onnx"
    junk.write_bytes(b"")  # an empty file parses as an empty ONNX model
    with pytest.raises(ModelError) as raised:
        load_encoder(build_encoder(SMALL), junk, faces)
    assert str(raised.value) == (f"{junk} is not a readable ONNX model: pass --init-from a folder written by "
                                 "`model_export export` (e.g. models/members/v2)")
