"""Measure where MTCNN puts the 5 landmarks on FER2013 crops: the alignment template of the edge.

Webcam faces are warped onto :data:`edge_agent.faces.align.TEMPLATE` so they are framed like the
FER2013 faces the model learnt from. This command measures that framing: it upscales val faces
4x (MTCNN needs more than 48 px), detects landmarks, and prints their median in 48x48 coordinates.

    python -m model_export.align_template --data data/val
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from edge_agent.faces.align import SIZE
from edge_agent.faces.mtcnn import FaceDetector

SCALE, PAD = 4, 64


def measure(data: Path, models: Path, every: int = 6) -> tuple[np.ndarray, int, int]:
    """Median landmarks (5, 2) over every ``every``-th face, faces tried, faces found."""
    detector = FaceDetector(models / "mtcnn", backend="onnxruntime")
    files = sorted(data.glob("*/*.jpg"))[::every]
    found = []
    for path in files:
        face = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (SIZE * SCALE, SIZE * SCALE),
                          interpolation=cv2.INTER_CUBIC)
        frame = cv2.cvtColor(cv2.copyMakeBorder(face, PAD, PAD, PAD, PAD, cv2.BORDER_REPLICATE), cv2.COLOR_GRAY2BGR)
        faces = detector.detect(frame, max_faces=1)
        if faces:
            found.append((faces[0].landmarks - PAD) / SCALE)
    return np.median(np.asarray(found), axis=0), len(files), len(found)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=root / "data" / "val")
    parser.add_argument("--models", type=Path, default=root / "models")
    args = parser.parse_args()
    median, tried, found = measure(args.data, args.models)
    print(f"landmarks found on {found} of {tried} faces; median in 48x48 coordinates:")
    print(np.round(median.astype(float), 2).tolist())


if __name__ == "__main__":
    main()
