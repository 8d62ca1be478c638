"""Every fine-tune option, declared once: its default, its help and its allowed values. The `zoo finetune`
command's arguments are derived from these fields (add_arguments), and so are the checks (check)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from zoo.errors import ZooError


def option(default, help: str, choices: tuple = (), flag: str | None = None, positional: bool = False):
    """A config field with what the CLI needs: `flag` names a switch that stores the opposite of the default."""
    meta = {"help": help, "choices": choices, "flag": flag, "positional": positional}
    return field(default_factory=lambda: default, metadata=meta) if isinstance(default, list) else field(default=default, metadata=meta)


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass
class FinetuneConfig:
    model: str = option("alexnet", "spec to fine-tune (default alexnet = alexnet@bvlc)", positional=True)
    head: int | None = option(None, "classes of the new head (default: the data's)")
    weights: str | None = option(None, "verified weights to start from: a file, a stored name (zoo weights), 'stored' (the spec's "
                                 "stored weights: zoo fetch) or 'random' (random initialisation); default: 'stored' on the "
                                 "command line, random initialisation from Python (None)")
    data: str | None = option(None, "folder with one sub-folder per class (or train/ and val/ inside); default: built-in example")
    train_list: str | None = option(None, "list file: one 'path label' per line (the seed's format)")
    val_list: str | None = option(None, "validation list file")
    classes: str | None = option(None, "file with the class names, one per line")
    skip_bad_images: bool = option(False, "drop images that do not decode (counted), instead of stopping", flag="--skip-bad-images")
    train: list[str] | None = option(None, "comma-separated layers or globs to train (the rest is frozen), e.g. fc7,fc8 or 'layer4*,fc'")
    freeze: list[str] | None = option(None, "comma-separated layers or globs to freeze (the rest is trained), e.g. 'conv*'")
    epochs: int = option(10, "epochs in all (with --resume: the run's own unless given)")
    batch_size: int = option(128, "images per step")
    lr: float = option(0.001, "learning rate")
    optimizer: str = option("sgd", "sgd (momentum, the seed's) or adam", ("sgd", "adam"))
    momentum: float = option(0.9, "SGD momentum")
    schedule: str = option("constant", "learning-rate schedule", ("constant", "cosine", "step"))
    augment: bool = option(True, "center crops only (enables feature caching)", flag="--no-augment")
    cache_features: str = option("auto", "train on the frozen layers' cached output", ("auto", "on", "off"))
    strategy: str = option("none", "none, mirrored (several GPUs) or multiworker (TF_CONFIG; zoo launch N starts N local workers)",
                           ("none", "mirrored", "multiworker"))
    precision: str = option("float32", "Keras dtype policy: mixed ones compute in 16 bits, keep weights and the head's output "
                            "in float32", ("float32", "mixed_float16", "mixed_bfloat16"))
    seed: int = option(0, "seed of initialisation, data order and augmentation")
    val_fraction: float = option(0.2, "share of a class folder held out for validation")
    out: str = option("runs/finetune", "run folder")
    resume: bool = option(False, "continue the run in --out where it stopped", flag="--resume")


@dataclass
class FinetuneResult:
    run_dir: Path
    weights: Path
    classes: list[str]
    trained_layers: list[str]
    cached_features: bool
    history: list[dict] = field(default_factory=list)
    best_val_accuracy: float = 0.0
    images_per_second: float = 0.0  # median over epochs, training steps only
    frozen_pass_seconds: float = 0.0  # with cached features: the frozen layers' one pass over the training images
    chief: bool = True  # False on the other workers of a multi-worker run: the chief wrote the run folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument per field; every default is None, so that `given(args)` is what the user typed."""
    for f in fields(FinetuneConfig):
        meta = f.metadata
        if meta["positional"]:
            parser.add_argument(f.name, nargs="?", default=None, help=meta["help"])
        elif meta["flag"]:
            parser.add_argument(meta["flag"], dest=f.name, action="store_const", const=not f.default, default=None, help=meta["help"])
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), _names if f.name in ("train", "freeze") else str)
            help = meta["help"] + (f" ({', '.join(meta['choices'])})" if meta["choices"] else "")
            help += f" (default: {f.default})" if f.default is not None else ""
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=help)


def given(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if getattr(args, f.name, None) is not None}


def configure(config: FinetuneConfig | None, overrides: dict) -> FinetuneConfig:
    """The run's config: `config` with `overrides`; on resume the saved one (only more epochs may be asked for)."""
    names = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}")
    cfg = FinetuneConfig(**(asdict(config or FinetuneConfig()) | overrides))
    if cfg.resume:
        saved = Path(cfg.out) / "config.json"
        if not saved.exists():
            raise ZooError("nothing to resume: no config.json", Path(cfg.out))
        # the saved settings, so the schedule and data order go on as planned; the folder is the one given now
        more = {"epochs": overrides["epochs"]} if "epochs" in overrides else {}
        cfg = FinetuneConfig(**(json.loads(saved.read_text()) | {"resume": True, "out": cfg.out} | more))
    else:
        cfg = replace(cfg, **{k: _absolute(getattr(cfg, k)) for k in PATHS})
    check(cfg)
    return cfg


PATHS = ("weights", "data", "train_list", "val_list", "classes")


def _absolute(value):
    """An existing file or folder as an absolute path: config.json is read wherever --resume runs. Anything else
    as it is (None, a stored weights name, a path whose error comes later naming it as given)."""
    return str(Path(value).absolute()) if isinstance(value, (str, os.PathLike)) and Path(value).exists() else value


def check(cfg: FinetuneConfig) -> None:
    for f in fields(FinetuneConfig):
        value = getattr(cfg, f.name)
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            raise ZooError(f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata['choices'])}, not {value!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ZooError("--epochs and --batch-size must be positive, --lr above 0")
    if cfg.head is not None and cfg.head < 2:  # 0 would otherwise read as "the data's classes"
        raise ZooError(f"--head must be at least 2 classes, not {cfg.head}")
    if not 0 <= cfg.seed < 2**32:  # NumPy's and TensorFlow's seeds
        raise ZooError(f"--seed must be between 0 and 2**32 - 1, not {cfg.seed}")
    if not 0 < cfg.val_fraction < 1:
        raise ZooError("--val-fraction must be between 0 and 1")
