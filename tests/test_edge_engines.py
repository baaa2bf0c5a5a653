"""Which TensorRT engine the edge picks (no GPU needed: only the file selection runs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edge_agent.inference import pick_engine, run_in_batches, sha256

TAG = "nvidia-h200-sm90"


def models_dir(tmp_path: Path, built_from: bytes | None, in_mtcnn: bool = False) -> Path:
    """A models/ dir with encoder.onnx (or mtcnn/onet.onnx), its engine and, unless ``built_from``
    is None, the ``engines.<tag>.json`` record saying which ONNX bytes the engine was built from."""
    folder = tmp_path / "mtcnn" if in_mtcnn else tmp_path
    folder.mkdir(exist_ok=True)
    stem = "onet" if in_mtcnn else "encoder"
    (folder / f"{stem}.onnx").write_bytes(b"the current model")
    (folder / f"{stem}.{TAG}.engine").write_bytes(b"serialized engine")
    if built_from is not None:
        source = tmp_path / "source.onnx"
        source.write_bytes(built_from)
        record = {"engines": {stem: {"engine": f"{stem}.{TAG}.engine", "source": f"{stem}.onnx",
                                     "source_sha256": sha256(source)}}}
        (tmp_path / f"engines.{TAG}.json").write_text(json.dumps(record))
    return folder / f"{stem}.onnx"


@pytest.mark.parametrize("in_mtcnn", [False, True])
def test_engine_built_from_this_onnx_is_used(tmp_path: Path, in_mtcnn: bool):
    onnx = models_dir(tmp_path, b"the current model", in_mtcnn)
    assert pick_engine(onnx, TAG) == onnx.with_name(f"{onnx.stem}.{TAG}.engine")


@pytest.mark.parametrize("in_mtcnn", [False, True])
def test_engine_built_from_an_older_onnx_is_ignored_with_a_warning(tmp_path: Path, caplog, in_mtcnn: bool):
    onnx = models_dir(tmp_path, b"last term's model", in_mtcnn)
    with caplog.at_level(logging.WARNING, logger="edge_agent.inference"):
        assert pick_engine(onnx, TAG) is None
    assert "model_export build" in caplog.text and f"{onnx.stem}.{TAG}.engine" in caplog.text


def test_a_hash_the_caller_has_checked_is_used_instead_of_reading_the_file_again(tmp_path: Path, monkeypatch):
    onnx = models_dir(tmp_path, b"the current model")
    checked = sha256(onnx)

    def no_second_read(path: Path) -> str:
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr("edge_agent.inference.sha256", no_second_read)
    assert pick_engine(onnx, TAG, checked) is not None
    assert pick_engine(onnx, TAG, "0" * 64) is None  # the given hash is what is matched


def test_engine_without_a_record_is_used_and_a_missing_engine_is_none(tmp_path: Path):
    onnx = models_dir(tmp_path, None)
    assert pick_engine(onnx, TAG) is not None
    assert pick_engine(onnx, "other-gpu-sm75") is None


@pytest.mark.parametrize(("size", "max_batch", "runs"), [(5, 32, [5]), (32, 32, [32]), (70, 32, [32, 32, 6]),
                                                     (0, 32, [0])])
def test_batches_over_the_engine_profile_are_split(size: int, max_batch: int, runs: list):
    seen = []

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert len(inputs["face"]) == len(inputs["mask"])
        seen.append(len(inputs["face"]))
        return [inputs["face"] * 2, inputs["mask"][:, None]]

    faces = np.arange(size, dtype=np.float32)
    doubled, masks = run_in_batches(run, {"face": faces, "mask": -faces}, max_batch)
    assert seen == runs  # never more than the profile holds
    assert doubled.tolist() == (faces * 2).tolist()  # every face once, in order
    assert masks.shape == (size, 1) and masks[:, 0].tolist() == (-faces).tolist()
