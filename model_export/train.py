"""``model_export train``: stage 1 trains the encoder on single frames, stage 2 the BiLSTM head on clips.

A run directory holds everything needed to resume, evaluate and export::

    RUN/config.json          architecture + training settings
    RUN/encoder_last.keras   stage 1 checkpoint (every epoch, with optimizer state, for --resume)
    RUN/encoder_best.keras   stage 1 frame classifier with the best val accuracy
    RUN/history.csv          stage 1 learning curves
    RUN/cache/               decoded faces (rebuilt when --data changes) and a teacher's probabilities
    RUN/head.keras           stage 2 temporal head;  RUN/head_history.csv its curves
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np

from affectedge.labels import EMOTIONS
from edge_agent.emotion_model import face_tensor
from edge_agent.faces.views import View
from model_export import STAGE_FILES, clips, completed_epochs
from model_export.augment import PRESETS, AugmentConfig, perturb
from model_export.datasets import Faces, load_cached, load_clip_folders
from model_export.loading import load_keras
from model_export.model import INPUT_SIZE, ModelConfig, build_encoder, build_frame_classifier, build_head

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    run_dir: str
    epochs: int = 50
    head_epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    augment: str = "webcam"  # a model_export.augment.PRESETS name
    xla: str = "auto"  # compile stage-1 steps with XLA: "auto", "on" or "off" (see _jit)
    class_weight_power: float = 0.5
    seed: int = 1337
    init_from: str | None = None  # an exported encoder.onnx to start stage 1 from (model_export.warm_start)
    teacher: list[str] | None = None  # exported model folders whose averaged probabilities stage 1 also learns
    distill_weight: float = 0.5  # share of the teacher's probabilities in each stage-1 target


def class_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """Inverse-frequency weights softened by ``power`` (0 = none, 1 = fully balanced).

    FER2013 has 16x more happy than disgust faces; fully balanced weights cost accuracy on the
    common classes, none leave disgust unlearned. The square root (power 0.5) is the compromise.
    """
    weights = (counts.sum() / (len(counts) * np.maximum(counts, 1))) ** power
    return (weights / (weights * counts).sum() * counts.sum()).astype(np.float32)


def teacher_cache(teacher: Path, cache_dir: Path) -> Path:
    """Where one teacher's probabilities are kept: named by its encoder and head, so two models
    that share an encoder (a release, and its encoder with a retrained head) never read each other's."""
    from edge_agent.emotion_model import read_manifest

    files = read_manifest(teacher)["files"]
    return cache_dir / f"teacher-{files['encoder']['sha256'][:16]}-{files['head']['sha256'][:16]}.npy"


def teacher_probabilities(teachers: list[Path], faces: Faces, cache_dir: Path) -> np.ndarray:
    """``(N, 7)`` probabilities of exported models, averaged: several folders teach as one late fusion.

    Each model runs each face as a still window through ONNX Runtime, exactly as ``model_export
    evaluate`` runs it, and its probabilities are cached per encoder and head for --resume. They are
    computed once on the un-augmented faces: a mirror-averaged teacher gives a flipped face the
    same answer, and the small warps of augmentation rarely change what a face shows. Averaging
    folders (e.g. two releases) builds a stronger teacher without training a head for it.
    """
    from edge_agent.emotion_model import EmotionModel
    from model_export.evaluate import Predictor, metrics

    fused = []
    for teacher in teachers:
        cache = teacher_cache(teacher, cache_dir)
        probs = np.load(cache) if cache.exists() else None
        if probs is None or len(probs) != len(faces):
            log.info("running the teacher %s on %d training faces", teacher, len(faces))
            probs = Predictor(EmotionModel.load(teacher, backend="onnxruntime")).still(faces.images)
            cache_dir.mkdir(parents=True, exist_ok=True)
            np.save(cache, probs)
        log.info("teacher %s: accuracy on the training faces %.4f", teacher, metrics(faces.labels, probs)["accuracy"])
        fused.append(probs)
    probs = np.mean(fused, axis=0).astype(np.float32)
    if len(teachers) > 1:
        log.info("the %d teachers averaged: accuracy on the training faces %.4f", len(teachers),
                 metrics(faces.labels, probs)["accuracy"])
    return probs


def frame_targets(labels: np.ndarray, teacher_probs: np.ndarray | None = None, weight: float = 0.0) -> np.ndarray:
    """One target distribution per face: its label, mixed with a teacher's probabilities.

    Knowledge distillation (Hinton et al., 2015): the teacher's spread over the other classes
    (this fear face looks a bit surprised) carries more than the one crowd label, which FER2013
    often gets wrong. It is how an ensemble's accuracy reaches a single encoder's speed.
    """
    onehot = np.eye(len(EMOTIONS), dtype=np.float32)[labels]
    if teacher_probs is None:
        return onehot
    return ((1 - weight) * onehot + weight * teacher_probs).astype(np.float32)


