"""The ViT-BiLSTM emotion model, in one readable Keras 3 file.

Three parts, exported separately so the edge never runs the encoder T times per window:

* ``encoder``  — one aligned 48x48 grayscale face -> one embedding. A compact convolutional
  tokenizer (conv stages at 48, 24 and 12 px, then a strided conv) turns the face into 6x6 = 36 tokens; pre-norm
  transformer blocks with multi-head self-attention mix them; attention ("sequence") pooling,
  as in Compact Convolutional Transformers, gives one vector. The conv stem is what makes a
  sub-million-parameter ViT learn from 28k faces instead of needing ImageNet pre-training.
* ``head``     — a window of T embeddings -> 7-way softmax, through a BiLSTM(128).
* ``clip``     — encoder applied per frame and the head, fused: ``(N, T, 48, 48, 1) -> (N, 7)``.

Only ``keras.layers`` / ``keras.ops`` are used, so the same code trains on TensorFlow (CPU here),
JAX or PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
from keras import layers, ops

from affectedge.labels import EMOTIONS

INPUT_SIZE = 48
#: the stem of encoders recorded before ``stem_depths`` existed (releases v1-v3, members/v2)
LEGACY_STEM_DEPTHS = (2, 2, 0)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the architecture (saved next to every run)."""

    stem_filters: tuple[int, int, int] = (32, 64, 128)
    # 3x3 convs at 48x48, 24x24 and 12x12 (with the matching stem_filters), before the strided
    # conv to 6x6 tokens: release v4's (1, 2, 2) learns more per epoch than v1-v3's LEGACY_STEM_DEPTHS
    stem_depths: tuple[int, int, int] = (1, 2, 2)
    embed_dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.1
    window: int = 8
    lstm_units: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["stem_filters"] = tuple(data["stem_filters"])
        data["stem_depths"] = tuple(data.get("stem_depths", LEGACY_STEM_DEPTHS))
        return cls(**data)


def _conv_bn(x, filters: int, strides: int = 1):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.Activation("gelu")(x)


@keras.saving.register_keras_serializable(package="affectedge")
class PositionEmbedding(layers.Layer):
    """Learned absolute position embedding added to the token sequence."""

    def build(self, input_shape):
        self.pos = self.add_weight(
            name="pos", shape=(1, input_shape[1], input_shape[2]), initializer="random_normal"
        )

    def call(self, tokens):
        return tokens + self.pos


@keras.saving.register_keras_serializable(package="affectedge")
class SequencePooling(layers.Layer):
    """Attention pooling: a learned softmax weight per token, then a weighted sum."""

    def build(self, input_shape):
        self.score = layers.Dense(1)
        self.score.build(input_shape)

    def call(self, tokens):
        weights = ops.softmax(self.score(tokens), axis=1)  # (N, L, 1)
        return ops.sum(weights * tokens, axis=1)


def _transformer_block(x, cfg: ModelConfig):
    """Pre-norm block: x + MHSA(LN(x)); x + MLP(LN(x))."""
    h = layers.LayerNormalization(epsilon=1e-6)(x)
    h = layers.MultiHeadAttention(
        num_heads=cfg.heads, key_dim=cfg.embed_dim // cfg.heads, dropout=cfg.dropout
    )(h, h)
    x = layers.Add()([x, h])
    h = layers.LayerNormalization(epsilon=1e-6)(x)
    h = layers.Dense(cfg.mlp_dim, activation="gelu")(h)
    h = layers.Dropout(cfg.dropout)(h)
    h = layers.Dense(cfg.embed_dim)(h)
    h = layers.Dropout(cfg.dropout)(h)
    return layers.Add()([x, h])


def build_encoder(cfg: ModelConfig) -> keras.Model:
    """Face ``(N, 48, 48, 1)`` in [0, 1] -> embedding ``(N, embed_dim)``."""
    face = keras.Input((INPUT_SIZE, INPUT_SIZE, 1), name="face")
    x = layers.Rescaling(2.0, offset=-1.0)(face)
    for stage, (filters, convs) in enumerate(zip(cfg.stem_filters, cfg.stem_depths, strict=True)):
        for _ in range(convs):
            x = _conv_bn(x, filters)
        if stage < 2:
            x = layers.MaxPooling2D()(x)  # 48 -> 24 -> 12
    x = _conv_bn(x, cfg.stem_filters[2], strides=2)  # 6x6 tokens
    x = layers.Conv2D(cfg.embed_dim, 1)(x)
    tokens = layers.Reshape((-1, cfg.embed_dim))(x)
    tokens = PositionEmbedding()(tokens)
    for _ in range(cfg.depth):
        tokens = _transformer_block(tokens, cfg)
    tokens = layers.LayerNormalization(epsilon=1e-6)(tokens)
    embedding = SequencePooling(name="embedding")(tokens)
    return keras.Model(face, embedding, name="encoder")


def build_frame_classifier(encoder: keras.Model) -> keras.Model:
    """Stage 1 training model: encoder + linear softmax on single frames."""
    face = keras.Input((INPUT_SIZE, INPUT_SIZE, 1), name="face")
    x = layers.Dropout(0.3)(encoder(face))
    probs = layers.Dense(len(EMOTIONS), activation="softmax", name="frame_probs")(x)
    return keras.Model(face, probs, name="frame_classifier")


def build_head(cfg: ModelConfig, embed_dim: int | None = None) -> keras.Model:
    """Window of embeddings ``(N, T, D)`` -> emotion probabilities ``(N, 7)`` via BiLSTM.

    ``D`` is the encoder's ``embed_dim`` unless given: an ensemble's fused encoder is wider.
    """
    window = keras.Input((cfg.window, embed_dim or cfg.embed_dim), name="embeddings")
    x = layers.LayerNormalization(epsilon=1e-6)(window)
    x = layers.Bidirectional(layers.LSTM(cfg.lstm_units))(x)
    x = layers.Dropout(0.3)(x)
    probs = layers.Dense(len(EMOTIONS), activation="softmax", name="probs")(x)
    return keras.Model(window, probs, name="head")


def build_clip_model(encoder: keras.Model, head: keras.Model, window: int) -> keras.Model:
    """Fused ``(N, T, 48, 48, 1) -> (N, 7)``: the encoder on every frame, then the head."""
    clip = keras.Input((window, INPUT_SIZE, INPUT_SIZE, 1), name="clip")
    embeddings = layers.TimeDistributed(encoder)(clip)
    return keras.Model(clip, head(embeddings), name="clip")
