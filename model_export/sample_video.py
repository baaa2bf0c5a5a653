"""Builds ``edge_agent/sample/classroom.mp4``, the clip the demo and the edge tests play as a "camera".

What is in it, and why it is built rather than recorded:

* 640x480, 20 s at 25 frames/s, MPEG-4 Part 2 (``mp4v``, what every OpenCV build writes), about 1-2 MB.
* Real faces only: ``../shared/media/justin.jpg`` (a frontal, smiling face) plus FER2013 PublicTest
  faces from ``data/val/<class>/`` (48x48 gray, upscaled), laid out like learners at desks in front
  of a plain wall. A recorded classroom would carry identifiable people into the repository; these
  are the same public images the model is evaluated on.
* Gentle motion: each learner drifts a few pixels, sways (+-4 degrees) and leans (+-3% scale) on slow
  sinusoids, so tracking and alignment work between detections as with a webcam.
* Expression changes: every ~5 s each FER learner cross-fades (0.6 s) to a FER face of another class
  (happy -> neutral -> surprise -> sad ...). FER2013 has one photo per person, so this swaps the face
  in place; the tracker keeps its id because the box does not move.
* Every FER face is picked (deterministically: sorted file names) only if the edge's own detector,
  ``edge_agent.faces.mtcnn``, finds it at its size in the scene, frontal (|yaw| < 20 degrees). The script
  then re-reads the written video and reports in how many frames the detector finds every face.

Usage: ``python -m model_export.sample_video`` (the committed clip: justin + 3 FER learners), or
``--faces 1`` / ``--faces 8 --out /tmp/eight.mp4`` for the bench's one- and eight-face clips.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from affectedge.cli_args import positive_float, positive_int
from edge_agent.faces.mtcnn import FaceDetector
from edge_agent.quality import eye_distance, yaw_degrees

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "edge_agent" / "sample" / "classroom.mp4"
WIDTH, HEIGHT, FPS, SECONDS = 640, 480, 25, 20.0
SWAP_EVERY_S, FADE_S = 5.0, 0.6
CLASS_CYCLE = ("happy", "neutral", "surprise", "sad", "angry", "fear")


@dataclass
class Learner:
    faces: list[np.ndarray]   # BGR tiles, square, one per expression phase
    center: tuple[float, float]
    size: int
    phase: np.ndarray         # random phases of the motion sinusoids


def background() -> np.ndarray:
    """A plain classroom wall: warm gradient, a whiteboard, a desk edge."""
    ramp = np.linspace(0, 1, HEIGHT, dtype=np.float32)[:, None, None]
    wall = (1 - ramp) * np.array([200, 214, 222], np.float32) + ramp * np.array([150, 170, 185], np.float32)
    canvas = np.broadcast_to(wall, (HEIGHT, WIDTH, 3)).astype(np.uint8).copy()
    cv2.rectangle(canvas, (40, 20), (600, 70), (235, 238, 240), -1)
    cv2.rectangle(canvas, (40, 20), (600, 70), (120, 120, 120), 2)
    cv2.rectangle(canvas, (0, HEIGHT - 40), (WIDTH, HEIGHT), (60, 90, 130), -1)
    return canvas


def layout(n: int) -> tuple[list[tuple[float, float]], int]:
    """Cell centres and tile size for ``n`` learners in one or two rows."""
    if n == 1:
        return [(WIDTH / 2, HEIGHT / 2 + 10)], 230
    cols = math.ceil(n / 2)
    size = min(int(WIDTH / cols * 0.78), 175)
    rows_y = (150.0, 330.0)
    centers = [((c + 0.5) * WIDTH / cols, rows_y[r]) for r in range(2) for c in range(cols)][:n]
    return centers, size


def tile(image: np.ndarray, size: int) -> np.ndarray:
    """Square BGR tile; bilinear, because cubic upscaling of a 48 px JPEG rings around every edge."""
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def justin_face(media: Path) -> np.ndarray:
    """The photo cropped around the face so it fills the tile about as much as a FER crop does."""
    photo = cv2.imread(str(media / "justin.jpg"))
    if photo is None:
        raise SystemExit(f"{media / 'justin.jpg'} is missing: this script needs ../shared/media")
    return photo[50:330, 45:325]


def frontal_found(detector: FaceDetector, face: np.ndarray, seat: Learner, start: float,
                  backdrop: np.ndarray) -> bool:
    """Does the detector find ``face`` at ``seat`` as one frontal face all through its turn?"""
    alone = Learner([face], seat.center, seat.size, seat.phase)
    for t in np.linspace(start, start + SWAP_EVERY_S, 8):
        found = [f for f in detector.detect(render([alone], float(t), backdrop))
                 if f.box[0] < seat.center[0] < f.box[2] and f.box[1] < seat.center[1] < f.box[3]]
        if not (len(found) == 1 and abs(yaw_degrees(found[0].landmarks)) < 20
                and eye_distance(found[0].landmarks) > 15):
            return False
    return True


def pick_fer(val: Path, detector: FaceDetector, seat: Learner, turns: int, backdrop: np.ndarray,
             offset: int) -> list[np.ndarray]:
    """One detectable FER face per turn, cycling through the classes from ``offset``."""
    faces = []
    for k in range(turns):
        label = CLASS_CYCLE[(offset + k) % len(CLASS_CYCLE)]
        for path in sorted((val / label).glob("*.jpg"))[offset * 7:]:  # learners start at different files
            face = tile(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), seat.size)
            if frontal_found(detector, face, seat, k * SWAP_EVERY_S, backdrop):
                faces.append(face)
                break
        else:
            raise SystemExit(f"no detectable {label} face in {val / label}; is data/val complete?")
    return faces


def render(learners: list[Learner], t: float, backdrop: np.ndarray) -> np.ndarray:
    frame = backdrop.copy()
    for learner in learners:
        phase = t / SWAP_EVERY_S
        current = int(phase) % len(learner.faces)
        face = learner.faces[current].astype(np.float32)
        into_next = (phase - int(phase)) * SWAP_EVERY_S - (SWAP_EVERY_S - FADE_S)
        if into_next > 0 and len(learner.faces) > 1:
            alpha = into_next / FADE_S
            face = (1 - alpha) * face + alpha * learner.faces[(current + 1) % len(learner.faces)]
        p = learner.phase
        dx = 8 * math.sin(2 * math.pi * 0.13 * t + p[0])
        dy = 5 * math.sin(2 * math.pi * 0.09 * t + p[1])
        angle = 4 * math.sin(2 * math.pi * 0.07 * t + p[2])
        scale = 1 + 0.03 * math.sin(2 * math.pi * 0.05 * t + p[3])
        half = learner.size / 2
        matrix = cv2.getRotationMatrix2D((half, half), angle, scale)
        matrix[:, 2] += (learner.center[0] + dx - half, learner.center[1] + dy - half)
        warped = cv2.warpAffine(face, matrix, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)
        # feathered square mask, so the tile edge does not look like a hard frame
        mask = np.zeros((learner.size, learner.size), np.float32)
        edge = max(3, learner.size // 20)
        mask[edge:-edge, edge:-edge] = 1
        mask = cv2.warpAffine(cv2.GaussianBlur(mask, (0, 0), edge / 2), matrix, (WIDTH, HEIGHT))[..., None]
        frame = (frame * (1 - mask) + warped * mask).astype(np.uint8)
    return frame


def build(out: Path, faces: int, media: Path, val: Path, models: Path, seconds: float = SECONDS,
          fps: int = FPS, seed: int = 7) -> dict:
    """Write the clip; returns the detector's check of it (frames where it found every face)."""
    if not (1 <= faces <= 8):
        raise SystemExit("--faces must be between 1 and 8")
    detector = FaceDetector(models / "mtcnn", backend="onnxruntime", min_face_size=40)
    backdrop = background()
    centers, size = layout(faces)
    rng = np.random.default_rng(seed)
    learners = [Learner([tile(justin_face(media), size)], centers[0], size, rng.uniform(0, 2 * math.pi, 4))]
    for i, center in enumerate(centers[1:]):
        seat = Learner([], center, size, rng.uniform(0, 2 * math.pi, 4))
        seat.faces = pick_fer(val, detector, seat, math.ceil(seconds / SWAP_EVERY_S), backdrop, offset=i)
        learners.append(seat)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write {out} with the mp4v codec")
    frames = int(seconds * fps)
    for i in range(frames):
        writer.write(render(learners, i / fps, backdrop))
    writer.release()
    capture = cv2.VideoCapture(str(out))
    found_all = read = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        read += 1
        found_all += len(detector.detect(frame)) >= faces
    capture.release()
    return {"path": str(out), "frames": read, "bytes": out.stat().st_size, "faces": faces,
            "frames_with_every_face": found_all}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--faces", type=int, default=4, help="learners in the scene, 1-8 (default 4)")
    parser.add_argument("--seconds", type=positive_float, default=SECONDS)
    parser.add_argument("--fps", type=positive_int, default=FPS)
    parser.add_argument("--media", type=Path, default=ROOT.parent / "shared" / "media")
    parser.add_argument("--val", type=Path, default=ROOT / "data" / "val", help="FER2013 class folders")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    args = parser.parse_args(argv)
    report = build(args.out, args.faces, args.media, args.val, args.models, args.seconds, args.fps)
    share = report["frames_with_every_face"] / max(1, report["frames"])
    print(f"{report['path']}: {report['frames']} frames, {report['bytes'] / 1e6:.2f} MB, "
          f"detector found all {report['faces']} faces in {share:.1%} of frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
