"""Face crops in the model's input format: the one implementation used by training and the edge.

Two entry points:

* :func:`to_model_input` — an image that already is a face crop (FER2013 style) -> 48x48 gray.
* :func:`align_face` — a frame plus 5 MTCNN landmarks -> a 48x48 gray crop, by a similarity
  transform onto :data:`TEMPLATE`, the landmark positions of an average FER2013 crop.
"""

from __future__ import annotations

import cv2
import numpy as np

SIZE = 48

#: Where the 5 landmarks (left eye, right eye, nose, left mouth corner, right mouth corner) sit in
#: a typical 48x48 FER2013 crop, so aligned webcam faces are framed like the training data.
#: Measured with ``python -m model_export.align_template`` (median over 533 val faces: eyes
#: (15.0, 18.6) / (32.8, 18.3), nose (24.0, 28.4), mouth (16.6, 37.3) / (31.6, 37.0)), made
#: left-right symmetric about x = 24.
TEMPLATE = np.array(
    [[15.1, 18.45], [32.9, 18.45], [24.0, 28.4], [16.5, 37.15], [31.5, 37.15]], dtype=np.float32
)


def to_gray(image: np.ndarray) -> np.ndarray:
    """BGR, BGRA or gray (any dtype OpenCV reads) -> single-channel uint8."""
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3:
        image = image[:, :, 0]
    if image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return image


def to_model_input(image: np.ndarray) -> np.ndarray:
    """A face crop of any size and colour -> (48, 48) uint8 gray."""
    gray = to_gray(image)
    if gray.shape != (SIZE, SIZE):
        interp = cv2.INTER_AREA if min(gray.shape) > SIZE else cv2.INTER_LINEAR
        gray = cv2.resize(gray, (SIZE, SIZE), interpolation=interp)
    return gray


def similarity_transform(landmarks: np.ndarray) -> np.ndarray:
    """2x3 matrix mapping the 5 landmarks onto TEMPLATE (least squares, no shear)."""
    matrix, _ = cv2.estimateAffinePartial2D(
        np.asarray(landmarks, dtype=np.float32), TEMPLATE, method=cv2.LMEDS
    )
    if matrix is None:
        raise ValueError("landmarks are degenerate (collinear or coincident); cannot align face")
    return matrix


def align_face(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Warp ``frame`` so the landmarks land on TEMPLATE; returns (48, 48) uint8 gray."""
    gray = to_gray(frame)
    return cv2.warpAffine(
        gray, similarity_transform(landmarks), (SIZE, SIZE),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
    )
