"""``model_export quantize``: ONNX Runtime static INT8 (QDQ) encoder for CPUs.

The encoder holds nearly all the compute, so only it is quantized: per-channel int8 weights and
uint8 activations (the u8s8 kernels x86 CPUs run fastest) in QDQ format, calibrated on real
faces; the small BiLSTM head stays FP32. Weights use 7 bits (``reduce_range``): x86 CPUs without
VNNI (AVX2 only) add u8 x s8 products in saturating 16-bit pairs that full-range weights
overflow. On such a CPU the shipped v3 encoder lost 2.95 points of val accuracy with 8-bit
weights and 0.03 with 7-bit ones. The command reports the accuracy change on ``--data`` and the
measured encoder speed-up, and records both in the manifest. LayerNorms stay FP32: their 1-D scale
has no channel axis to quantize per channel, and a transformer's normalisation statistics are
where 8-bit rounding costs most for the least compute.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from edge_agent.emotion_model import EmotionModel, face_tensor
from edge_agent.faces.views import View, through
from edge_agent.inference import ModelError, open_session
from model_export import manifest
from model_export.datasets import load_class_folders
from model_export.evaluate import Predictor, metrics
from model_export.loading import load_onnx


class FaceReader(CalibrationDataReader):
    """Feeds real faces to the calibrator in batches of 32, through the model's view cycle in turn
    when it has one (the encoder sees mirrored and rotated faces at the edge then)."""

    def __init__(self, faces: np.ndarray, views: tuple[View, ...] = (), batch: int = 32):
        x = face_tensor(faces)
        if views:
            x = through(x, views, np.arange(len(x)) % len(views))
        self._batches = iter([{"face": x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)


def _encoder_faces_per_s(model: EmotionModel, faces: np.ndarray, seconds: float = 2.0) -> float:
    batch, views = faces[:8], np.arange(8)  # with a view cycle, each face through another view, as at the edge
    model.embed(batch, views)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.embed(batch, views)
        count += len(batch)
    return count / (time.perf_counter() - start)


def run(models_dir: Path, calib_dir: Path, data_dir: Path, calib_size: int) -> dict:
    """Write ``encoder.int8.onnx`` next to ``encoder.onnx`` and record it with its accuracy and speed.

    The file and its manifest entries change together, once the INT8 encoder has been measured:
    it is quantized into a temporary folder first, so bad faces or a crash leave the previous
    INT8 encoder with its own figures, not a new file with the old claim.
    """
    load_onnx(models_dir / "encoder.onnx", "pass --models a folder written by `model_export export` or `ensemble`")
    fp32 = EmotionModel.load(models_dir, backend="onnxruntime")
    calib, data = load_class_folders(calib_dir), load_class_folders(data_dir)
    pick = np.random.default_rng(0).choice(len(calib), size=min(calib_size, len(calib)), replace=False)
    target = models_dir / "encoder.int8.onnx"
    # inside the folder itself (the same file system, even where models/ is a link to another): the
    # finished file moves into place by rename
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=models_dir) as work:
        prepared, quantized = Path(work) / "encoder.prep.onnx", Path(work) / target.name
        # symbolic shape inference knows ONNX Runtime's fused Attention (graph_fusion), which ONNX's own does not:
        # without the shapes after it, the quantizer would leave each attention output projection in float
        quant_pre_process(str(models_dir / "encoder.onnx"), str(prepared))
        layer_norms = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "LayerNormalization"]
        quantize_static(str(prepared), str(quantized), FaceReader(calib.images[pick], fp32.views),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=True, nodes_to_exclude=layer_norms)
        int8 = replace(fp32, encoder=open_session(quantized, "onnxruntime"), int8=True)
        acc32 = metrics(data.labels, Predictor(fp32).still(data.images))["accuracy"]
        acc8 = metrics(data.labels, Predictor(int8).still(data.images))["accuracy"]
        speed32, speed8 = _encoder_faces_per_s(fp32, data.images), _encoder_faces_per_s(int8, data.images)
        result = {"accuracy_fp32": acc32, "accuracy_int8": acc8, "accuracy_delta_points": 100 * (acc8 - acc32),
                  "encoder_faces_per_s_fp32": speed32, "encoder_faces_per_s_int8": speed8,
                  "speedup": speed8 / speed32, "data": manifest.shown(data_dir), "faces": len(data)}
        if not all(np.isfinite(v) for v in result.values() if isinstance(v, float)):
            raise ModelError(f"the INT8 encoder measured {result}: a figure is not finite, so it is not installed")
        quantized.replace(target)  # the manifest follows at once: the two never disagree for longer
        manifest.update(models_dir, files={"encoder_int8": manifest.file_entry(target, models_dir,
                                                                                calibration_faces=len(pick))},
                        quantization=result)
    print(f"INT8 encoder written to {target}")
    print(f"accuracy on {len(data)} faces: fp32 {acc32:.4f}  int8 {acc8:.4f}  "
          f"(delta {result['accuracy_delta_points']:+.2f} points)")
    print(f"encoder throughput, batch 8: fp32 {speed32:.0f} faces/s  int8 {speed8:.0f} faces/s  "
          f"(x{result['speedup']:.2f})")
    return result
