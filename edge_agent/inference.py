"""One interface over the two inference engines the edge runs: ONNX Runtime and TensorRT.

``open_session(onnx_path, backend)`` returns an object with ``run(inputs) -> list[np.ndarray]``
and ``input_names``. ``auto`` picks TensorRT when a serialized engine built for *this* GPU sits
next to the ONNX file (``<name>.<gpu-tag>.engine``, see ``model_export build``) and falls back to
ONNX Runtime, logging why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from affectedge.errors import first_line

log = logging.getLogger(__name__)

# ONNX Runtime keeps a telemetry device id and event store under ~/.cache unless this is set before
# it is imported; the edge must write nothing outside its spool and send nothing but labels.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class ModelError(RuntimeError):
    """The shipped model files are missing, corrupt or do not match this software (or the backend
    asked for cannot run here): restarting cannot fix it, so the CLI reports it as a config error."""


#: a tensor's shape as a model file declares it: None for a dynamic dimension (the batch, usually)
Shape = tuple[int | None, ...]


class Session(Protocol):
    backend: str
    input_names: list[str]
    input_shape: Shape  # of the first input, which the manifest's window and embed_dim are checked against
    output_shape: Shape  # of the first output

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OrtSession:
    """ONNX Runtime on CPU, sized for a shared lab PC (threads capped, no spinning)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # spinning threads burn a core while idle between frames; a lab PC has other work to do
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's error types (InvalidProtobuf, Fail, ...) share no base but Exception
            raise ModelError(f"{path} does not load ({first_line(exc, 200)}): the file is corrupt or "
                             "truncated; reinstall the model files (deploy/systemd/install.sh)") from None
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.input_shape = _static(self._session.get_inputs()[0].shape)
        self.output_shape = _static(self._session.get_outputs()[0].shape)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self.output_names, inputs)


def _static(shape) -> Shape:
    """ONNX Runtime's shape (ints, and names or None for dynamic dimensions) as a :data:`Shape`."""
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def run_in_batches(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], inputs: dict[str, np.ndarray],
                   max_batch: int) -> list[np.ndarray]:
    """``run`` over ``inputs`` (batch along axis 0) in runs of at most ``max_batch``, outputs joined in order.

    Why: a camera may see more faces than a TensorRT profile accepts (``model_export build
    --max-batch``), MTCNN's R- and O-Net get hundreds of candidate crops on a busy frame, and the
    offline tools run tens of thousands of faces; one run when the batch fits.
    """
    size = len(next(iter(inputs.values())))
    if size <= max_batch:
        return run(inputs)
    parts = [run({name: array[start:start + max_batch] for name, array in inputs.items()})
             for start in range(0, size, max_batch)]
    return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def engine_path(onnx_path: Path, onnx_sha256: str | None = None) -> Path | None:
    """The TensorRT engine built for this machine's GPU next to ``onnx_path``, if any."""
    from edge_agent import tensorrt_runtime

    tag = tensorrt_runtime.gpu_tag()
    return None if tag is None else pick_engine(onnx_path, tag, onnx_sha256)


def engine_record(engine: Path, tag: str) -> dict | None:
    """``model_export build``'s entry for ``engine`` in ``engines.<tag>.json`` (in the models dir,
    which is the engine's folder or, for mtcnn/, its parent), or None when there is none."""
    for folder in (engine.parent, engine.parent.parent):
        try:
            record = json.loads((folder / f"engines.{tag}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for entry in record.get("engines", {}).values():
            if entry.get("engine") == engine.name:
                return entry
    return None


def pick_engine(onnx_path: Path, tag: str, onnx_sha256: str | None = None) -> Path | None:
    """``<stem>.<tag>.engine`` next to ``onnx_path`` unless its build record says it was built from
    another ONNX file: an engine left over from an older model would give that model's answers.
    ``onnx_sha256`` is the file's hash when the caller has just checked it, so it is not read twice."""
    engine = onnx_path.with_name(f"{onnx_path.stem}.{tag}.engine")
    if not engine.exists():
        return None
    entry = engine_record(engine, tag)
    built_from = entry.get("source_sha256") if entry else None
    if built_from and built_from != (onnx_sha256 or sha256(onnx_path)):
        log.warning("ignoring %s: it was built from another %s; rebuild it with `model_export build`",
                    engine, onnx_path.name)
        return None
    return engine


def open_session(onnx_path: Path, backend: str = "auto", threads: int | None = None,
                 onnx_sha256: str | None = None) -> Session:
    """Open ``onnx_path`` (or its TensorRT engine) on the requested backend; ``onnx_sha256``, the
    file's hash if the caller has verified it, spares hashing it again to match an engine."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if not onnx_path.exists():
        raise FileNotFoundError(f"model file {onnx_path} is missing: run `model_export export` or reinstall")
    if backend in ("auto", "tensorrt"):
        from edge_agent import tensorrt_runtime

        why = tensorrt_runtime.unavailable_reason()
        engine = None if why else engine_path(onnx_path, onnx_sha256)
        if engine is not None:
            try:
                return tensorrt_runtime.TrtSession(engine)
            except tensorrt_runtime.EngineError as exc:  # corrupt, or built by another TensorRT
                if backend == "tensorrt":
                    raise ModelError(str(exc)) from None
                log.warning("using ONNX Runtime for %s: %s", onnx_path.name, exc)
                return OrtSession(onnx_path, threads)
        why = why or f"no engine for this GPU next to {onnx_path.name} (run `model_export build --fp16`)"
        if backend == "tensorrt":
            raise ModelError(f"model.backend = \"tensorrt\" but {why}; or set model.backend = \"auto\"")
        log.info("using ONNX Runtime for %s: %s", onnx_path.name, why)
    return OrtSession(onnx_path, threads)
