"""Train, evaluate, export and build the emotion model (``python -m model_export --help``)."""

import csv
import math
from pathlib import Path

#: the ONNX opset ``model_export export`` writes unless told otherwise, and the MTCNN nets' (``mtcnn_export``)
OPSET = 17
#: the oldest opset accepted: at 12 the encoder tf2onnx exports fails in ONNX Runtime, and the
#: views ``ensemble`` builds need ``ReduceSum`` with its axes as an input, which came in 13
MIN_OPSET = 13

#: the largest |difference| an exported or rewritten ONNX file may show against what it was made from, on real faces
PARITY_TOLERANCE = 1e-4

#: what each training stage writes into its run folder (:mod:`model_export.train`); ``train`` refuses
#: to start over them without --resume or --overwrite, and a fresh stage 1 deletes them all
STAGE_FILES = {"encoder": ("encoder_best.keras", "encoder_last.keras", "history.csv"),
               "head": ("head.keras", "head_history.csv")}


def completed_epochs(history: Path) -> int:
    """Stage-1 epochs a run's ``history.csv`` records (0 without one): where ``--resume`` goes on from.

    Here, not in :mod:`model_export.train`, so the CLI can check a run before TensorFlow loads.
    """
    if not history.exists():
        return 0
    with history.open() as handle:
        return sum(1 for _ in csv.DictReader(handle))


def worst_diff(checks: dict) -> float:
    """The largest ``..._diff`` figure of a parity report, NaN when any of them is NaN.

    Why: a model that outputs NaN (e.g. trained at a NaN learning rate) must fail the parity gate,
    but ``NaN > tolerance`` is False and ``max`` skips a NaN that does not come first; callers
    therefore refuse ``not worst <= PARITY_TOLERANCE``.
    """
    diffs = [float(v) for k, v in checks.items() if k.endswith("diff")]
    return math.nan if any(math.isnan(d) for d in diffs) else max(diffs)
