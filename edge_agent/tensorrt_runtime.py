"""TensorRT execution of engines built by ``model_export build`` (NVIDIA GPUs only).

Imported lazily: on a CPU-only PC ``tensorrt``/``pycuda`` are absent and nothing here runs beyond
:func:`unavailable_reason`, which says which piece is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np

from edge_agent.inference import run_in_batches


@functools.cache
def unavailable_reason() -> str | None:
    """None when TensorRT can run here, else one line saying what is missing."""
    for module, package in (("tensorrt", "tensorrt"), ("pycuda", "pycuda")):
        if importlib.util.find_spec(module) is None:
            return f"the `{package}` Python package is not installed (pip install 'affectedge[tensorrt]')"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no NVIDIA GPU is visible (CUDA reports 0 devices)"
    except Exception as exc:  # the CUDA driver raises its own error types when no GPU/driver exists
        return f"no usable NVIDIA GPU/driver ({exc.__class__.__name__}: {exc})"
    return None


@functools.cache
def gpu_tag() -> str | None:
    """``<gpu-name>-sm<major><minor>``: engines are only valid on the GPU model they were built for."""
    if unavailable_reason():
        return None
    import pycuda.driver as cuda

    device = cuda.Device(0)
    major, minor = device.compute_capability()
    name = re.sub(r"[^a-z0-9]+", "-", device.name().lower()).strip("-")
    return f"{name}-sm{major}{minor}"


class EngineError(RuntimeError):
    """An engine file this TensorRT cannot load: ``auto`` falls back to ONNX Runtime, ``tensorrt`` stops."""


class TrtSession:
    """A deserialized engine with one execution context; inputs/outputs staged through pinned memory."""

    backend = "tensorrt"

    def __init__(self, engine_file: Path):
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda, self._trt = cuda, trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._file = engine_file
        self._engine = runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self._engine is None:
            raise EngineError(f"{engine_file} could not be deserialized (built by another TensorRT version?); "
                              "rebuild it with `model_export build`")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.max_batch = min(self._max_batch(n) for n in self.input_names)
        self.input_shape, self.output_shape = (
            tuple(d if d > 0 else None for d in self._engine.get_tensor_shape(names[0]))
            for names in (self.input_names, self.output_names))

    def _max_batch(self, name: str) -> int:
        """The largest batch (dimension 0) optimisation profile 0 accepts for input ``name``."""
        fixed = self._engine.get_tensor_shape(name)[0]
        return fixed if fixed > 0 else self._engine.get_tensor_profile_shape(name, 0)[2][0]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for ``inputs`` (batch along axis 0), in several runs when the batch exceeds the profile."""
        return run_in_batches(self._run_once, {n: inputs[n] for n in self.input_names}, self.max_batch)

    def _run_once(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        cuda, trt = self._cuda, self._trt
        keep = []
        for name in self.input_names:
            array = np.ascontiguousarray(inputs[name], dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
            if not self._context.set_input_shape(name, array.shape):
                raise RuntimeError(f"{self._file.name}: input {name} of shape {array.shape} is outside the engine's "
                                   "optimisation profile; rebuild it with `model_export build` for these shapes")
            device = cuda.mem_alloc(array.nbytes)
            cuda.memcpy_htod_async(device, array, self._stream)
            self._context.set_tensor_address(name, int(device))
            keep.append(device)
        outputs = []
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            host = cuda.pagelocked_empty(shape, trt.nptype(self._engine.get_tensor_dtype(name)))
            device = cuda.mem_alloc(host.nbytes)
            self._context.set_tensor_address(name, int(device))
            keep.append(device)
            outputs.append((host, device))
        if not self._context.execute_async_v3(self._stream.handle):
            raise RuntimeError(f"TensorRT could not run {self._file.name} (see its error above); rebuild the engine "
                               "with `model_export build` or set model.backend = \"onnxruntime\"")
        for host, device in outputs:
            cuda.memcpy_dtoh_async(host, device, self._stream)
        self._stream.synchronize()
        return [np.array(host) for host, _ in outputs]
