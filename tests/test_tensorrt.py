"""TensorRT engines (NVIDIA GPU only): build, then agree with ONNX Runtime on real faces."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from edge_agent.tensorrt_runtime import unavailable_reason

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_gpu() -> None:
    why = unavailable_reason()
    if why:
        pytest.skip(f"TensorRT unavailable here: {why}")


@pytest.mark.slow
def test_fp16_engines_agree_with_onnxruntime(tmp_path: Path, fer_val: Path) -> None:
    from model_export import trt_build

    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models)
    args = argparse.Namespace(models=models, fp16=True, int8=False, calib=fer_val, max_batch=32,
                              workspace=1024, timing_cache=tmp_path / "timing.cache")
    record = trt_build.run(args)
    assert {"encoder", "head", "pnet", "rnet", "onet"} <= set(record["engines"])
    assert record["engines"]["head"]["validation"]["top1_agreement"] >= 0.99
    assert record["engines"]["encoder"]["validation"]["max_abs_diff"] < 0.05
    assert (tmp_path / "timing.cache").stat().st_size > 0

    from edge_agent.emotion_model import EmotionModel

    assert EmotionModel.load(models, backend="tensorrt").backend == "tensorrt"
