"""``model_export build`` up to TensorRT: which folders it reads and its one-line errors (no GPU needed).

A lab PC runs it in the install folder (/opt/affectedge, the unit's WorkingDirectory), with the
package in site-packages and no FER faces at hand: the defaults used to point into the package, and
every build read calibration faces, even without --int8.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from model_export import trt_build
from model_export.cli import parser

ROOT = Path(__file__).resolve().parents[1]


def _build(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_export", "build", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def install_folder(tmp_path: Path) -> Path:
    """An install folder as on a lab PC: models/ with the shipped manifest, no data/."""
    (tmp_path / "models").mkdir()
    shutil.copy(ROOT / "models" / "manifest.json", tmp_path / "models")
    return tmp_path


@pytest.fixture
def no_tensorrt() -> str:
    """Why TensorRT cannot build here: the line a build that got past its inputs ends with."""
    why = trt_build.unavailable_reason()
    if why is None:
        pytest.skip("TensorRT can build here, so the command would build the engines")
    return f"model_export build: cannot build TensorRT engines: {why}. The CPU path (ONNX Runtime) needs no engine."


def test_build_reads_models_from_the_current_folder(tmp_path: Path, install_folder: Path, no_tensorrt: str):
    args = parser().parse_args(["build"])
    assert (args.models, args.calib) == (Path("models"), Path("data/val"))

    error = _one_line_error(_build("--fp16", cwd=tmp_path / "models"))  # a folder with no models/ in it
    assert error == ("model_export build: model manifest models/manifest.json does not exist: run `model_export "
                     "build` in the folder holding models/ (cd /opt/affectedge on a lab PC) or pass --models DIR")

    assert _one_line_error(_build("--fp16", cwd=install_folder)) == no_tensorrt


def test_build_without_int8_reads_no_faces(tmp_path: Path, install_folder: Path, no_tensorrt: str):
    missing = tmp_path / "no-such-faces"
    assert _one_line_error(_build("--fp16", "--calib", str(missing), cwd=install_folder)) == no_tensorrt

    faces = trt_build.build_faces(argparse.Namespace(int8=False, calib=missing))
    assert faces.images.shape == (trt_build.NOISE_FACES, 48, 48) and faces.images.dtype == np.uint8
    assert faces.described == "seeded noise faces (no --calib folder)"


def test_int8_without_usable_faces_is_one_line_naming_calib(tmp_path: Path, install_folder: Path):
    few = tmp_path / "few"
    (few / "happy").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(few / "happy" / f"{i}.png"), np.full((48, 48), 128, np.uint8))

    assert _one_line_error(_build("--int8", cwd=install_folder)) == (
        "model_export build: --int8 calibrates on real faces, and --calib data/val is not a folder: pass --calib a "
        "folder with one sub-folder of real faces per class, e.g. FER2013's val split")
    assert _one_line_error(_build("--int8", "--calib", str(few), cwd=install_folder)) == (
        f"model_export build: --calib {few} holds 3 faces, fewer than one INT8 calibration batch (32): pass --calib "
        "a folder with one sub-folder of real faces per class, e.g. FER2013's val split")


def test_int8_with_real_faces_gets_to_tensorrt(install_folder: Path, fer_val: Path, no_tensorrt: str):
    assert _one_line_error(_build("--int8", "--fp16", "--calib", str(fer_val), cwd=install_folder)) == no_tensorrt
    faces = trt_build.build_faces(argparse.Namespace(int8=True, calib=fer_val))
    assert len(faces.images) >= trt_build.CALIB_BATCH and faces.described.endswith(f"real faces from {fer_val}")
