"""``models/manifest.json``: what the edge needs to know about the shipped model files.

Written by ``export`` (files, shapes, opset, source), extended by ``evaluate`` (val metrics) and
``build``/``quantize``; read by :mod:`edge_agent.emotion_model`. Keys are merged, never dropped,
so each command can update its own part (a section holding one measurement is replaced whole:
:func:`replace_sections`); a command that writes a new encoder therefore starts from :func:`clear_model`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from affectedge.labels import EMOTIONS
from edge_agent.emotion_model import ModelError, sha256
from edge_agent.faces.align import SIZE


def path_of(models_dir: Path) -> Path:
    return models_dir / "manifest.json"


def read(models_dir: Path) -> dict:
    path = path_of(models_dir)
    return json.loads(path.read_text()) if path.exists() else {}


#: Files that belong to one encoder: a command writing a new one rewrites or drops them all.
MODEL_FILES = ("manifest.json", "encoder.onnx", "encoder.int8.onnx", "head.onnx", "clip.onnx")


def clear_model(models_dir: Path) -> None:
    """Delete the previous model's files in ``models_dir`` (other files, e.g. ``mtcnn/``, stay).

    Why: :func:`update` merges, so without this an old ``encoder.int8.onnx`` with its manifest
    entries (``files.encoder_int8``, ``quantization``, ``val_metrics``, ``parity``) would survive
    a new encoder, and an edge with ``int8 = true`` would run the old one.
    """
    for name in MODEL_FILES:
        (models_dir / name).unlink(missing_ok=True)


def replace_model(staging: Path, models_dir: Path) -> None:
    """Move a complete model (ONNX files and manifest) from ``staging`` into ``models_dir``,
    after :func:`clear_model` there; ``staging`` must be on the same file system (a sibling)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    clear_model(models_dir)
    for path in staging.iterdir():
        path.replace(models_dir / path.name)


@contextlib.contextmanager
def staged_model(models_dir: Path, purpose: str) -> Iterator[Path]:
    """A sibling folder to write a whole model into, moved into ``models_dir`` (:func:`replace_model`)
    only when the block ends without an error, and removed in any case.

    Why: a sibling is on the same file system, so the files move in by rename, and ``models_dir``
    stays untouched until the caller's checks pass: a failed check or a crash never leaves ONNX files
    there without their manifest.
    """
    models_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{models_dir.name}.{purpose}-", dir=models_dir.parent))
    try:
        yield staging
        replace_model(staging, models_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def update(models_dir: Path, **sections) -> dict:
    """Merge ``sections`` into the manifest (dict values merged one level deep) and write it."""
    return _write(models_dir, sections, merge=True)


def replace_sections(models_dir: Path, **sections) -> dict:
    """Set ``sections`` in the manifest whole, dropping what they held before, and write it.

    For a section that describes one measurement (``val_metrics``): merged, a key of an earlier
    one (``clip_mode`` of a run with ``--clips``) would stand next to figures it was not measured with.
    """
    return _write(models_dir, sections, merge=False)


def _write(models_dir: Path, sections: dict, merge: bool) -> dict:
    manifest = read(models_dir)
    manifest.setdefault("classes", list(EMOTIONS))
    manifest.setdefault("input", {"size": SIZE, "channels": 1, "layout": "NHWC", "dtype": "float32",
                                  "normalisation": "pixel / 255 (the encoder rescales to [-1, 1] itself)",
                                  "alignment": "5-point similarity transform (edge_agent/faces/align.py)"})
    for key, value in sections.items():
        if merge and isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    path = path_of(models_dir)
    try:  # Python would write a bare NaN, which is not JSON: strict readers refuse the whole file
        text = json.dumps(manifest, indent=2, allow_nan=False)
    except ValueError:
        raise ModelError(f"not writing {path}: a figure in it is NaN or infinite, so the model or its "
                         "measurement is broken; check the command's output above") from None
    path.write_text(text + "\n")
    return manifest


#: The repository: recorded paths are relative to it, whatever the working directory was.
ROOT = Path(__file__).resolve().parents[1]


def shown(path: Path | str) -> str:
    """``path`` relative to the repository when inside it, as the README's commands name it.

    Manifests ship to machines where the build machine's home paths mean nothing, and the same
    file must be recorded the same way whichever folder a command was started from.
    """
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


PATH_SETTINGS = ("data", "run_dir", "init_from", "teacher")


def shown_training(settings: dict) -> dict:
    """Training settings as a manifest records them: their paths through :func:`shown`.

    ``model_export``'s defaults are absolute (``data/`` under the repository), and a manifest ships
    to machines where the build machine's paths mean nothing.
    """
    def recorded(value: str | list[str]) -> str | list[str]:
        return [shown(v) for v in value] if isinstance(value, list | tuple) else shown(value)

    return {k: recorded(v) if k in PATH_SETTINGS and v is not None else v for k, v in settings.items()}


def opset_of(path: Path) -> int:
    """The default-domain (``ai.onnx``) opset an ONNX file was written with, as the file says.

    Recorded from the file rather than from a command's default, so ``--opset`` is reported truly.
    """
    model = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def file_entry(path: Path, models_dir: Path, **extra) -> dict:
    """A manifest ``files`` entry: path, sha256, size and, for an ONNX file, its opset."""
    opset = {"opset": opset_of(path)} if path.suffix == ".onnx" else {}
    return {"file": str(path.relative_to(models_dir)), "sha256": sha256(path),
            "bytes": path.stat().st_size, **opset, **extra}