class FrameBatches(keras.utils.PyDataset):
    """Shuffled, augmented single-frame batches of (face, target distribution, class weight)."""

    def __init__(self, faces: Faces, targets: np.ndarray, batch_size: int, weights: np.ndarray, seed: int,
                 augment: AugmentConfig | None):
        super().__init__(workers=2, use_multiprocessing=False)
        self.faces, self.targets, self.batch_size, self.weights = faces, targets, batch_size, weights
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(faces)) if augment is not None else np.arange(len(faces))

    def __len__(self) -> int:
        return int(np.ceil(len(self.faces) / self.batch_size))

    def __getitem__(self, index: int):
        idx = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = self.faces.images[idx]
        if self.augment is not None:
            x = perturb(images, np.random.default_rng(self.rng.integers(1 << 63)), self.augment)
        else:
            x = images.astype(np.float32) / 255.0
        return x[..., None], self.targets[idx], self.weights[self.faces.labels[idx]]

    def on_epoch_end(self) -> None:
        if self.augment is not None:
            self.order = self.rng.permutation(len(self.faces))


def _schedule(cfg: TrainConfig, steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up to the peak rate, then cosine decay to zero at the last epoch."""
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1) * steps
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate / 100,
        warmup_target=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=cfg.epochs * steps - warmup,
    )


def _best_so_far(history: Path) -> float | None:
    """Best val accuracy already reached, so a resumed run keeps a better earlier checkpoint."""
    if not history.exists():
        return None
    with history.open() as handle:
        scores = [float(row["val_accuracy"]) for row in csv.DictReader(handle)]
    return max(scores) if scores else None


def _cpu_has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell, keep XLA
        return False


def _jit(cfg: TrainConfig) -> bool | str:
    """Whether stage 1 runs XLA-compiled: ``cfg.xla`` "on"/"off", or "auto" to pick by the CPU.

    Keras' own "auto" leaves XLA off on TensorFlow. Which is faster depends on the CPU (stage 1,
    batch 128, 2 cores): XLA halved an epoch on an AMD EPYC with AVX2, but an epoch took 192 s with
    it against 150 s without on an Intel Xeon with AVX-512 and AMX, and 40 training steps of the
    default encoder took 40.2 s with it against 31.3 s without on an AMD EPYC with AVX-512 (median
    of 3 whole processes each). Without XLA TensorFlow runs oneDNN's kernels, which use AVX-512
    where the CPU has it; "auto" therefore turns XLA off on AVX-512 CPUs and on elsewhere.
    """
    if cfg.xla == "off":
        return False
    if keras.backend.backend() != "tensorflow":
        return "auto"
    return cfg.xla == "on" or not _cpu_has_avx512()


def train_encoder(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool, verbose: int = 1) -> Path:
    """Stage 1. Returns the path of the best frame classifier."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    train = load_cached(Path(cfg.data), "train", run / "cache")
    val = load_cached(Path(cfg.data), "val", run / "cache")
    # recorded once the data loaded: a call stopped by bad data leaves the run's architecture as it was
    (run / "config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": asdict(cfg)}, indent=2))
    log.info("train %d faces %s, val %d faces", len(train), train.class_counts().tolist(), len(val))
    weights = class_weights(train.class_counts(), cfg.class_weight_power)
    log.info("class weights %s", dict(zip(EMOTIONS, np.round(weights, 2).tolist(), strict=True)))

    history, last = run / "history.csv", run / "encoder_last.keras"
    initial_epoch = completed_epochs(history) if resume and last.exists() else 0
    steps = int(np.ceil(len(train) / cfg.batch_size))
    if initial_epoch:
        log.info("resuming from %s after epoch %d", last, initial_epoch)
        model = load_keras(last, "start the run afresh with --overwrite instead of --resume")
        # the schedule follows --epochs, so a run can be shortened or extended when resumed
        model.optimizer.learning_rate = _schedule(cfg, steps)
        model.jit_compile = _jit(cfg)
    else:  # a new encoder: the old one's checkpoints and curves, and the head trained on it, would mislead
        for name in (*STAGE_FILES["encoder"], *STAGE_FILES["head"]):
            (run / name).unlink(missing_ok=True)
        encoder = build_encoder(model_cfg)
        model = build_frame_classifier(encoder)
        if cfg.init_from:
            _warm_start(model, model_cfg, Path(cfg.init_from), train, weights, cfg)
        model.compile(
            optimizer=keras.optimizers.AdamW(_schedule(cfg, steps), weight_decay=cfg.weight_decay),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
            metrics=["accuracy"],
            jit_compile=_jit(cfg),
        )
    if initial_epoch < cfg.epochs:
        teacher = teacher_probabilities([Path(t) for t in cfg.teacher], train, run / "cache") if cfg.teacher else None
        targets = frame_targets(train.labels, teacher, cfg.distill_weight)
        model.fit(
            FrameBatches(train, targets, cfg.batch_size, weights, cfg.seed + initial_epoch,
                         augment=PRESETS[cfg.augment]),
            validation_data=FrameBatches(val, frame_targets(val.labels), 512, np.ones(len(EMOTIONS), np.float32),
                                         0, augment=None),
            epochs=cfg.epochs,
            initial_epoch=initial_epoch,
            verbose=verbose,
            callbacks=[
                keras.callbacks.ModelCheckpoint(last),
                keras.callbacks.ModelCheckpoint(run / "encoder_best.keras", monitor="val_accuracy",
                                                save_best_only=True, mode="max",
                                                initial_value_threshold=_best_so_far(history)),
                keras.callbacks.CSVLogger(history, append=True),
            ],
        )
    return run / "encoder_best.keras"


