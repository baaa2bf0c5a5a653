"""``model_export bench``: latency p50/p95 and throughput of the encoder, the head and MTCNN.

Inputs are real where it matters for speed (MTCNN's cost depends on the image): a 640x480 frame
with the bundled face photo when ``../shared/media`` or the sample video is present, otherwise a
synthetic frame (the encoder and head cost does not depend on pixel values). MTCNN's nets are the
models folder's own ``mtcnn/``, else the shipped ones (an exported folder has none).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_agent.emotion_model import EmotionModel, face_tensor

ROOT = Path(__file__).resolve().parents[1]


def measure(fn: Callable[[], object], seconds: float, items: int = 1) -> dict:
    """Call ``fn`` repeatedly for ``seconds`` after a warm-up; latency percentiles and items/s."""
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "per_s": float(items * len(ms) / (ms.sum() / 1000)), "runs": len(ms)}


def bench_frame() -> np.ndarray:
    """A 640x480 BGR frame holding one real face when one is available."""
    import cv2

    frame = np.full((480, 640, 3), 90, np.uint8)
    photo = cv2.imread(str(ROOT.parent / "shared" / "media" / "justin.jpg"))
    if photo is None:
        capture = cv2.VideoCapture(str(ROOT / "edge_agent" / "sample" / "classroom.mp4"))
        ok, video_frame = capture.read()
        capture.release()
        return cv2.resize(video_frame, (640, 480)) if ok else frame
    photo = cv2.resize(photo, (240, 242))
    frame[120:362, 200:440] = photo
    return frame


def _keras_model(run_dir: Path):
    from model_export.loading import load_keras

    hint = "pass --run a training run directory with both stages"
    encoder = load_keras(run_dir / "encoder_best.keras", hint).get_layer("encoder")
    head = load_keras(run_dir / "head.keras", hint)
    return (lambda faces: encoder(face_tensor(faces), training=False),
            lambda windows: head(windows, training=False), int(head.input_shape[1]), int(head.input_shape[2]))


def run(backend: str, models: Path, run_dir: Path, json_out: Path | None, seconds: float) -> dict:
    from model_export.mtcnn_export import detector_dir

    nets = None if backend == "keras" else detector_dir(models)  # missing nets fail before any timing
    if backend == "keras":
        embed, classify, window, dim = _keras_model(run_dir)
    else:
        model = EmotionModel.load(models, backend="tensorrt" if backend == "tensorrt" else "onnxruntime",
                                  int8=backend == "onnxruntime-int8")
        classify, window, dim = model.classify, model.window, model.embed_dim

        def embed(faces: np.ndarray) -> np.ndarray:  # with a view cycle, each face through another view
            return model.embed(faces, np.arange(len(faces)))
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 255, (8, 48, 48), dtype=np.uint8)
    clips = rng.standard_normal((8, window, dim)).astype(np.float32)
    results = {
        "backend": backend,
        "cpus": os.cpu_count(),
        "encoder_batch1": measure(lambda: embed(faces[:1]), seconds),
        "encoder_batch8": measure(lambda: embed(faces), seconds, items=8),
        "head_clip1": measure(lambda: classify(clips[:1]), seconds),
        "head_clip8": measure(lambda: classify(clips), seconds, items=8),
    }
    if backend != "keras":
        from edge_agent.faces.mtcnn import FaceDetector

        detector = FaceDetector(nets, backend="tensorrt" if backend == "tensorrt" else "onnxruntime")
        frame = bench_frame()
        results["mtcnn_640x480"] = measure(lambda: detector.detect(frame), seconds)
        results["mtcnn_faces_found"] = len(detector.detect(frame))
    print(f"backend {backend} on {results['cpus']} CPUs")
    print(f"{'stage':<18}{'p50 ms':>10}{'p95 ms':>10}{'items/s':>12}")
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"{key:<18}{value['p50_ms']:>10.2f}{value['p95_ms']:>10.2f}{value['per_s']:>12.1f}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2) + "\n")
    return results
