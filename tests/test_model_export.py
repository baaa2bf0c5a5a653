"""Keras model, training loop with resume, and ONNX export parity (needs TensorFlow: slow)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")

from conftest import MODELS  # noqa: E402

from model_export.augment import TRAIN  # noqa: E402
from model_export.datasets import load_class_folders  # noqa: E402
from model_export.model import LEGACY_STEM_DEPTHS, ModelConfig, build_encoder, build_head  # noqa: E402
from model_export.onnx_export import export_all, parity  # noqa: E402
from model_export.train import (  # noqa: E402
    FrameBatches,
    TrainConfig,
    embed_faces,
    encoder_of,
    frame_targets,
    teacher_cache,
    teacher_probabilities,
    train_encoder,
    train_head,
)

TINY = ModelConfig(stem_filters=(8, 8, 16), embed_dim=16, depth=1, heads=2, mlp_dim=16, window=4, lstm_units=8)


def test_default_encoder_is_small_and_shapes_are_right() -> None:
    cfg = ModelConfig()
    encoder = build_encoder(cfg)
    assert encoder.count_params() <= 5_000_000
    assert encoder.output_shape == (None, cfg.embed_dim)
    assert build_head(cfg).output_shape == (None, 7)


def test_an_architecture_recorded_without_stem_depths_is_the_legacy_stem() -> None:
    recorded = {k: v for k, v in ModelConfig().to_dict().items() if k != "stem_depths"}
    assert ModelConfig.from_dict(recorded).stem_depths == LEGACY_STEM_DEPTHS != ModelConfig().stem_depths


@pytest.mark.parametrize("depths", [(2, 2, 0), (1, 2, 2), (0, 0, 3)])
def test_stem_depths_place_the_convs_at_their_resolutions(depths: tuple[int, int, int]) -> None:
    encoder = build_encoder(replace(TINY, stem_depths=depths))
    convs = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Conv2D)]
    # the stem's 3x3 convs, then the strided conv to 6x6 tokens and the 1x1 projection to embed_dim
    assert [conv.output.shape[1] for conv in convs] == [48] * depths[0] + [24] * depths[1] + [12] * depths[2] + [6, 6]
    assert [conv.filters for conv in convs[:-1]] == [8] * depths[0] + [8] * depths[1] + [16] * (depths[2] + 1)
    assert encoder.output_shape == (None, TINY.embed_dim)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, fer_val: Path) -> Path:
    """A 2-split class-folder set of real FER faces, 6 per class."""
    root = tmp_path_factory.mktemp("tiny")
    for split in ("train", "val"):
        for folder in fer_val.iterdir():
            target = root / split / folder.name
            target.mkdir(parents=True)
            for path in sorted(folder.iterdir())[:6]:
                shutil.copy(path, target / path.name)
    return root


@pytest.mark.slow
def test_train_resume_head_and_export_parity(tiny_data: Path, tmp_path: Path, fer_val: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    # XLA off where the mode does not matter: on these tiny runs its compile would take most of the time
    cfg = TrainConfig(data=str(tiny_data), run_dir=str(run), epochs=1, head_epochs=1, batch_size=16, xla="off")
    train_encoder(cfg, TINY, resume=False, verbose=0)
    cfg.epochs, cfg.xla = 2, "on"  # resumed XLA-compiled: that path runs here on every CPU
    train_encoder(cfg, TINY, resume=True, verbose=0)
    with (run / "history.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["0", "1"]  # resumed, not restarted
    clip_root = tmp_path / "clips"
    for folder in (tiny_data / "train").iterdir():
        for c in range(2):  # two 3-frame "videos" per class
            clip = clip_root / folder.name / f"clip{c}"
            clip.mkdir(parents=True)
            for i, path in enumerate(sorted(folder.iterdir())[3 * c:3 * c + 3]):
                shutil.copy(path, clip / f"{i:03d}.jpg")
    train_head(cfg, TINY, verbose=0, clip_data=clip_root)  # real clips, sampled to the window of 4
    with (run / "head_history.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 1
    train_head(cfg, TINY, verbose=0)  # synthesised clips (what ships)
    assert json.loads((run / "config.json").read_text())["model"]["window"] == 4

    encoder = keras.models.load_model(run / "encoder_best.keras").get_layer("encoder")
    head = keras.models.load_model(run / "head.keras")
    caplog.set_level(logging.INFO)
    exported = export_all(encoder, head, tmp_path / "onnx")
    # GELU's Erfc is converted (as 1 - Erf), so tf2onnx's errors about it are not shown to the admin
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Erfc nodes (exact GELU) as 1 - Erf" in caplog.text
    assert {e.name for e in exported} == {"encoder", "head", "clip"}
    assert exported[0].inputs == {"face": ["N", 48, 48, 1]}
    assert exported[1].inputs == {"embeddings": ["N", 4, 16]}
    faces = load_class_folders(fer_val, limit_per_class=8).images
    checks = parity(encoder, head, tmp_path / "onnx", faces)
    assert checks["encoder_max_abs_diff"] <= 1e-4
    assert checks["head_max_abs_prob_diff"] <= 1e-4 and checks["clip_max_abs_prob_diff"] <= 1e-4
    assert checks["head_top1_agreement"] == 1.0 and checks["clip_top1_agreement"] == 1.0
    assert np.isfinite(list(checks.values())).all()


@pytest.mark.slow
def test_cli_export_replaces_the_whole_model_and_only_after_parity(tiny_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from model_export import cli, manifest, onnx_export, quantize

    run, out, faces = tmp_path / "run", tmp_path / "out", str(tiny_data / "val")
    cfg = TrainConfig(data=str(tiny_data), run_dir=str(run), epochs=1, head_epochs=1, batch_size=16, xla="off")
    train_encoder(cfg, TINY, resume=False, verbose=0)
    train_head(cfg, TINY, verbose=0)
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--data", faces]) == 0
    quantize.run(out, tiny_data / "val", tiny_data / "val", 64)
    manifest.update(out, val_metrics={"accuracy": 0.5})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"manifest.json", "encoder.onnx", "encoder.int8.onnx", "head.onnx", "clip.onnx"}

    capsys.readouterr()
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--data", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (f"model_export export: parity faces {tmp_path / 'nope'} does not exist: pass "
                                       "--data with class folders of real faces (e.g. data/val), or --no-parity to "
                                       "export without checking the ONNX files\n")
    with monkeypatch.context() as patched:  # an export that does not match Keras
        patched.setattr(onnx_export, "parity", lambda *args: {"faces": 42, "encoder_max_abs_diff": 0.5})
        assert cli.main(["export", "--run", str(run), "--out", str(out), "--data", faces]) == 2
    assert capsys.readouterr().err.endswith(f"ONNX differs from Keras by 0.5 (more than 1e-4), so nothing was "
                                            f"written to {out}: do not ship this export; check the model's layers "
                                            "convert (tf2onnx log)\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert cli.main(["export", "--run", str(run), "--out", str(out), "--no-parity", "--opset", "18"]) == 0
    # the int8 encoder was the old one's
    assert {p.name for p in out.iterdir()} == {"manifest.json", "encoder.onnx", "head.onnx", "clip.onnx"}
    written = json.loads((out / "manifest.json").read_text())
    assert not {"quantization", "val_metrics"} & set(written)
    assert written["parity"] == "not checked (exported with --no-parity)"
    assert list(written["files"]) == ["encoder", "head", "clip"]
    assert {entry["opset"] for entry in written["files"].values()} == {18}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging folder left behind


def test_distillation_targets_mix_the_label_with_the_teacher(tiny_data: Path) -> None:
    faces = load_class_folders(tiny_data / "train")
    teacher = np.random.default_rng(0).dirichlet(np.ones(7), size=len(faces)).astype(np.float32)
    targets = frame_targets(faces.labels, teacher, weight=0.25)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
    rows = np.arange(len(faces))
    np.testing.assert_allclose(targets[rows, faces.labels], 0.75 + 0.25 * teacher[rows, faces.labels], atol=1e-6)
    assert (frame_targets(faces.labels).argmax(axis=1) == faces.labels).all()
    # the batches carry those targets, face for face, whatever the shuffle
    batches = FrameBatches(faces, targets, 8, np.ones(7, np.float32), seed=3, augment=TRAIN)
    x, y, _ = batches[1]
    np.testing.assert_array_equal(y, targets[batches.order[8:16]])
    assert x.shape == (8, 48, 48, 1)


@pytest.mark.slow
def test_training_with_a_teacher_learns_its_probabilities(tiny_data: Path, tmp_path: Path) -> None:
    from edge_agent.emotion_model import EmotionModel
    from model_export.evaluate import Predictor

    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), run_dir=str(run), epochs=1, batch_size=16, teacher=[str(MODELS)],
                      distill_weight=0.5, xla="off")
    train_encoder(cfg, TINY, resume=False, verbose=0)
    assert json.loads((run / "config.json").read_text())["train"]["teacher"] == [str(MODELS)]
    [cache] = (run / "cache").glob("teacher-*.npy")
    faces = load_class_folders(tiny_data / "train")
    expected = Predictor(EmotionModel.load(MODELS, backend="onnxruntime")).still(faces.images)
    np.testing.assert_allclose(np.load(cache), expected, atol=1e-5)
    # a resumed run reads the cache instead of running the teacher again
    np.save(cache, np.full_like(expected, 1 / 7))
    np.testing.assert_allclose(teacher_probabilities([MODELS], faces, run / "cache"), 1 / 7, rtol=1e-6)


def test_several_teachers_teach_the_average_of_their_probabilities(tiny_data: Path, tmp_path: Path) -> None:
    """Two releases that share an encoder but not a head are two teachers, each with its own cache."""
    faces = load_class_folders(tiny_data / "train")
    manifest = json.loads((MODELS / "manifest.json").read_text())
    rng = np.random.default_rng(5)
    teachers, taught = [], []
    (tmp_path / "cache").mkdir()
    for name in ("release", "retrained-head"):
        folder = tmp_path / name
        folder.mkdir()
        manifest["files"]["head"]["sha256"] = hashlib.sha256(name.encode()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
        probs = rng.dirichlet(np.ones(7), size=len(faces)).astype(np.float32)
        np.save(teacher_cache(folder, tmp_path / "cache"), probs)
        teachers.append(folder)
        taught.append(probs)
    assert len(list((tmp_path / "cache").glob("teacher-*.npy"))) == 2
    np.testing.assert_allclose(teacher_probabilities(teachers, faces, tmp_path / "cache"), np.mean(taught, axis=0),
                               atol=1e-7)


@pytest.mark.parametrize(("setting", "avx512", "compiled"), [
    ("auto", True, False), ("auto", False, True), ("on", True, True), ("off", False, False)])
def test_xla_auto_leaves_avx512_cpus_to_tensorflows_own_kernels(monkeypatch: pytest.MonkeyPatch, setting: str,
                                                                 avx512: bool, compiled: bool) -> None:
    from model_export import train

    monkeypatch.setattr(train, "_cpu_has_avx512", lambda: avx512)
    assert train._jit(TrainConfig(data="data", run_dir="run", xla=setting)) is compiled


#: Stage 1 in a process on Keras' JAX backend with TensorFlow unimportable, as on the GPU machines,
#: saving the best encoder's embeddings of the val faces next to the checkpoint.
_TRAIN_ON_JAX = """
import importlib.abc, json, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "tf2onnx"):
            raise ImportError(f"{name} is not installed on this machine")