def _warm_start(model: keras.Model, model_cfg: ModelConfig, onnx_path: Path, train: Faces, weights: np.ndarray,
                cfg: TrainConfig) -> None:
    """Start from an exported encoder, with a linear classifier fitted to its embeddings first.

    ``model_cfg`` may be deeper or have a wider MLP than the exported encoder's architecture: the
    encoder is then grown (:func:`model_export.warm_start.grow`), computing the same function.

    Fitting the classifier before fine-tuning (linear probe, then fine-tune) keeps the random
    classifier's early gradients from wrecking the trained features in the first epochs.
    """
    from model_export.warm_start import grow, load_encoder

    rng = np.random.default_rng(cfg.seed)
    encoder = encoder_of(model)
    sample = train.images[rng.choice(len(train), min(len(train), 2048), replace=False)]
    member = ModelConfig.from_dict(json.loads((onnx_path.parent / "manifest.json").read_text())["architecture"])
    if (member.depth, member.mlp_dim) == (model_cfg.depth, model_cfg.mlp_dim):
        load_encoder(encoder, onnx_path, sample)
    else:  # a larger encoder than the member's: load the member, then grow it into this one
        small = build_encoder(member)
        load_encoder(small, onnx_path, sample)
        grow(small, encoder, sample)
    log.info("fitting the frame classifier to the embeddings of %d training faces", len(train))
    embeddings = embed_faces(encoder, train.images)
    classifier = model.get_layer("frame_probs")
    probe = keras.Sequential([keras.Input((embeddings.shape[1],)), classifier])
    probe.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=["accuracy"])
    fitted = probe.fit(embeddings, keras.utils.to_categorical(train.labels, len(EMOTIONS)),
                       sample_weight=weights[train.labels], batch_size=256, epochs=10, verbose=0)
    log.info("linear probe: training accuracy %.4f", fitted.history["accuracy"][-1])


def encoder_of(frame_classifier: keras.Model) -> keras.Model:
    """The encoder sub-model inside a stage-1 frame classifier."""
    return frame_classifier.get_layer("encoder")


#: ``(N, 48, 48) uint8 -> (N, D)``; with a view cycle also called as ``embed(faces, view)``
Embedder = Callable[..., np.ndarray]


def embed_faces(encoder: keras.Model, faces: np.ndarray) -> np.ndarray:
    """``(N, 48, 48) uint8 -> (N, D)`` through a Keras encoder in inference mode."""
    return encoder.predict(face_tensor(faces), batch_size=1024, verbose=0)


def keras_embedder(run: Path) -> Embedder:
    """The run's best stage-1 encoder as ``(N, 48, 48) uint8 -> (N, D)``."""
    encoder = encoder_of(load_keras(run / "encoder_best.keras", "train stage 1 of the run again: "
                                    "model_export train --stage encoder --overwrite"))
    return lambda faces: embed_faces(encoder, faces)


