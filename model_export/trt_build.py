"""``model_export build``: one TensorRT engine per ONNX model, for the GPU of this machine.

Engines are specific to a GPU model and TensorRT version, so each file is named
``<model>.<gpu-tag>.engine`` next to its ONNX source (the edge's ``auto`` backend looks for exactly
that name) and ``engines.<gpu-tag>.json`` records TensorRT version, GPU, compute capability,
precision, optimisation profiles and the sha256 of each source ONNX. After building, every
engine is checked against ONNX Runtime and a table is printed: on the real faces of ``--calib``
when that folder exists, else on seeded noise faces (a lab PC holds no FER data, and only
``--int8``, which calibrates on them, needs real ones).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge_agent import tensorrt_runtime
from edge_agent.emotion_model import face_tensor, sha256
from edge_agent.faces.align import SIZE
from edge_agent.tensorrt_runtime import TrtSession, gpu_tag
from model_export.datasets import DatasetError, load_class_folders

__all__ = ["build_faces", "run", "unavailable_reason"]

#: Smallest / typical / largest spatial size for P-Net's dynamic H and W (an image-pyramid level).
PNET_HW = (12, 240, 1280)
#: faces per INT8 calibration batch: a --calib folder with fewer calibrates nothing
CALIB_BATCH = 32
#: faces read per class of --calib
PER_CLASS = 64
#: noise faces made without a --calib folder: 8 windows of the shipped model
NOISE_FACES = 64
CALIB_HINT = "pass --calib a folder with one sub-folder of real faces per class, e.g. FER2013's val split"


class BuildFaces(NamedTuple):
    images: np.ndarray  # (N, 48, 48) uint8
    described: str      # what they are, for the printed table and engines.<tag>.json


def unavailable_reason() -> str | None:
    """None when engines can be built here, else one line saying what is missing: what the agent's
    TensorRT runtime needs, and the ``onnx`` package the build reads each graph with."""
    if why := tensorrt_runtime.unavailable_reason():
        return why
    if importlib.util.find_spec("onnx") is None:
        return "the `onnx` Python package is not installed (pip install 'affectedge[tensorrt]')"
    return None


def build_faces(args: argparse.Namespace) -> BuildFaces:
    """The faces INT8 calibrates on and each engine is checked against ONNX Runtime with.

    Only ``--int8`` needs real ones, and a lab PC holds none: without it and without a ``--calib``
    folder the check runs on seeded noise faces (it compares the engine's numbers with ONNX
    Runtime's, not accuracy). Cheap, so the CLI calls it before TensorRT: a bad ``--calib`` is one
    line on any machine, not an error after minutes of building.
    """
    if not (args.int8 or args.calib.exists()):
        noise = np.random.default_rng(0).integers(0, 256, (NOISE_FACES, SIZE, SIZE), dtype=np.uint8)
        return BuildFaces(noise, "seeded noise faces (no --calib folder)")
    if not args.calib.is_dir():
        why = "--int8 calibrates on real faces, and " if args.int8 else ""
        raise DatasetError(f"{why}--calib {args.calib} is not a folder: {CALIB_HINT}")
    try:
        faces = load_class_folders(args.calib, limit_per_class=PER_CLASS).images
    except DatasetError as exc:
        raise DatasetError(f"--calib {args.calib}: {exc}") from exc
    if args.int8 and len(faces) < CALIB_BATCH:
        raise DatasetError(f"--calib {args.calib} holds {len(faces)} faces, fewer than one INT8 calibration "
                           f"batch ({CALIB_BATCH}): {CALIB_HINT}")
    return BuildFaces(faces, f"{len(faces)} real faces from {args.calib}")


def _profile_shapes(shape: list, max_batch: int) -> tuple[tuple, tuple, tuple]:
    """min/opt/max for one input: dim 0 is the batch, other dynamic dims are P-Net's H and W."""
    lo, opt, hi = [], [], []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            lo.append(dim), opt.append(dim), hi.append(dim)
        elif axis == 0:
            lo.append(1), opt.append(min(8, max_batch)), hi.append(max_batch)
        else:
            lo.append(PNET_HW[0]), opt.append(PNET_HW[1]), hi.append(PNET_HW[2])
    return tuple(lo), tuple(opt), tuple(hi)


def calibration_cache(onnx_path: Path, engine: Path) -> Path:
    """Where the INT8 scales for ``engine`` are kept: named after the source ONNX's sha256 (16 hex
    digits), so an engine built from a new encoder never reuses the scales calibrated on the old one."""
    return engine.with_name(f"{engine.stem}.{sha256(onnx_path)[:16]}.calib")


def _calibrator(faces: np.ndarray, cache_file: Path):
    """INT8 entropy calibrator over real aligned faces (encoder input layout)."""
    import pycuda.driver as cuda
    import tensorrt as trt

    class FaceCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches = [faces[i:i + CALIB_BATCH] for i in range(0, len(faces) - CALIB_BATCH + 1, CALIB_BATCH)]
            self.device = cuda.mem_alloc(CALIB_BATCH * SIZE * SIZE * 4)

        def get_batch_size(self):
            return CALIB_BATCH

        def get_batch(self, names):
            if not self.batches:
                return None
            batch = face_tensor(self.batches.pop())
            cuda.memcpy_htod(self.device, np.ascontiguousarray(batch))
            return [int(self.device)]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.exists() else None

        def write_calibration_cache(self, cache):
            cache_file.write_bytes(bytes(cache))

    return FaceCalibrator()


def build_engine(onnx_path: Path, out: Path, args: argparse.Namespace, calib_faces: np.ndarray | None) -> dict:
    import onnx
    import tensorrt as trt

    from model_export import graph_fusion

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # ONNX Runtime's fused attention (a contrib operator) goes back to standard operators for the parser
    if not parser.parse(graph_fusion.expand_attention(onnx.load(str(onnx_path))).SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace << 20)
    precision = "fp32"
    if args.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        precision = "fp16"
    if calib_faces is not None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(calib_faces, calibration_cache(onnx_path, out))
        precision = "int8+fp16" if args.fp16 else "int8"
    cache_bytes = args.timing_cache.read_bytes() if args.timing_cache and args.timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    profiles = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes = _profile_shapes(list(tensor.shape), args.max_batch)
        profile.set_shape(tensor.name, *shapes)
        profiles[tensor.name] = {"min": shapes[0], "opt": shapes[1], "max": shapes[2]}
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path}")
    out.write_bytes(bytes(serialized))
    if args.timing_cache:
        args.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"engine": out.name, "source": onnx_path.name, "source_sha256": sha256(onnx_path),
            "precision": precision, "profiles": profiles}


