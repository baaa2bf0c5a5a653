"""Dataset loaders, augmentation, clip synthesis and class weights (no TensorFlow needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from affectedge.labels import EMOTIONS
from model_export import clips
from model_export.augment import JITTER, LIGHT, TRAIN, perturb
from model_export.datasets import (
    DatasetError,
    load_class_folders,
    load_clip_folders,
    load_fer2013_csv,
    load_ferplus,
    load_split,
)


def _write_faces(folder: Path, n: int, value: int, size: int = 64, colour: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = np.full((size, size, 3) if colour else (size, size), value + i, np.uint8)
        cv2.imwrite(str(folder / f"{i}.png"), image)


def test_class_folders_synonyms_case_and_unknown(tmp_path: Path, caplog) -> None:
    _write_faces(tmp_path / "Happiness", 3, 10, colour=True)
    _write_faces(tmp_path / "ANGER", 2, 50)
    _write_faces(tmp_path / "contempt", 2, 90)
    with caplog.at_level(logging.WARNING):
        faces = load_class_folders(tmp_path)
    assert faces.images.shape == (5, 48, 48) and faces.images.dtype == np.uint8
    assert sorted(faces.labels.tolist()) == [EMOTIONS.index("angry")] * 2 + [EMOTIONS.index("happy")] * 3
    assert "contempt" in caplog.text


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        load_class_folders(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no labelled images"):
        load_class_folders(tmp_path)


def test_fer2013_csv_and_ferplus_votes(tmp_path: Path) -> None:
    pixels = " ".join(["7"] * 2304)
    fer = tmp_path / "fer2013.csv"
    fer.write_text("emotion,pixels,Usage\n" + f"3,{pixels},Training\n" + f"0,{pixels},PublicTest\n"
                   + f"6,{pixels},PublicTest\n")
    train = load_fer2013_csv(fer, {"Training"})
    assert train.labels.tolist() == [EMOTIONS.index("happy")]
    assert load_split(fer, "val").labels.tolist() == [EMOTIONS.index("angry"), EMOTIONS.index("neutral")]
    votes = tmp_path / "fer2013new.csv"
    header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n"
    votes.write_text(header + "Training,a.png,0,8,2,0,0,0,0,0,0,0\n"
                     + "PublicTest,b.png,5,5,0,0,0,0,0,0,0,0\n"  # tie: dropped
                     + "PublicTest,c.png,1,0,0,7,0,0,0,0,2,0\n")
    assert load_ferplus(fer, votes, {"Training"}).labels.tolist() == [EMOTIONS.index("happy")]
    assert load_split(votes, "val").labels.tolist() == [EMOTIONS.index("sad")]


def test_perturb_keeps_shape_range_and_is_seeded() -> None:
    faces = np.random.default_rng(0).integers(0, 255, (16, 48, 48), dtype=np.uint8)
    a = perturb(faces, np.random.default_rng(1), TRAIN)
    b = perturb(faces, np.random.default_rng(1), TRAIN)
    assert a.shape == faces.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    jitter = perturb(faces, np.random.default_rng(2), JITTER)
    assert np.abs(jitter - faces / 255.0).mean() < np.abs(a - faces / 255.0).mean()


def test_light_augmentation_adds_no_noise_blur_or_occlusion() -> None:
    # a flat face stays flat under warps and exposure changes; noise and occluders break it up
    flat = np.full((64, 48, 48), 128, np.uint8)
    light = perturb(flat, np.random.default_rng(3), LIGHT)
    assert light.std(axis=(1, 2)).max() < 1e-5
    assert np.ptp(light.mean(axis=(1, 2))) > 0.05  # exposure still varies between faces
    assert (perturb(flat, np.random.default_rng(3), TRAIN).std(axis=(1, 2)) > 0.01).sum() > 10


def test_clip_indices_transitions_and_drops() -> None:
    labels = np.array([0, 1, 2, 3] * 10)
    rng = np.random.default_rng(0)
    saw_transition = saw_drop = False
    for i in range(200):
        faces, views = clips.clip_indices(len(labels), labels, i % len(labels), 8, rng, 4)
        assert faces[-1] == i % len(labels)  # the last frames always show the labelled face
        other = faces != i % len(labels)
        if other.any():
            saw_transition = True
            assert not other[other.argmin():].any()  # the other expression only opens the clip
            assert labels[faces[0]] != labels[i % len(labels)]
        saw_drop |= any(faces[t] == faces[t - 1] and views[t] == views[t - 1] for t in range(1, 8))
    assert saw_transition and saw_drop


def test_class_weights_soften_imbalance() -> None:
    pytest.importorskip("keras")
    from model_export.train import class_weights

    counts = np.array([3995, 436, 4097, 7215, 4830, 3171, 4965])
    w = class_weights(counts, 0.5)
    assert w[1] == w.max() and w[3] == w.min()
    assert np.isclose((w * counts).sum(), counts.sum())
    assert np.allclose(class_weights(counts, 0.0), 1.0)


def test_clip_folders_sample_the_window_evenly(tmp_path: Path) -> None:
    _write_faces(tmp_path / "sad" / "clip-a", 10, 0)
    _write_faces(tmp_path / "Surprised" / "clip-b", 3, 100)
    _write_faces(tmp_path / "unknown-class" / "clip-c", 3, 100)
    clips_found = load_clip_folders(tmp_path, window=4)
    assert clips_found.frames.shape == (2, 4, 48, 48)
    assert clips_found.labels.tolist() == [EMOTIONS.index("surprise"), EMOTIONS.index("sad")]  # name order
    assert clips_found.frames[1, :, 0, 0].tolist() == [0, 3, 6, 9]  # frames 0, 3, 6, 9 of 10
    assert clips_found.frames[0, :, 0, 0].tolist() == [100, 101, 101, 102]  # a short clip repeats frames
    with pytest.raises(DatasetError, match="no clips"):
        load_clip_folders(tmp_path / "sad" / "clip-a", window=4)