def train_head(cfg: TrainConfig, model_cfg: ModelConfig, verbose: int = 1, clip_data: Path | None = None,
               embed: Embedder | None = None, cache_dir: Path | None = None, cycle: tuple[View, ...] = ()) -> Path:
    """Stage 2: freeze the encoder, train the BiLSTM head on clips of embeddings.

    Clips are synthesised from the still faces of ``cfg.data`` unless ``clip_data`` holds real
    ones (``<class>/<clip>/<frames>``, optionally under ``train/`` and ``val/``). The encoder is
    the run's own unless ``embed`` is given (``model_export ensemble`` passes its fused ONNX one).
    With a view ``cycle`` (``ensemble --cycle``; ``embed(faces, view)``), the frames of each
    synthesised clip go through its views in turn, as a track's frames do at the edge.
    The decoded faces are cached in ``cache_dir`` (default ``RUN/cache``); an ensemble shares one
    cache among its members' heads.
    """
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    embed = embed or keras_embedder(run)
    blank = np.zeros((1, INPUT_SIZE, INPUT_SIZE), np.uint8)
    head = build_head(model_cfg, embed_dim=(embed(blank, cycle[0]) if cycle else embed(blank)).shape[1])
    head.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    callbacks = [
        keras.callbacks.ModelCheckpoint(run / "head.keras", monitor="val_accuracy", save_best_only=True, mode="max"),
        keras.callbacks.CSVLogger(run / "head_history.csv"),
    ]
    if clip_data is not None:
        if cycle:
            raise ValueError("a view cycle is for synthesised clips: real clips are embedded as recorded")
        return _train_head_on_real_clips(head, embed, clip_data, cfg, model_cfg, callbacks, verbose)
    cache_dir = cache_dir or run / "cache"
    train = load_cached(Path(cfg.data), "train", cache_dir)
    val = load_cached(Path(cfg.data), "val", cache_dir)
    rng = np.random.default_rng(cfg.seed)
    log.info("embedding %d jittered views of the training faces", len(cycle) or clips.VIEWS)
    train_bank = clips.embedding_bank(embed, train.images, rng, cycle=cycle)
    val_bank = clips.embedding_bank(embed, val.images, rng, cycle=cycle)
    weights = class_weights(train.class_counts(), cfg.class_weight_power)
    cycled = bool(cycle)
    head.fit(
        ClipBatches(train_bank, train.labels, model_cfg.window, cfg.batch_size, weights, cfg.seed, cycled),
        validation_data=ClipBatches(val_bank, val.labels, model_cfg.window, 512, None, 0, cycled),
        epochs=cfg.head_epochs,
        verbose=verbose,
        callbacks=callbacks,
    )
    return run / "head.keras"


def _train_head_on_real_clips(head: keras.Model, embed, clip_data: Path, cfg: TrainConfig,
                              model_cfg: ModelConfig, callbacks: list, verbose: int) -> Path:
    def sequences(root: Path) -> tuple[np.ndarray, np.ndarray]:
        found = load_clip_folders(root, model_cfg.window)
        flat = embed(found.frames.reshape(-1, *found.frames.shape[2:]))
        return flat.reshape(len(found), model_cfg.window, -1), found.labels

    has_splits = (clip_data / "train").is_dir()
    x, labels = sequences(clip_data / "train" if has_splits else clip_data)
    order = np.random.default_rng(cfg.seed).permutation(len(labels))  # Keras splits off the *last* 10%
    x, labels = x[order], labels[order]
    log.info("training the head on %d real clips from %s", len(labels), clip_data)
    weights = class_weights(np.bincount(labels, minlength=len(EMOTIONS)), cfg.class_weight_power)
    y = keras.utils.to_categorical(labels, len(EMOTIONS))
    if has_splits and (clip_data / "val").is_dir():
        vx, vlabels = sequences(clip_data / "val")
        split = {"validation_data": (vx, keras.utils.to_categorical(vlabels, len(EMOTIONS)))}
    else:
        split = {"validation_split": 0.1}
    head.fit(x, y, sample_weight=weights[labels], batch_size=cfg.batch_size, epochs=cfg.head_epochs,
             shuffle=True, verbose=verbose, callbacks=callbacks, **split)
    return Path(cfg.run_dir) / "head.keras"


class ClipBatches(keras.utils.PyDataset):
    """Batches of (clip embeddings (B, T, D), one-hot label[, class weight])."""

    def __init__(self, bank: np.ndarray, labels: np.ndarray, window: int, batch_size: int,
                 weights: np.ndarray | None, seed: int, cycle: bool = False):
        super().__init__()
        self.bank, self.labels, self.window, self.cycle = bank, labels, window, cycle
        self.batch_size, self.weights, self.seed, self.epoch = batch_size, weights, seed, 0

    def __len__(self) -> int:
        return int(np.ceil(len(self.labels) / self.batch_size))

    def __getitem__(self, index: int):
        # validation clips are the same every epoch (seeded by batch only); training clips change
        rng = np.random.default_rng((self.seed, self.epoch if self.weights is not None else 0, index))
        start = index * self.batch_size
        idx = np.arange(start, min(start + self.batch_size, len(self.labels)))
        if self.weights is not None:
            idx = rng.integers(len(self.labels), size=len(idx))
        x = np.empty((len(idx), self.window, self.bank.shape[2]), np.float32)
        for row, i in enumerate(idx):
            faces, views = clips.clip_indices(len(self.labels), self.labels, i, self.window, rng, self.bank.shape[1],
                                              self.cycle)
            x[row] = self.bank[faces, views]
        y = keras.utils.to_categorical(self.labels[idx], len(EMOTIONS))
        if self.weights is None:
            return x, y
        return x, y, self.weights[self.labels[idx]]

    def on_epoch_end(self) -> None:
        self.epoch += 1
