"""Views of a face (``edge_agent.faces.views`` and their ONNX nodes in ``model_export.views``): the
rotation the edge and the graphs run is OpenCV's."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.faces import views as face_views
from model_export import views
from model_export.datasets import load_class_folders


@pytest.fixture(scope="module")
def faces(fer_val: Path) -> np.ndarray:
    return load_class_folders(fer_val, limit_per_class=4).images


@pytest.mark.parametrize("degrees", [8.0, -8.0, 30.0])
def test_rotation_is_opencvs_with_the_border_reflected(faces: np.ndarray, degrees: float) -> None:
    """The views measured in MODEL_CARD.md were made with cv2.warpAffine; the graph must make the same
    ones (OpenCV rounds to whole grey levels, hence at most half a level apart)."""
    matrix = cv2.getRotationMatrix2D((23.5, 23.5), degrees, 1.0)
    expected = np.stack([cv2.warpAffine(face, matrix, (48, 48), flags=cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_REFLECT_101) for face in faces])
    rotated = face_views.rotate(faces.astype(np.float32), degrees)
    assert np.abs(rotated - expected).max() <= 0.51
    assert np.abs(rotated - faces).mean() > 5  # and it did turn the faces


def test_the_view_set_is_closed_under_mirroring(faces: np.ndarray) -> None:
    """Rotating the mirror by -θ is mirroring the face rotated by +θ, so with the mirror and ±θ the
    mean embedding cannot tell which way the face is mirrored."""
    x = faces.astype(np.float32)
    a = views.all_views(x, True, (8.0, -8.0))
    b = views.all_views(face_views.mirror(x), True, (8.0, -8.0))
    assert len(a) == 6
    # b = [m, f, R+ m, R+ f, R- m, R- f] with m = the mirror; R+ m is the mirror of R- f, and so on
    for i, j in ((0, 0), (1, 1), (2, 4), (3, 5), (4, 2), (5, 3)):
        np.testing.assert_allclose(b[i], face_views.mirror(a[j]), atol=1e-4)


def test_describe_names_every_view() -> None:
    assert views.describe(False, ()) == "none"
    assert views.describe(True, ()) == "each member: mean of the face and its mirror image"
    assert views.describe(True, (8.0, -8.0)) == ("each member: mean of the face and its mirror image, as is and "
                                                 "rotated by +8°, -8°")
