"""Dataset loaders, augmentation, clip synthesis and class weights (no TensorFlow needed)."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from affectedge.labels import EMOTIONS
from edge_agent.faces import views
from model_export import clips
from model_export.augment import JITTER, LIGHT, TRAIN, perturb
from model_export.datasets import (
    DatasetError,
    load_cached,
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


def test_ferplus_majority_is_the_most_voted_of_all_columns(tmp_path: Path) -> None:
    pixels = " ".join(["7"] * 2304)
    fer = tmp_path / "fer2013.csv"
    fer.write_text("emotion,pixels,Usage\n" + f"0,{pixels},PublicTest\n" * 3)
    votes = tmp_path / "fer2013new.csv"
    votes.write_text("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n"
                     "PublicTest,a.png,4,1,0,0,0,0,0,2,2,1\n"  # neutral has the most votes: kept
                     "PublicTest,b.png,3,0,0,0,0,0,0,0,4,3\n"  # unknown wins: dropped
                     "PublicTest,c.png,3,0,0,0,0,0,0,3,0,0\n")  # neutral ties with contempt: dropped
    assert load_ferplus(fer, votes, {"PublicTest"}).labels.tolist() == [EMOTIONS.index("neutral")]


@pytest.mark.parametrize(("row", "message"), [
    ("x,{rest} 7,Training", "fer2013.csv row 3: emotion 'x' is not a FER2013 code 0-6"),
    ("7,{rest} 7,Training", "fer2013.csv row 3: emotion '7' is not a FER2013 code 0-6"),
    ("1,{rest} 7 9,Training", "fer2013.csv row 3: the pixels field has 2305 values"),
    ("1,{rest} 256,Training", "fer2013.csv row 3: a pixel is outside 0-255 (7 to 256)"),
    ("1,{rest} a,Training", "fer2013.csv row 3: the pixels field holds a value that is not a whole number"),
])
def test_a_bad_fer2013_row_is_named_with_its_row(tmp_path: Path, row: str, message: str) -> None:
    rest = " ".join(["7"] * 2303)  # all but the last pixel
    fer = tmp_path / "fer2013.csv"
    fer.write_text(f"emotion,pixels,Usage\n3,{rest} 7,Training\n" + row.format(rest=rest) + "\n")
    with pytest.raises(DatasetError, match="fix or delete the row") as error:
        load_fer2013_csv(fer, {"Training"})
    assert str(error.value).startswith(f"{fer.parent}/{message}")


def test_ferplus_files_that_do_not_fit_are_clear_errors(tmp_path: Path) -> None:
    pixels = " ".join(["7"] * 2304)
    fer = tmp_path / "fer2013.csv"
    fer.write_text("emotion,pixels,Usage\n" + f"0,{pixels},Training\n" * 2)
    votes = tmp_path / "fer2013new.csv"
    header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n"
    votes.write_text(header + "Training,a.png,0,0,0,0,0,0,0,0,9,0\n")
    with pytest.raises(DatasetError, match=f"^{votes} has 1 rows but {fer} has 2: FER"):
        load_ferplus(fer, votes, {"Training"})
    votes.write_text(header + "Training,a.png,0,0,0,0,0,0,0,0,9,0\n" * 2)
    with pytest.raises(DatasetError, match=f"^{votes} has no row with Usage in \\['Training'\\] and a clear"):
        load_ferplus(fer, votes, {"Training"})
    fer.unlink()
    with pytest.raises(DatasetError, match=f"^{fer} does not exist: FER\\+ votes"):
        load_split(votes, "train")


def test_the_face_cache_follows_the_data_it_was_read_from(tmp_path: Path, caplog) -> None:
    _write_faces(tmp_path / "a" / "train" / "happy", 2, 10)
    _write_faces(tmp_path / "b" / "train" / "sad", 3, 50)
    cache = tmp_path / "run" / "cache"
    assert load_cached(tmp_path / "a", "train", cache).labels.tolist() == [EMOTIONS.index("happy")] * 2
    assert load_cached(tmp_path / "a", "train", cache).paths == []  # the same data: read from the cache
    with caplog.at_level(logging.INFO):
        assert load_cached(tmp_path / "b", "train", cache).labels.tolist() == [EMOTIONS.index("sad")] * 3
    assert f"came from {(tmp_path / 'a' / 'train').resolve()} (2 files" in caplog.text
    _write_faces(tmp_path / "b" / "train" / "sad", 4, 50)  # a face added to the same folder
    assert len(load_cached(tmp_path / "b", "train", cache).paths) == 4


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


def test_clip_indices_of_a_one_class_folder_have_no_transition() -> None:
    labels = np.zeros(10, dtype=np.int64)  # evaluate --clips on a folder of happy faces only
    rng = np.random.default_rng(0)
    for i in range(100):
        faces, _ = clips.clip_indices(len(labels), labels, i % 10, 8, rng, 4)
        assert (faces == i % 10).all()


@pytest.mark.parametrize("window", [1, 2, 3])
def test_clip_indices_of_short_windows_end_on_the_labelled_face(window: int) -> None:
    labels = np.array([0, 1] * 5)
    rng = np.random.default_rng(0)
    prefixes = set()
    for i in range(300):
        faces, views = clips.clip_indices(len(labels), labels, i % 10, window, rng, 4)
        assert faces.shape == views.shape == (window,) and faces[-1] == i % 10
        prefixes.add(int((labels[faces] != labels[i % 10]).sum()))
    assert max(prefixes) < window and (1 in prefixes) == (window > 1)  # transitions, never the whole clip


def test_embedding_bank_reports_progress_in_a_log_without_a_terminal(caplog, monkeypatch) -> None:
    """Under nohup or CI there is no progress bar: a line at each tenth says how far and how long."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under pytest -s
    faces = np.random.default_rng(0).integers(0, 256, (100, 48, 48), dtype=np.uint8)
    caplog.set_level(logging.INFO, logger="model_export.clips")
    bank = clips.embedding_bank(lambda batch: batch.reshape(len(batch), -1)[:, :3].astype(np.float32), faces,
                                np.random.default_rng(1), views=4, chunk=10)
    assert bank.shape == (100, 4, 3)
    np.testing.assert_array_equal(bank[:, 0], faces.reshape(100, -1)[:, :3])  # view 0 is the face as is
    lines = [r.getMessage() for r in caplog.records if r.name == "model_export.clips"]
    assert len(lines) == 9 and lines[0].startswith("embedding views: 40 of 400 faces (10%), about ")
    assert lines[-1].startswith("embedding views: 360 of 400 faces (90%)")


def test_with_a_view_cycle_no_view_is_always_the_clean_face() -> None:
    """Each cycle entry is the face as is for about a quarter of the faces and jittered for the rest:
    with view 0 always clean, a head learnt to trust the frames at view 0's place in its window."""
    faces = np.random.default_rng(0).integers(0, 256, (400, 48, 48), dtype=np.uint8)
    cycle = views.view_set(True, (8.0,))
    seen: list[int] = []

    def embed(batch: np.ndarray, view) -> np.ndarray:
        seen.append(cycle.index(view))
        return batch.reshape(len(batch), -1).astype(np.float32)

    bank = clips.embedding_bank(embed, faces, np.random.default_rng(1), cycle=cycle)
    assert bank.shape == (400, len(cycle), 48 * 48) and seen == list(range(len(cycle)))
    clean = (bank == faces.reshape(400, 1, -1)).all(axis=2)  # (faces, views): shown as is
    assert ((clean.mean(axis=0) > 0.15) & (clean.mean(axis=0) < 0.35)).all(), clean.mean(axis=0)


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
