"""The emotion model as the edge runs it: encoder per face, BiLSTM head per window.

Reads ``models/manifest.json`` (written by ``model_export export``), checks the class order and
the files' sha256, and opens ``encoder.onnx`` and ``head.onnx`` on ONNX Runtime or TensorRT.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affectedge.labels import EMOTIONS
from edge_agent.faces.views import View, through
from edge_agent.inference import ModelError, Session, open_session, sha256

log = logging.getLogger(__name__)


#: what the edge reads from manifest.json, and what each must be; the rest is for people and the offline tools
REQUIRED: dict[str, tuple[type, str]] = {
    "classes": (list, "a list of class names"), "version": (str, "a string"),
    "window": (int, "a whole number"), "embed_dim": (int, "a whole number"), "files": (dict, "an object"),
}


def unreadable(path: Path | str, models_dir: Path) -> ModelError:
    """A model file or folder this user may not read, typically copied by root with a private umask:
    chmod fixes it, restarting cannot, so it is a ModelError (exit 2) and not a traceback."""
    return ModelError(f"cannot read {path} (permission denied): make the model files readable by the user the "
                      f"agent runs as, e.g. chmod -R a+rX {models_dir}")


def read_manifest(models_dir: Path) -> dict:
    """The manifest, checked for every key the edge reads, so a truncated or hand-edited one is a one-line
    ModelError naming the key instead of a KeyError wherever it is first used."""
    path = models_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        # absolute: a relative model.dir is resolved from the working directory, which is what usually went wrong
        raise ModelError(f"{path.absolute()} is missing: point model.dir at the shipped models/ folder") from None
    except PermissionError:
        raise unreadable(path, models_dir) from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); reinstall the model files") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{path} is not a JSON object; reinstall the model files")
    for key, (kind, what) in REQUIRED.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ModelError(f'{path}: "{key}" is missing or not {what}; reinstall the model files')
    if tuple(manifest["classes"]) != EMOTIONS:
        raise ModelError(f"{path} lists classes {manifest['classes']}; this software expects {list(EMOTIONS)}")
    for key in ("encoder", "head"):
        file_entry(manifest, key, path)
    return manifest


def file_entry(manifest: dict, key: str, path: Path) -> dict:
    """``files.<key>`` of the manifest at ``path``, checked to name its file and that file's sha256."""
    entry = manifest["files"].get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)):
        raise ModelError(f'{path}: "files.{key}" is missing or has no "file" and "sha256"; reinstall the model files')
    return entry


def _dim(shape: tuple[int | None, ...], index: int) -> int | None:
    return shape[index] if -len(shape) <= index < len(shape) else None


def check_dims(sessions: dict[str, Session], paths: dict[str, Path], window: int, embed_dim: int) -> None:
    """The manifest's ``window`` and ``embed_dim`` against the shapes the ONNX files declare: a hand-edited
    manifest or a mis-exported model otherwise loads and fails on the first face, as an ONNX Runtime traceback."""
    found = [(paths["encoder"], "embed_dim", embed_dim, _dim(sessions["encoder"].output_shape, -1)),
             (paths["head"], "window", window, _dim(sessions["head"].input_shape, 1)),
             (paths["head"], "embed_dim", embed_dim, _dim(sessions["head"].input_shape, -1))]
    for path, key, declared, actual in found:
        if actual is not None and actual != declared:
            raise ModelError(f'{path} has {key} {actual} but manifest.json declares "{key}": {declared}; '
                             "re-export the model (model_export export) or reinstall the model files")


def view_cycle(manifest: dict, models_dir: Path) -> tuple[View, ...]:
    """The manifest's ``view_cycle`` (``model_export ensemble --cycle``), empty when it has none."""
    entries = manifest.get("view_cycle") or []
    try:
        return tuple(View.from_manifest(entry) for entry in entries)
    except (KeyError, TypeError, ValueError):
        raise ModelError(f'{models_dir / "manifest.json"}: "view_cycle" must list objects with "mirror" and '
                         '"rotate"; reinstall the model files') from None


def face_tensor(faces: np.ndarray) -> np.ndarray:
    """(N, 48, 48) uint8 aligned faces -> (N, 48, 48, 1) float32 in [0, 1]: the encoder's input
    (the manifest's ``normalisation``), one definition for the edge and every offline tool."""
    return faces.astype(np.float32)[..., None] * np.float32(1 / 255)


@dataclass
class EmotionModel:
    encoder: Session
    head: Session
    window: int
    embed_dim: int
    version: str
    int8: bool = False
    #: the manifest's ``view_cycle``: a track's k-th face goes through ``views[k mod V]`` (none: as is)
    views: tuple[View, ...] = ()

    @property
    def backend(self) -> str:
        """What the encoder runs on, as status messages and benches report it: ``onnxruntime-int8``
        names the quantized encoder, like ``model_export bench --backend``."""
        return f"{self.encoder.backend}-int8" if self.int8 else self.encoder.backend

    @classmethod
    def load(cls, models_dir: Path, backend: str = "auto", threads: int | None = None,
             verify: bool = True, int8: bool = False) -> EmotionModel:
        """``int8`` picks the statically quantized encoder (``model_export quantize``) for CPUs."""
        manifest = read_manifest(models_dir)
        sessions: dict[str, Session] = {}
        paths: dict[str, Path] = {}
        for name in ("encoder", "head"):
            key = "encoder_int8" if name == "encoder" and int8 else name
            if key not in manifest["files"]:
                raise ModelError(f"manifest.json lists no {key} model: run `model_export quantize` first")
            entry = file_entry(manifest, key, models_dir / "manifest.json")
            path = paths[name] = models_dir / entry["file"]
            try:
                checked = verify and path.exists()
                if checked and sha256(path) != entry["sha256"]:
                    raise ModelError(f"{path} does not match the sha256 in manifest.json; reinstall the model files")
                sessions[name] = open_session(path, backend, threads, entry["sha256"] if checked else None)
            except PermissionError as exc:  # the file, or its engine (exc.filename)
                raise unreadable(exc.filename or path, models_dir) from None
        check_dims(sessions, paths, manifest["window"], manifest["embed_dim"])
        model = cls(sessions["encoder"], sessions["head"], manifest["window"],
                    manifest["embed_dim"], manifest["version"], int8, view_cycle(manifest, models_dir))
        log.info("model %s on %s (window %d%s)", model.version, model.backend, model.window,
                 f", {len(model.views)} views in turn along each track" if model.views else "")
        return model

    def embed(self, faces: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """(N, 48, 48) uint8 aligned faces -> (N, D) float32 embeddings; with a view cycle, face i
        is seen through view ``views[i] mod V`` (each view warped once for all its faces)."""
        x = face_tensor(faces)
        if self.views and views is not None:
            x = through(x, self.views, np.asarray(views) % len(self.views))
        return self.encoder.run({"face": x})[0]

    def classify(self, windows: np.ndarray) -> np.ndarray:
        """(N, T, D) embeddings -> (N, 7) probabilities in EMOTIONS order."""
        return self.head.run({"embeddings": np.ascontiguousarray(windows, dtype=np.float32)})[0]