def validate(onnx_path: Path, engine: Path, inputs: dict[str, np.ndarray]) -> dict:
    """Same inputs through ONNX Runtime and the engine: max |Δ| and top-1 agreement of the first output."""
    from edge_agent.inference import OrtSession

    ref = OrtSession(onnx_path).run(inputs)[0]
    got = TrtSession(engine).run(inputs)[0].astype(np.float32)
    agreement = float((ref.reshape(len(ref), -1).argmax(1) == got.reshape(len(got), -1).argmax(1)).mean())
    return {"max_abs_diff": float(np.abs(ref - got).max()), "top1_agreement": agreement}


def _check_inputs(onnx_path: Path, faces: np.ndarray, window: int, models: Path) -> dict[str, np.ndarray]:
    """Inputs built from ``faces`` for any of the shipped graphs, in that graph's own layout."""
    import cv2
    import onnx

    from edge_agent.inference import OrtSession

    faces = np.resize(faces, (8 * window, *faces.shape[1:]))  # 8 windows: a small --calib folder's faces repeat
    if onnx_path.stem == "head":
        emb = OrtSession(models / "encoder.onnx").run({"face": face_tensor(faces)})[0]
        return {"embeddings": emb.reshape(8, window, -1)}
    graph_input = onnx.load(str(onnx_path)).graph.input[0]
    dims = [d.dim_value or 0 for d in graph_input.type.tensor_type.shape.dim]
    if dims[-1] == 1:  # the encoder: (N, 48, 48, 1) in [0, 1]
        return {graph_input.name: face_tensor(faces)}
    channels_last = dims[-1] == 3
    h, w = (dims[1], dims[2]) if channels_last else (dims[2], dims[3])
    h, w = h or 96, w or 96  # P-Net's dynamic H, W: a 96x96 pyramid level
    colour = np.stack([cv2.cvtColor(cv2.resize(f, (w, h)), cv2.COLOR_GRAY2BGR) for f in faces[:16]])
    x = (colour.astype(np.float32) - 127.5) / 128.0
    return {graph_input.name: x if channels_last else x.transpose(0, 3, 1, 2).copy()}


def run(args: argparse.Namespace, faces: BuildFaces | None = None) -> dict:
    """Build, check and record the engines; ``faces`` as :func:`build_faces` returns them for ``args``
    (read here when not given)."""
    import pycuda.driver as cuda
    import tensorrt as trt

    if faces is None:
        faces = build_faces(args)
    tag = gpu_tag()
    models: Path = args.models
    manifest = json.loads((models / "manifest.json").read_text())
    window = int(manifest["window"])
    sources = {"encoder": models / "encoder.onnx", "head": models / "head.onnx"}
    sources.update({n: models / "mtcnn" / f"{n}.onnx" for n in ("pnet", "rnet", "onet")})
    device = cuda.Device(0)
    record = {"tensorrt": trt.__version__, "gpu": device.name(), "compute_capability": ".".join(
        map(str, device.compute_capability())), "engines": {}, "checked_on": faces.described}
    table = []
    for name, onnx_path in sources.items():
        if not onnx_path.exists():
            continue
        engine = onnx_path.with_name(f"{onnx_path.stem}.{tag}.engine")
        print(f"building {engine.name} ...", flush=True)
        calib = faces.images if args.int8 and name == "encoder" else None
        entry = build_engine(onnx_path, engine, args, calib)
        entry["validation"] = validate(onnx_path, engine, _check_inputs(onnx_path, faces.images, window, models))
        record["engines"][name] = entry
        table.append((name, entry["precision"], entry["validation"]["max_abs_diff"],
                      entry["validation"]["top1_agreement"]))
    (models / f"engines.{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"engines against ONNX Runtime on {faces.described}:")
    print(f"{'model':<10}{'precision':<12}{'max |Δ|':>12}{'top-1 agree':>14}")
    for name, precision, diff, agree in table:
        print(f"{name:<10}{precision:<12}{diff:>12.2e}{agree:>14.2%}")
    return record
