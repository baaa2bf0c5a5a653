"""MTCNN on ONNX (edge_agent.faces.mtcnn) against the ``mtcnn`` package its nets were exported from.

The package (TensorFlow) is the reference: same faces, boxes within IoU 0.9 and landmarks within
3 px, on a real photo and on frames built from FER2013 val faces. The package only works with
``min_face_size`` <= 20 (larger values make it feed P-Net a level below 12 px and return nothing),
so parity runs at 20 with the thresholds of the edge (0.6, 0.7, 0.7).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.faces.mtcnn import MAX_BATCH, Face, FaceDetector, run_batched
from edge_agent.inference import open_session

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "mtcnn"
THRESHOLDS = (0.6, 0.7, 0.7)
#: FER2013 val faces are 48x48 crops; upscaled to roughly the size of a face in a 640x480 webcam frame.
FER_FACE_PX = 150
FER_SLOTS = ((40, 60), (250, 250), (450, 90))


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(MODEL_DIR, backend="onnxruntime", min_face_size=20, thresholds=THRESHOLDS)


@pytest.fixture(scope="module")
def reference():
    """The TensorFlow ``mtcnn`` package, built once per module (loading TF costs seconds)."""
    pytest.importorskip("tensorflow", reason="the reference needs TensorFlow (pip install 'affectedge[export]')")
    mtcnn = pytest.importorskip("mtcnn", reason="the reference is the `mtcnn` package (affectedge[export])")
    return mtcnn.MTCNN(device="CPU:0")


def package_faces(reference, frame_bgr: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """(box x1y1x2y2, score, landmarks 5x2) per face found by the package with our settings."""
    rows = reference.detect_faces(
        cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB), min_face_size=20, threshold_pnet=THRESHOLDS[0],
        threshold_rnet=THRESHOLDS[1], threshold_onet=THRESHOLDS[2], box_format="xyxy", output_type="numpy",
    )
    # numpy rows: image id, x1, y1, x2, y2, score, x of the 5 keypoints, y of the 5 keypoints
    return [(row[1:5], float(row[5]), np.stack([row[6:11], row[11:16]], axis=1)) for row in rows]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_same_faces(ours: list[Face], theirs: list, where: str) -> None:
    assert len(ours) == len(theirs), f"{where}: {len(ours)} faces vs the package's {len(theirs)}"
    for box, score, landmarks in theirs:
        match = max(ours, key=lambda face: iou(face.box, box))
        assert iou(match.box, box) >= 0.9, f"{where}: box {match.box} vs package {box}"
        error = np.abs(match.landmarks - landmarks).max()
        assert error <= 3.0, f"{where}: landmarks off by {error:.2f} px"
        assert match.score == pytest.approx(score, abs=0.05)


def fer_frame(paths: list[Path]) -> np.ndarray:
    """FER faces upscaled and pasted on a 640x480 frame with a smooth lighting gradient."""
    ys, xs = np.mgrid[0:480, 0:640]
    frame = (90 + 60 * xs / 640 + 30 * ys / 480).astype(np.uint8)
    for path, (x, y) in zip(paths, FER_SLOTS, strict=True):
        face = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        frame[y:y + FER_FACE_PX, x:x + FER_FACE_PX] = cv2.resize(
            face, (FER_FACE_PX, FER_FACE_PX), interpolation=cv2.INTER_CUBIC
        )
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def fer_frames(fer_val: Path) -> list[np.ndarray]:
    files = sorted(fer_val.glob("*/*.jpg"))
    picked = [files[i] for i in np.random.default_rng(0).choice(len(files), 12, replace=False)]
    return [fer_frame(picked[i:i + len(FER_SLOTS)]) for i in range(0, len(picked), len(FER_SLOTS))]


def test_onnx_files_pass_checker():
    onnx = pytest.importorskip("onnx")
    for name in ("pnet", "rnet", "onet"):
        model = onnx.load(MODEL_DIR / f"{name}.onnx")
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version >= 17
        assert not any(node.op_type == "Neg" for node in model.graph.node), "PReLU was not fused"


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 12, 12), (1, 37, 50), (3, 97, 64), (1, 288, 384)])
def test_pnet_accepts_several_input_sizes(batch, height, width):
    session = open_session(MODEL_DIR / "pnet.onnx", backend="onnxruntime")
    image = np.random.default_rng(1).uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)
    boxes, scores = session.run({session.input_names[0]: image})
    # 3x3 conv, 2x2/2 "same" pooling, two 3x3 convs: one output cell per 12 px window, stride 2
    cells = (batch, -(-(height - 2) // 2) - 4, -(-(width - 2) // 2) - 4)
    assert boxes.shape == (*cells, 4)
    assert scores.shape == (*cells, 2)
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, atol=1e-5)


def test_batches_larger_than_max_batch_are_split_transparently():
    session = open_session(MODEL_DIR / "onet.onnx", backend="onnxruntime")
    crops = np.random.default_rng(2).uniform(-1, 1, (2 * MAX_BATCH + 5, 48, 48, 3)).astype(np.float32)
    whole = session.run({session.input_names[0]: crops})
    for split, direct in zip(run_batched(session, crops), whole, strict=True):
        np.testing.assert_allclose(split, direct, atol=1e-5)


def test_onnx_nets_match_keras_on_real_inputs(reference, detector, shared_media):
    onnx = pytest.importorskip("onnx")
    from model_export.mtcnn_export import NETS, parity

    rgb = cv2.cvtColor(cv2.imread(str(shared_media / "justin.jpg")), cv2.COLOR_BGR2RGB)
    levels = [level[None] for _, level in detector._pyramid(rgb)]
    proposals = detector._propose(rgb)
    inputs = {"pnet": levels[:4], "rnet": [detector._crop(rgb, proposals, 24)],
              "onet": [detector._crop(rgb, proposals, 48)]}
    for name, (stage_id, _, _) in NETS.items():
        keras_net = reference.get_stage(stage_id=stage_id).model
        proto = onnx.load(MODEL_DIR / f"{name}.onnx")
        for x in inputs[name]:
            assert parity(keras_net, proto, x) < 1e-4, f"{name} on input {x.shape}"


def test_matches_package_on_a_photo(detector, reference, shared_media):
    photo = cv2.imread(str(shared_media / "justin.jpg"))
    ours = detector.detect(photo)
    assert len(ours) == 1
    assert_same_faces(ours, package_faces(reference, photo), "justin.jpg")
    face = ours[0]
    assert face.box.dtype == np.float32 and face.box.shape == (4,)
    assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (5, 2)
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_matches_package_on_fer_frames(detector, reference, fer_frames):
    found = 0
    for index, frame in enumerate(fer_frames):
        theirs = package_faces(reference, frame)
        assert_same_faces(detector.detect(frame), theirs, f"FER frame {index}")
        found += len(theirs)
    assert found >= len(fer_frames) * len(FER_SLOTS) - 2, "the package itself should find nearly every face"


def test_no_face_on_a_photo_without_faces(detector, shared_media):
    assert detector.detect(cv2.imread(str(shared_media / "no-faces.jpg"))) == []


def test_best_faces_first_and_max_faces(detector, fer_frames):
    faces = detector.detect(fer_frames[1])
    assert len(faces) == 3
    scores = [face.score for face in faces]
    assert scores == sorted(scores, reverse=True)
    top = detector.detect(fer_frames[1], max_faces=2)
    assert [face.score for face in top] == scores[:2]


def test_default_min_face_size_still_finds_webcam_sized_faces(fer_frames, shared_media):
    default = FaceDetector(MODEL_DIR, backend="onnxruntime")
    assert default.min_face_size == 40
    assert len(default.detect(fer_frames[1])) == 3
    assert default.detect(cv2.imread(str(shared_media / "no-faces.jpg"))) == []


def test_gray_and_bgra_frames(detector, shared_media):
    photo = cv2.imread(str(shared_media / "justin.jpg"))
    colour = detector.detect(photo)[0]
    for frame in (cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA)):
        faces = detector.detect(frame)
        assert len(faces) == 1 and iou(faces[0].box, colour.box) > 0.8


def test_rejects_bad_frames_and_settings(detector):
    with pytest.raises(ValueError, match="8-bit"):
        detector.detect(np.zeros((48, 48, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        detector.detect(np.zeros((48, 48, 2), np.uint8))
    with pytest.raises(ValueError, match="min_face_size"):
        FaceDetector(MODEL_DIR, min_face_size=8)
    assert detector.detect(np.zeros((10, 10, 3), np.uint8)) == []


def test_edge_never_imports_tensorflow():
    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from edge_agent.faces.mtcnn import FaceDetector\n"
        f"FaceDetector(Path({str(MODEL_DIR)!r}), backend='onnxruntime').detect(np.zeros((120, 160, 3), np.uint8))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'mtcnn', 'tf2onnx'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_net_whose_keras_side_gives_nan_fails_parity() -> None:
    """Python's max() drops a NaN that is not first, and NaN > tolerance is False: a broken net passed."""
    onnx = pytest.importorskip("onnx")
    from model_export.mtcnn_export import parity

    proto = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "mtcnn" / "rnet.onnx"))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
    session = open_session(Path(__file__).resolve().parents[1] / "models" / "mtcnn" / "rnet.onnx", "onnxruntime")
    outputs = session.run({session.input_names[0]: x})
    broken = [outputs[0], np.full_like(outputs[1], np.nan)]  # the second output NaN
    assert parity(lambda _: outputs, proto, x) == 0.0
    assert np.isnan(parity(lambda _: broken, proto, x))