sys.meta_path.insert(0, NoTensorFlow())
from pathlib import Path
import keras, numpy as np
from model_export.datasets import load_class_folders
from model_export.model import ModelConfig
from model_export.train import TrainConfig, embed_faces, encoder_of, train_encoder
assert keras.backend.backend() == "jax", keras.backend.backend()
data, run, architecture = sys.argv[1:]
best = train_encoder(TrainConfig(data=data, run_dir=run, epochs=1, batch_size=16),
                     ModelConfig.from_dict(json.loads(architecture)), resume=False, verbose=0)
faces = load_class_folders(Path(data) / "val").images
np.save(Path(run) / "jax_embeddings.npy", embed_faces(encoder_of(keras.models.load_model(best)), faces))
assert "tensorflow" not in sys.modules
"""


@pytest.mark.slow
def test_an_encoder_trained_on_jax_loads_on_tensorflow_with_the_same_outputs(tiny_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("jax")
    run = tmp_path / "run"
    architecture = json.dumps(TINY.to_dict())
    trained = subprocess.run([sys.executable, "-c", _TRAIN_ON_JAX, str(tiny_data), str(run), architecture],
                             env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert keras.backend.backend() == "tensorflow"
    with (run / "history.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 1
    encoder = encoder_of(keras.models.load_model(run / "encoder_best.keras"))
    faces = load_class_folders(tiny_data / "val").images
    np.testing.assert_allclose(embed_faces(encoder, faces), np.load(run / "jax_embeddings.npy"), atol=1e-4)


def _train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_export", "train", *args], cwd=cwd, capture_output=True,
                          text=True)


@pytest.mark.parametrize(("extra", "message"), [
    (["--distill-weight", "0.3"], "--distill-weight needs --teacher MODEL_DIR: the model whose probabilities to learn"),
    (["--teacher", "nope"], "teacher manifest nope/manifest.json does not exist: pass --teacher a folder written by "
                            "`model_export export` or `ensemble` (e.g. models)"),
    (["--teacher", str(MODELS), "--teacher", str(MODELS / "members" / "d2t")],
     f"teacher {MODELS / 'members' / 'd2t'} has no head (an --encoder-only member): pass --teacher a model folder "
     "written by `model_export ensemble` or `export` without --encoder-only"),
])
def test_cli_names_what_is_wrong_with_a_teacher(tmp_path: Path, extra: list[str], message: str) -> None:
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    result = _train_cli("--data", str(tmp_path), *extra, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"model_export train: {message}"]


@pytest.mark.slow
def test_cli_trains_a_new_shape_and_resumes_it_in_that_shape(tiny_data: Path, tmp_path: Path) -> None:
    shape = ["--stem-filters", "8,8,24", "--stem-depths", "1,1,1", "--embed-dim", "24", "--heads", "3",
             "--depth", "1", "--mlp-dim", "16"]
    common = ["--data", str(tiny_data), "--run", "run", "--stage", "encoder", "--batch-size", "16",
              "--augment", "light", "--label-smoothing", "0", "--xla", "off"]
    first = _train_cli(*common, *shape, "--epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # as a run begun with --init-from records it: resuming without the flag must not forget the start
    config = tmp_path / "run" / "config.json"
    started = json.loads(config.read_text())
    started["train"]["init_from"] = "models/members/start/encoder.onnx"
    config.write_text(json.dumps(started))
    resumed = _train_cli(*common, "--epochs", "2", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    recorded = json.loads(config.read_text())
    assert recorded["train"]["init_from"] == "models/members/start/encoder.onnx"
    assert (recorded["model"]["stem_filters"], recorded["model"]["stem_depths"]) == ([8, 8, 24], [1, 1, 1])
    assert (recorded["model"]["embed_dim"], recorded["model"]["heads"]) == (24, 3)
    assert {k: recorded["train"][k] for k in ("epochs", "augment", "label_smoothing", "xla")} == {
        "epochs": 2, "augment": "light", "label_smoothing": 0.0, "xla": "off"}
    encoder = keras.models.load_model(tmp_path / "run" / "encoder_last.keras").get_layer("encoder")
    assert encoder.output_shape == (None, 24)
    with (tmp_path / "run" / "history.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["0", "1"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--stem-filters", "32,64"],
     "argument --stem-filters: '32,64' is not three whole numbers of at least 1, like 32,64,128"),
    (["--stem-depths", "2,-1,0"],
     "argument --stem-depths: '2,-1,0' is not three whole numbers of at least 0, like 1,2,2"),
    (["--epochs", "0"], "argument --epochs: '0' is not a whole number of at least 1"),
    (["--embed-dim", "100", "--heads", "3"],
     "--embed-dim 100 does not split into 3 attention heads: pick an --embed-dim that is a multiple of --heads"),
    (["--init-from", str(MODELS / "members" / "v2"), "--heads", "8"],
     "--heads sets the shape of a new encoder: leave it out with --init-from, which keeps the member's "
     "(only --depth and --mlp-dim can grow it)"),
    (["--init-from", str(MODELS), "--depth", "6"],
     f"--init-from {MODELS} is an ensemble of 2 members; pass one of its members, e.g. models/members/g8t"),
])
def test_cli_names_what_is_wrong_with_an_encoder_shape(tmp_path: Path, extra: list[str], message: str) -> None:
    result = _train_cli("--data", str(tmp_path), *extra, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(message)


def test_cli_warns_when_val_would_be_the_training_faces(tmp_path: Path) -> None:
    (tmp_path / "data" / "happy").mkdir(parents=True)  # a class-folder tree without train/ and val/
    result = _train_cli("--data", "data", "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    warnings, error = [line for line in lines if "WARNING model_export.cli" in line], lines[-1]
    assert len(warnings) == 1 and warnings[0].endswith(
        "WARNING model_export.cli: data has no train/ and val/ folders, so both read its class folders: val "
        "accuracy is then measured on the training faces; split them into data/train and data/val")
    assert error.startswith("model_export train: "), lines  # then the empty folder stops it, in one line


def test_cli_resume_refuses_to_reshape_the_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": ModelConfig().to_dict()}))
    result = _train_cli("--data", str(tmp_path), "--run", "run", "--resume", "--depth", "6", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "model_export train: --resume continues the run's own encoder: leave out --stem-filters, --stem-depths, "
        "--embed-dim, --heads, --depth and --mlp-dim (its architecture is in run/config.json)"]


@pytest.mark.parametrize("lr", ["nan", "inf", "0", "-0.001"])
def test_cli_refuses_a_learning_rate_that_trains_nothing(tmp_path: Path, lr: str) -> None:
    result = _train_cli("--data", str(tmp_path), "--lr", lr, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(f"argument --lr: '{lr}' is not a number above 0")


def _earlier_run(run: Path, *names: str) -> dict[str, bytes]:
    """A run folder holding ``names``, as bytes: a TINY config.json, and checkpoints no library can read."""
    run.mkdir()
    for name in names:
        (run / name).write_text(json.dumps({"model": TINY.to_dict()}) if name == "config.json" else f"not {name}\n")
    return {p.name: p.read_bytes() for p in run.iterdir()}


@pytest.mark.parametrize(("stage", "names", "found"), [
    ("all", ("history.csv",), "history.csv"),
    ("encoder", ("encoder_best.keras", "head.keras"), "encoder_best.keras, head.keras"),
    ("head", ("encoder_best.keras", "head.keras"), "head.keras"),
])
def test_cli_train_refuses_a_run_it_would_replace(tmp_path: Path, stage: str, names: tuple[str, ...],
                                                  found: str) -> None:
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    before = _earlier_run(tmp_path / "run", "config.json", *names)
    result = _train_cli("--data", "data", "--run", "run", "--stage", stage, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"model_export train: run already holds a trained run ({found}): pass --resume to continue it, --overwrite "
        "to train it afresh, or another --run"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    both = _train_cli("--data", "data", "--run", "run", "--stage", stage, "--resume", "--overwrite", cwd=tmp_path)
    assert both.stderr.strip().splitlines() == [
        "model_export train: --resume continues the run in --run and --overwrite starts it afresh: pass one of them"]


def test_cli_train_resume_without_a_checkpoint_to_resume_from_replaces_nothing(tmp_path: Path) -> None:
    """With no encoder_last.keras (or no epoch in history.csv) --resume started afresh over the run's files."""
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    before = _earlier_run(tmp_path / "run", "config.json", "encoder_best.keras", "head.keras")
    result = _train_cli("--data", "data", "--run", "run", "--resume", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "model_export train: run holds encoder_best.keras, head.keras but no encoder_last.keras with epochs in "
        "history.csv to resume from: pass --overwrite to train it afresh, or another --run"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_cli_train_records_the_config_only_once_the_data_loaded(tmp_path: Path) -> None:
    """A call stopped by bad data leaves the run's recorded architecture (what --resume and export read)."""
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": TINY.to_dict(), "train": {"data": "elsewhere"}}))
    before = (run / "config.json").read_bytes()
    result = _train_cli("--data", "data", "--run", "run", "--resume", "--epochs", "3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("model_export train: no labelled images under data")
    assert (run / "config.json").read_bytes() == before


def test_cli_stage_head_needs_the_runs_encoder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "run").mkdir()
    result = _train_cli("--data", "data", "--run", "run", "--stage", "head", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "model_export train: stage-1 checkpoint run/encoder_best.keras does not exist: --stage head trains a head on "
        "the encoder of --run: train it first with --stage encoder"]


def test_cli_names_a_checkpoint_keras_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from model_export import cli

    run = tmp_path / "run"
    _earlier_run(run, "encoder_best.keras", "head.keras", "config.json")
    (tmp_path / "data").mkdir()
    reason = f"{run / 'encoder_best.keras'} is not a Keras model this version can read"
    for argv, message in [
        (["export", "--run", str(run), "--out", str(tmp_path / "out"), "--no-parity"],
         f"export: {reason}: train the run again (model_export train --overwrite) or pass another --run"),
        (["bench", "--backend", "keras", "--run", str(run), "--seconds", "0.01"],
         f"bench: {reason}: pass --run a training run directory with both stages"),
        (["train", "--data", str(tmp_path / "data"), "--run", str(run), "--stage", "head", "--overwrite"],
         f"train: {reason}: train stage 1 of the run again: model_export train --stage encoder --overwrite"),
    ]:
        capsys.readouterr()
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == f"model_export {message}\n"
    assert not (tmp_path / "out").exists()


def test_cli_export_encoder_only_keeps_a_model_with_a_head(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--out defaults to models/: an ensemble member exported without --out must not replace the shipped model."""
    from model_export import cli

    run, out = tmp_path / "run", tmp_path / "out"
    _earlier_run(run, "encoder_best.keras", "config.json")
    out.mkdir()
    shutil.copy(MODELS / "manifest.json", out / "manifest.json")
    (out / "head.onnx").write_bytes(b"the shipped head")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--encoder-only", "--no-parity"]) == 2
    assert capsys.readouterr().err == (
        f"model_export export: --out {out} holds a model with a head, which --encoder-only would replace by an "
        "encoder alone: pass --out a folder of its own for the member, e.g. models/members/NAME\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory) -> Path:
    """Stage 1 of a TINY run (window 4), trained once; tests work on copies of it."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    train_encoder(TrainConfig(data=str(tiny_data), run_dir=str(run), epochs=1, batch_size=16, xla="off"), TINY,
                  resume=False, verbose=0)
    return run


@pytest.mark.slow
def test_stage_head_keeps_the_runs_window_and_export_ships_the_heads(tiny_run: Path, tiny_data: Path,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from edge_agent.emotion_model import EmotionModel
    from model_export import cli

    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(tiny_run, run)
    head_stage = ["train", "--data", str(tiny_data), "--run", str(run), "--stage", "head", "--head-epochs", "1",
                  "--batch-size", "16"]
    assert cli.main(head_stage) == 0
    assert keras.models.load_model(run / "head.keras").input_shape[1] == TINY.window  # config.json's, not 8
    assert cli.main([*head_stage, "--window", "6", "--overwrite"]) == 0  # another window, on purpose
    assert json.loads((run / "config.json").read_text())["model"]["window"] == TINY.window

    few = tmp_path / "few" / "happy"
    few.mkdir(parents=True)
    for path in sorted((tiny_data / "val" / "happy").iterdir())[:5]:
        shutil.copy(path, few / path.name)
    capsys.readouterr()
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--data", str(few.parent)]) == 2
    assert capsys.readouterr().err == (f"model_export export: {few.parent} holds 5 faces, and the parity check needs "
                                       "at least 6 (one window of the model): use a folder with more faces\n")
    assert not out.exists()

    assert cli.main(["export", "--run", str(run), "--out", str(out), "--data", str(tiny_data / "val")]) == 0
    written = json.loads((out / "manifest.json").read_text())
    assert written["window"] == written["architecture"]["window"] == 6  # what head.onnx takes
    assert written["files"]["head"]["inputs"] == {"embeddings": ["N", 6, TINY.embed_dim]}
    model = EmotionModel.load(out, backend="onnxruntime")
    faces = load_class_folders(tiny_data / "val", limit_per_class=1).images
    windows = np.repeat(model.embed(faces)[:, None], model.window, axis=1)
    assert model.classify(windows).shape == (len(faces), 7)


@pytest.mark.slow
def test_export_refuses_a_model_that_outputs_nan(tiny_run: Path, tiny_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """NaN > 1e-4 is False: a gate written that way shipped a broken model, with a bare NaN in its manifest."""
    from model_export import cli

    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(tiny_run, run)
    classifier = keras.models.load_model(run / "encoder_best.keras")
    conv = next(layer for layer in encoder_of(classifier).layers if isinstance(layer, keras.layers.Conv2D))
    kernel, *rest = conv.get_weights()
    kernel.flat[0] = np.nan
    conv.set_weights([kernel, *rest])
    classifier.save(run / "encoder_best.keras")
    capsys.readouterr()
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--data", str(tiny_data / "val"),
                     "--encoder-only"]) == 2
    assert capsys.readouterr().err == (f"model_export export: the model outputs NaN on real faces, so nothing was "
                                       f"written to {out}: its weights are broken (a diverged run?); train it again, "
                                       "e.g. with a lower --lr\n")
    assert not out.exists()


@pytest.mark.slow
def test_train_overwrite_starts_the_run_afresh(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    from model_export import cli

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("head.keras", "head_history.csv"):  # a head of the old encoder, stale once it is replaced
        (run / name).write_text("the earlier head\n")
    (run / "history.csv").write_text((run / "history.csv").read_text() * 3)
    assert cli.main(["train", "--data", str(tiny_data), "--run", str(run), "--stage", "encoder", "--overwrite",
                     "--epochs", "1", "--batch-size", "16", "--xla", "off", "--window", "5"]) == 0
    assert not (run / "head.keras").exists() and not (run / "head_history.csv").exists()
    with (run / "history.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["0"]
    assert json.loads((run / "config.json").read_text())["model"]["window"] == 5


@pytest.mark.parametrize(("args", "why"), [
    (["--fps", "0"], "argument --fps: '0' is not a whole number of at least 1"),
    (["--seconds", "-1"], "argument --seconds: '-1' is not a number above 0"),
    (["--seconds", "inf"], "argument --seconds: 'inf' is not a number above 0"),
])
def test_sample_video_refuses_a_rate_or_length_that_makes_no_video(args: list[str], why: str, capsys) -> None:
    """--fps 0 got as far as the video writer, which answered with a misleading codec error."""
    from model_export import sample_video

    with pytest.raises(SystemExit) as stop:
        sample_video.main([*args, "--out", "/nonexistent/never-written.mp4"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(why)
