"""A model with a view cycle (``ensemble --cycle``): a track's k-th face through view k mod V, at the
edge, in ``evaluate`` and in ``clip.onnx`` alike."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS
from edge_support import needs_models
from onnx import TensorProto, helper

from edge_agent.config import DetectionSection, QualitySection
from edge_agent.emotion_model import EmotionModel, ModelError, face_tensor
from edge_agent.faces.mtcnn import FaceDetector
from edge_agent.faces.views import through, view_set
from edge_agent.pipeline import CameraPipeline
from edge_agent.quality import QualityGate
from model_export import views
from model_export.datasets import load_class_folders
from model_export.evaluate import Predictor

CYCLE = view_set(True, (8.0, -8.0))


@pytest.fixture(scope="module")
def faces(fer_val: Path) -> np.ndarray:
    return load_class_folders(fer_val, limit_per_class=3).images


def _shipped_with(folder: Path, cycle: tuple) -> Path:
    """The shipped model files with the given view cycle in the manifest (none: no ``view_cycle``)."""
    shutil.copytree(MODELS, folder, ignore=shutil.ignore_patterns("*.engine", "encoder.int8.onnx", "members"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("view_cycle", None)
    if cycle:
        manifest["view_cycle"] = [view.to_manifest() for view in cycle]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def cycled_models(tmp_path: Path) -> Path:
    """The shipped model, told to cycle through the face, its mirror and their ±8° rotations."""
    return _shipped_with(tmp_path / "cycled", CYCLE)


@pytest.fixture
def plain_models(tmp_path: Path) -> Path:
    """The shipped model without a view cycle."""
    return _shipped_with(tmp_path / "plain", ())


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_the_cycle_nodes_are_the_numpy_views_frame_by_frame(faces: np.ndarray, opset: int) -> None:
    window = 8
    nodes, weights, out = views.cycle_nodes("clip", CYCLE, window)
    graph = helper.make_graph(nodes, "cycle", [helper.make_tensor_value_info("clip", TensorProto.FLOAT,
                                                                             ["N", window, 48, 48, 1])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["M", 48, 48, 1])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    x = face_tensor(faces[:16])
    frames = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"clip": x.reshape(2, window, 48, 48, 1)})[0]
    expected = through(x, CYCLE, np.tile(np.arange(window) % len(CYCLE), 2))
    np.testing.assert_allclose(frames, expected, atol=1e-6)
    assert np.abs(frames - x).max() > 0.1  # frames 1 to 7 were turned


@needs_models
def test_the_edge_reads_the_cycle_and_embeds_each_face_through_its_view(cycled_models: Path, plain_models: Path,
                                                                     faces: np.ndarray) -> None:
    model = EmotionModel.load(cycled_models, backend="onnxruntime")
    plain = EmotionModel.load(plain_models, backend="onnxruntime")
    assert model.views == CYCLE and plain.views == ()
    which = np.arange(len(faces)) % 9  # past the end of the cycle: modulo V
    expected = plain.encoder.run({"face": through(face_tensor(faces), CYCLE, which % len(CYCLE))})[0]
    np.testing.assert_allclose(model.embed(faces, which), expected, atol=1e-6)
    np.testing.assert_allclose(model.embed(faces), plain.embed(faces), atol=1e-6)  # no views given: as is
    # a still photo is a window of its views in turn, one pass per view
    still = Predictor(model).still(faces[:4])
    per_view = [model.embed(faces[:4], np.full(4, k)) for k in range(len(CYCLE))]
    windows = np.stack([per_view[t % len(CYCLE)] for t in range(model.window)], axis=1)
    np.testing.assert_allclose(still, model.classify(windows), atol=1e-6)


@needs_models
def test_a_malformed_cycle_is_a_one_line_model_error(cycled_models: Path) -> None:
    path = cycled_models / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["view_cycle"] = [{"mirror": True}]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match='"view_cycle" must list objects with "mirror" and "rotate"'):
        EmotionModel.load(cycled_models, backend="onnxruntime")


@needs_models
def test_a_tracks_frames_go_through_the_views_in_turn(cycled_models: Path, shared_media: Path) -> None:
    photo = cv2.imread(str(shared_media / "justin.jpg"))
    canvas = np.full((480, 640, 3), 128, np.uint8)
    canvas[40:40 + photo.shape[0], 120:120 + photo.shape[1]] = photo
    model = EmotionModel.load(cycled_models, backend="onnxruntime")
    detector = FaceDetector(MODELS / "mtcnn", backend="onnxruntime")
    pipeline = CameraPipeline("cam0", detector, model, QualityGate(QualitySection()), DetectionSection(every=1),
                              itertools.count(1))
    crops = []
    original = model.embed

    def embed(faces: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        crops.append(faces.copy())
        return original(faces, views)

    model.embed = embed
    for i in range(3):
        pipeline.process(canvas, 1000.0 + i / 10)
    (window,) = pipeline.windows.values()
    assert window.count == 3 and len(crops) == 3 and all(len(c) == 1 for c in crops)
    for k, crop in enumerate(crops):  # the k-th frame of the track through view k
        np.testing.assert_allclose(window.embeddings[k], original(crop, np.array([k]))[0], atol=1e-6)
    assert np.abs(window.embeddings[2] - window.embeddings[0]).max() > 1e-3


def test_a_young_tracks_window_holds_its_views_in_turn() -> None:
    """Until a track has T faces its window is padded: with a view cycle by its embeddings in turn,
    so the head sees consecutive views as it learnt them, not view 0 over and over."""
    from edge_agent.pipeline import Window
    from edge_agent.quality import Quality

    GOOD = Quality(eye_distance=40.0, sharpness=100.0, yaw_deg=0.0, detector_confidence=0.99, score=1.0, reason=None)
    for cycled, expected in ((True, [1, 2, 0, 1, 2, 0, 1, 2]), (False, [0, 0, 0, 0, 0, 0, 1, 2])):
        window = Window(8, 1, cycled)
        for k in range(3):
            window.push(np.array([k], np.float32), 1000.0 + k, GOOD)
        assert window.sequence()[:, 0].tolist() == expected
        for k in range(3, 10):
            window.push(np.array([k], np.float32), 1000.0 + k, GOOD)
        assert window.sequence()[:, 0].tolist() == list(range(2, 10))  # a full window: the last T, in order
