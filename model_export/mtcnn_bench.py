"""Latency of the edge's MTCNN (ONNX Runtime, numpy/OpenCV cascade) against the ``mtcnn`` package.

Both run the same cascade settings (``min_face_size`` 20, thresholds 0.6/0.7/0.7): 20 is the
largest minimum face size at which the package works at all. The edge's own default (40) is timed
too, since that is what a lab PC runs. Calls alternate between the detectors so background load
hits both alike.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from affectedge.cli_args import positive_int
from edge_agent.faces.mtcnn import FaceDetector
from model_export.mtcnn_export import MODEL_DIR

THRESHOLDS = (0.6, 0.7, 0.7)
WARMUP = 3


def _stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def bench(frame: np.ndarray, runs: int = 30, model_dir: Path = MODEL_DIR) -> dict:
    """p50/p95 ms per ``frame`` (BGR) of our detector and the package, and the p50 speed-up."""
    from mtcnn import MTCNN

    package = MTCNN(device="CPU:0")
    rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # the package wants RGB; ours converts inside detect()
    ours = FaceDetector(model_dir, backend="onnxruntime", min_face_size=20, thresholds=THRESHOLDS)
    default = FaceDetector(model_dir, backend="onnxruntime")
    contenders = {
        "ours": lambda: ours.detect(frame),
        "ours_default": lambda: default.detect(frame),
        "package": lambda: package.detect_faces(rgb, min_face_size=20, threshold_pnet=THRESHOLDS[0],
                                                threshold_rnet=THRESHOLDS[1], threshold_onet=THRESHOLDS[2]),
    }
    faces = {name: len(call()) for name, call in contenders.items()}
    for _ in range(WARMUP - 1):
        for call in contenders.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, call in contenders.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    result = {name: {**_stats(samples), "faces": faces[name]} for name, samples in times.items()}
    package_p50 = result["package"]["p50_ms"]
    return {
        "frame": f"{frame.shape[1]}x{frame.shape[0]}",
        "runs": runs,
        **result,
        "speedup_p50": round(package_p50 / result["ours"]["p50_ms"], 1),
        "speedup_p50_default": round(package_p50 / result["ours_default"]["p50_ms"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    from model_export.bench import bench_frame

    parser = argparse.ArgumentParser(prog="python -m model_export.mtcnn_bench",
                                     description="p50/p95 latency of the edge's MTCNN against the `mtcnn` package "
                                                 "on one 640x480 frame (needs the package: affectedge[export])")
    parser.add_argument("runs", nargs="?", type=positive_int, default=30, help="timed calls per detector (default 30)")
    print(bench(bench_frame(), parser.parse_args(argv).runs))


if __name__ == "__main__":
    main()
