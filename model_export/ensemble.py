"""``model_export ensemble``: several trained encoders fused into one ONNX encoder, one BiLSTM head per member.

Why: ViT encoders trained from different seeds (or for different lengths) make partly different
mistakes on FER2013, and a face and its mirror image do too. The fused encoder runs every member
on the face and on its mirror (one batch of 2N), averages the two views per member and
concatenates the members' embeddings. Each member then gets its own BiLSTM head, trained on clips
of its own part of that embedding (stage 2 of :mod:`model_export.train`, unchanged), and
``head.onnx`` averages the heads' probabilities. One head over the joint embedding was measured
first and gained nothing (d1 + s3: 0.6695; d1 alone, release v4: 0.6704; s3 alone: 0.6707); averaging
their own heads gained 1.2 points over v4 on the same faces (McNemar p = 0.0054; MODEL_CARD.md). The edge sees an
ordinary ``encoder.onnx`` / ``head.onnx`` pair with a wider embedding, so nothing downstream changes.
``--rotate DEG`` adds each view rotated by ±DEG (:mod:`model_export.views`): three times the
encoder's work for about half a point, a trade for GPUs or PCs that see few faces. ``--cycle``
spreads the views over the window instead (frame t of a track through view t mod V, the heads
trained on clips seen so): one encoder pass per frame, as in release v8.

Members are exported model folders (``manifest.json`` + ``encoder.onnx``), so an earlier shipped
model whose Keras checkpoint is gone can still take part. The graphs are joined with the ``onnx``
package (each member's nodes and weights prefixed, its input rewired), not re-traced, so every
member computes what it computed alone, to float rounding once :mod:`model_export.graph_fusion`
has fused its LayerNorms and GELUs; :func:`parity` checks that on real faces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from edge_agent.emotion_model import ModelError, face_tensor
from edge_agent.faces import views as face_views
from edge_agent.faces.align import SIZE
from edge_agent.faces.views import View
from edge_agent.inference import run_in_batches
from model_export import MIN_OPSET, OPSET, PARITY_TOLERANCE, graph_fusion, views, worst_diff
from model_export.loading import load_onnx
from model_export.manifest import shown

log = logging.getLogger(__name__)

FACE = (SIZE, SIZE, 1)
#: TrainConfig fields that only stage 1 uses (the head has its own optimizer settings)
STAGE1_ONLY = ("epochs", "warmup_epochs", "learning_rate", "weight_decay")


@dataclass(frozen=True)
class Member:
    """One exported model folder taking part in the ensemble."""

    folder: Path
    manifest: dict
    encoder: onnx.ModelProto

    @classmethod
    def load(cls, folder: Path) -> Member:
        manifest_path, encoder_path = folder / "manifest.json", folder / "encoder.onnx"
        hint = "a member is a folder written by `model_export export`"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} is missing: {hint}")
        return cls(folder, json.loads(manifest_path.read_text()), load_onnx(encoder_path, hint))

    @property
    def name(self) -> str:
        """How logs name the member: its version, or its folder when the manifest has none."""
        return self.manifest.get("version", str(self.folder))

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    def summary(self) -> dict:
        """What the fused manifest records about this member (its provenance and its own figures)."""
        keys = ("version", "architecture", "training", "val_metrics", "test_time_augmentation")
        return {"folder": shown(self.folder), **{k: self.manifest[k] for k in keys if k in self.manifest},
                "encoder_sha256": self.manifest["files"]["encoder"]["sha256"]}


def _opsets(models: list[onnx.ModelProto]) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for model in models:
        for opset in model.opset_import:
            if versions.setdefault(opset.domain, opset.version) != opset.version:
                raise ModelError(f"members use opsets {versions[opset.domain]} and {opset.version} for domain "
                                 f"{opset.domain!r}: re-export them with the same --opset")
    return [helper.make_opsetid(domain, version) for domain, version in versions.items()]


def _inline(model: onnx.ModelProto, prefix: str, feed: str) -> tuple[list, list, str]:
    """Nodes and weights of a single-input, single-output ``model``, renamed under ``prefix`` and
    reading ``feed`` instead of its own input. Returns (nodes, initializers, output name)."""
    prefixed = compose.add_prefix(model, prefix)
    graph = prefixed.graph
    own_input = graph.input[0].name
    nodes = []
    for node in graph.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        node.input[:] = [feed if name == own_input else name for name in node.input]
        nodes.append(node)
    return nodes, list(graph.initializer), graph.output[0].name


def _const(name: str, values, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _model(nodes: list, initializers: list, inputs: list, outputs: list, opsets: list, name: str,
           ir_version: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=opsets, producer_name="affectedge-model_export")
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def fuse_encoders(members: list[Member], mirror: bool, rotations: tuple[float, ...] = ()) -> onnx.ModelProto:
    """``face (N,48,48,1) -> embedding (N, sum of member dims)``; with ``mirror``, each member's
    embedding is the mean of its embeddings of the face and of its left-right mirror image, and
    with ``rotations`` also of those views rotated by each angle (:mod:`model_export.views`; all
    views in one batch). LayerNorms, GELUs and self-attention come out fused
    (:mod:`model_export.graph_fusion`)."""
    encoders = [m.encoder for m in members]
    opsets = _opsets(encoders)
    opset = next(o.version for o in opsets if o.domain in ("", "ai.onnx"))
    if opset < MIN_OPSET:
        raise ModelError(f"the members use opset {opset}: re-export them with --opset {MIN_OPSET} or later "
                         f"(default {OPSET})")
    nodes, weights, feed, n_views = views.nodes("face", mirror, rotations)
    parts = []
    for i, member in enumerate(members):
        prefix = f"m{i}/"
        member_nodes, member_weights, out = _inline(member.encoder, prefix, feed)
        nodes += member_nodes
        weights += member_weights
        if n_views > 1:  # (V*N, D) -> (V, N, D) -> mean over the views
            weights += [_const(f"{prefix}views_shape", [n_views, -1, member.embed_dim]),
                        _const(f"{prefix}view_axis", [0]), _const(f"{prefix}per_view", 1 / n_views, np.float32)]
            nodes += [
                helper.make_node("Reshape", [out, f"{prefix}views_shape"], [f"{prefix}views"]),
                helper.make_node("ReduceSum", [f"{prefix}views", f"{prefix}view_axis"], [f"{prefix}sum"], keepdims=0),
                helper.make_node("Mul", [f"{prefix}sum", f"{prefix}per_view"], [f"{prefix}mean"]),
            ]
            out = f"{prefix}mean"
        parts.append(out)
    nodes.append(helper.make_node("Concat", parts, ["embedding"], axis=1, name="join_members"))
    dim = sum(m.embed_dim for m in members)
    fused, _ = graph_fusion.fuse(_model(
        nodes, weights,
        [helper.make_tensor_value_info("face", TensorProto.FLOAT, ["N", *FACE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        opsets, "ensemble_encoder", max(e.ir_version for e in encoders)), attention=True)
    return fused  # members exported before graph_fusion existed get their fused kernels here


def compose_clip(encoder: onnx.ModelProto, head: onnx.ModelProto, window: int, dim: int,
                 cycle: tuple[View, ...] = ()) -> onnx.ModelProto:
    """``clip (N,T,48,48,1) -> probs (N,7)``: the encoder on all N*T frames (frame t through
    ``cycle[t mod V]`` when the model has a view cycle), then the head."""
    if cycle:
        frame_nodes, frame_weights, frames = views.cycle_nodes("clip", cycle, window)
    else:
        frame_nodes = [helper.make_node("Reshape", ["clip", "frames_shape"], ["frames"])]
        frame_weights, frames = [_const("frames_shape", [-1, *FACE])], "frames"
    enc_nodes, enc_weights, emb = _inline(encoder, "encoder/", frames)
    head_nodes, head_weights, probs = _inline(head, "head/", "windows")
    nodes = [
        *frame_nodes,
        *enc_nodes,
        helper.make_node("Reshape", [emb, "windows_shape"], ["windows"]),
        *head_nodes,
        helper.make_node("Identity", [probs], ["probs"]),
    ]
    weights = [*frame_weights, _const("windows_shape", [-1, window, dim]), *enc_weights, *head_weights]
    return _model(nodes, weights,
                  [helper.make_tensor_value_info("clip", TensorProto.FLOAT, ["N", window, *FACE])],
                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 7])],
                  _opsets([encoder, head]), "clip", max(encoder.ir_version, head.ir_version))


def parity(members: list[Member], mirror: bool, rotations: tuple[float, ...], out_dir: Path, faces: np.ndarray,
           window: int, head, cycle: tuple[View, ...] = ()) -> dict:
    """On real faces: the fused encoder vs each member run alone on each view (max |Δ|), head.onnx vs
    the Keras ``head`` it was converted from, and clip.onnx vs encoder.onnx followed by head.onnx
    (on frames through the view cycle, as the edge runs them, when there is one)."""
    import onnxruntime as ort

    def session(model) -> ort.InferenceSession:
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        return ort.InferenceSession(source, providers=["CPUExecutionProvider"])

    x = face_tensor(faces)
    expected = []
    for member in members:
        alone = session(member.encoder)
        expected.append(np.mean([alone.run(None, {"face": view})[0]
                                 for view in views.all_views(x, mirror, rotations)], axis=0))
    encoder = session(out_dir / "encoder.onnx")
    fused = encoder.run(None, {"face": x})[0]
    n_clips = len(faces) // window
    frames = x[: n_clips * window]
    if cycle:
        frames = face_views.through(frames, cycle, np.tile(np.arange(window) % len(cycle), n_clips))
    windows = encoder.run(None, {"face": frames})[0].reshape(n_clips, window, -1)
    stepwise = session(out_dir / "head.onnx").run(None, {"embeddings": windows})[0]
    keras_probs = head.predict(windows, verbose=0)
    clip_in = x[: n_clips * window].reshape(n_clips, window, *FACE)
    fused_clip = session(out_dir / "clip.onnx").run(None, {"clip": clip_in})[0]
    return {
        "faces": len(faces),
        "encoder_max_abs_diff": float(np.abs(fused - np.concatenate(expected, axis=1)).max()),
        "head_max_abs_prob_diff": float(np.abs(keras_probs - stepwise).max()),
        "head_top1_agreement": float((keras_probs.argmax(1) == stepwise.argmax(1)).mean()),
        "clip_max_abs_prob_diff": float(np.abs(fused_clip - stepwise).max()),
        "clip_top1_agreement": float((fused_clip.argmax(1) == stepwise.argmax(1)).mean()),
    }


class AveragedHeads:
    """``windows (N,T,sum of member dims) -> probs (N,7)``: each member's head on its own slice of
    the joint embedding, the probabilities averaged. Callable like the Keras model it stands for, so
    :func:`model_export.onnx_export.convert` traces it into one ``head.onnx``."""

    def __init__(self, heads: list, dims: list[int]) -> None:
        bounds = np.cumsum([0, *dims])
        self.parts = list(zip(heads, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))

    def __call__(self, windows, training: bool = False):
        import keras

        probs = [head(windows[:, :, start:stop], training=training) for head, start, stop in self.parts]
        return keras.ops.mean(keras.ops.stack(probs), axis=0)

    def predict(self, windows: np.ndarray, verbose: int = 0) -> np.ndarray:
        return np.mean([head.predict(windows[:, :, start:stop], verbose=verbose)
                        for head, start, stop in self.parts], axis=0)


def onnx_embedder(encoder: onnx.ModelProto, batch: int = 512):
    """An ONNX encoder as ``(N, 48, 48) uint8 -> (N, D)``, for training the head on its output;
    ``embed(faces, view)`` sees the faces through a view first."""
    import onnxruntime as ort

    session = ort.InferenceSession(encoder.SerializeToString(), providers=["CPUExecutionProvider"])

    def embed(faces: np.ndarray, view: View | None = None) -> np.ndarray:
        x = face_tensor(faces) if view is None else view.apply(face_tensor(faces))
        return run_in_batches(lambda inputs: session.run(None, inputs), {"face": x}, batch)[0]

    return embed


def run(member_dirs: list[Path], out_dir: Path, run_dir: Path, data: Path, mirror: bool, version: str,
        window: int, head_epochs: int, seed: int, verbose: int = 1, rotations: tuple[float, ...] = (),
        cycle: bool = False) -> dict:
    """Fuse the members, train each member's head on its own embedding, write ``out_dir`` and its manifest
    (all at once, and only when the ONNX files pass the parity check on ``data``/val).

    With ``cycle`` the views (the mirror, the rotations) are not averaged inside the encoder but
    spread over the window: the encoder runs each frame once, frame t through view t mod V, and
    the heads learn from clips seen that way (``view_cycle`` in the manifest tells the edge)."""
    import keras

    from model_export import manifest
    from model_export.datasets import parity_faces
    from model_export.model import ModelConfig
    from model_export.onnx_export import convert
    from model_export.train import TrainConfig, train_head

    members = [Member.load(d) for d in member_dirs]  # all read before out_dir (maybe a member) is written
    faces = parity_faces(Path(data) / "val", window)  # before the heads train: the check needs a window of faces
    view_cycle = face_views.view_set(mirror, rotations) if cycle else ()
    if cycle:
        mirror, rotations = False, ()  # one pass per frame: the views go to the frames instead
    fused = fuse_encoders(members, mirror, rotations)
    dim = sum(m.embed_dim for m in members)
    described = views.describe_cycle(view_cycle) if cycle else views.describe(mirror, rotations)
    log.info("fused %d members (%s), embedding %d; views: %s", len(members),
             ", ".join(m.name for m in members), dim, described)
    cfg = TrainConfig(data=str(data), run_dir=str(run_dir), head_epochs=head_epochs, seed=seed)
    model_cfg = ModelConfig(window=window)
    heads = []
    for i, member in enumerate(members):
        log.info("head %d of %d, on %s's embedding", i + 1, len(members), member.name)
        member_cfg = replace(cfg, run_dir=str(run_dir / f"member{i}"))
        embed = onnx_embedder(fuse_encoders([member], mirror, rotations))
        heads.append(keras.models.load_model(train_head(member_cfg, model_cfg, verbose=verbose, embed=embed,
                                                        cache_dir=run_dir / "cache", cycle=view_cycle)))
    head = AveragedHeads(heads, [m.embed_dim for m in members])

    with manifest.staged_model(out_dir, "ensemble") as staging:  # out_dir untouched until parity passes
        onnx.save(fused, str(staging / "encoder.onnx"))
        head_export = convert(head, "embeddings", (window, dim), "probs", staging / "head.onnx")
        onnx.save(compose_clip(fused, onnx.load(str(head_export.path)), window, dim, view_cycle),
                  str(staging / "clip.onnx"))
        checks = parity(members, mirror, rotations, staging, faces, window, head, view_cycle)
        print(f"parity with the members and the Keras heads on real faces: {json.dumps(checks)}")
        if not worst_diff(checks) <= PARITY_TOLERANCE:
            raise ModelError(f"the fused ONNX models differ from their parts by more than {PARITY_TOLERANCE:g}, so "
                             f"nothing was written to {out_dir}; do not ship them")
        shapes = {"encoder": ({"face": ["N", *FACE]}, {"embedding": ["N", dim]}),
                  "head": (head_export.inputs, head_export.outputs),
                  "clip": ({"clip": ["N", window, *FACE]}, {"probs": ["N", 7]})}
        manifest.update(
            staging,
            version=version,
            window=window,
            embed_dim=dim,
            architecture={"ensemble_of": len(members), "lstm_units": model_cfg.lstm_units, "window": window,
                          "heads": "one per member, on its own embedding; probabilities averaged"},
            training={"head": manifest.shown_training({k: v for k, v in asdict(cfg).items()
                                                       if k not in STAGE1_ONLY}),
                      "members": [m.summary() for m in members]},
            files={name: manifest.file_entry(staging / f"{name}.onnx", staging, inputs=i, outputs=o)
                   for name, (i, o) in shapes.items()},
            parity=checks,
            test_time_augmentation=described,
            **({"view_cycle": [view.to_manifest() for view in view_cycle]} if view_cycle else {}),
        )
    print(f"{out_dir}: encoder (N,48,48,1)->(N,{dim}) from {len(members)} members, head, clip")
    return checks
