"""Reading the model files a command is given, with errors that say which file and what to do.

Why: ``onnx.load`` raises protobuf's ``DecodeError`` on a file that is not ONNX and loads an empty
file as an empty model, and ``keras.models.load_model`` reports any unreadable ``.keras`` file as
"File not found"; users saw tracebacks, or a missing file that was there. Each failure here is a
one-line :class:`ModelError` (exit status 2 in ``model_export``); ``-v`` logs the library's reason.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from edge_agent.emotion_model import ModelError

log = logging.getLogger(__name__)


def _missing(path: Path, hint: str) -> ModelError:
    return ModelError(f"{path} does not exist: {hint}")


def load_onnx(path: Path, hint: str) -> onnx.ModelProto:
    """The ONNX model in ``path``, checked to be one (``onnx.checker``); ``hint`` says what to do if not."""
    if not path.exists():
        raise _missing(path, hint)
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (OSError, DecodeError, onnx.checker.ValidationError):
        log.debug("cannot load %s", path, exc_info=True)
        raise ModelError(f"{path} is not a readable ONNX model: {hint}") from None
    return model


def load_keras(path: Path, hint: str):
    """The Keras model saved in ``path`` (a ``.keras`` file of :mod:`model_export.model`'s layers)."""
    import keras

    from model_export.model import ModelConfig  # noqa: F401  (registers the custom layers load_model needs)

    if not path.exists():
        raise _missing(path, hint)
    try:
        return keras.models.load_model(path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        # Keras says "File not found" for any file it cannot open as a .keras archive, and a
        # TypeError or KeyError for an archive whose layers this version does not define
        log.debug("cannot load %s", path, exc_info=True)
        raise ModelError(f"{path} is not a Keras model this version can read: {hint}") from None
