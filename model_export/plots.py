"""PNG plots for ``evaluate``: confusion matrix, ROC curves, per-class F1, learning curves."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from affectedge.labels import EMOTIONS

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"]


def confusion(report: dict, out: Path) -> Path:
    matrix = np.asarray(report["confusion"], dtype=float)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right")
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
    for i in range(len(EMOTIONS)):
        for j in range(len(EMOTIONS)):
            if matrix[i, j]:
                ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion (row-normalised), accuracy {report['accuracy']:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, out / "confusion_matrix.png")


def roc(labels: np.ndarray, probs: np.ndarray, report: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for k, name in enumerate(EMOTIONS):
        if name in report["auc"]["per_class"]:
            fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
            ax.plot(fpr, tpr, color=PALETTE[k], label=f"{name} (AUC {report['auc']['per_class'][name]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("One-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out / "roc_curves.png")


def f1_bars(report: dict, out: Path) -> Path:
    names = list(report["per_class"])
    values = [report["per_class"][n]["f1"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bars = ax.bar(names, values, color=[PALETTE[EMOTIONS.index(n)] for n in names])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(report["macro_f1"], color="k", ls="--", lw=0.8, label=f"macro F1 {report['macro_f1']:.3f}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.legend()
    return _save(fig, out / "per_class_f1.png")


def learning_curves(run_dir: Path, out: Path) -> Path | None:
    history = run_dir / "history.csv"
    if not history.exists():
        return None
    with history.open() as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
    acc.plot(epochs, [float(r["accuracy"]) for r in rows], label="train")
    acc.plot(epochs, [float(r["val_accuracy"]) for r in rows], label="val")
    loss.plot(epochs, [float(r["loss"]) for r in rows], label="train")
    loss.plot(epochs, [float(r["val_loss"]) for r in rows], label="val")
    acc.set_title("accuracy (train is on augmented faces)")
    loss.set_title("loss")
    for ax in (acc, loss):
        ax.set_xlabel("epoch")
        ax.legend()
    return _save(fig, out / "learning_curves.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
