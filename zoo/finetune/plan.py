"""Everything a run needs decided and checked before its folder exists: weights, spec, data, the layers to
train, whether features can be cached, and where a resumed run stands."""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from zoo.errors import ZooError
from zoo.finetune.config import FinetuneConfig
from zoo.graph import INPUT, cut


def say(message: str):
    """What the run is doing, on stderr: stdout is left to --json."""
    print(f"zoo: {message}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    cfg: FinetuneConfig
    run: Path
    weights: object  # zoo.weights.Weights or None (random initialisation)
    base_spec: object  # the spec the weights are for
    spec: object  # with the new head
    train: object  # zoo.data.Samples
    val: object
    trained: list[str]  # weighted layers to train, in graph order
    frozen_prefix: bool  # the frozen layers meet the trained ones in one tensor (zoo.graph.cut)
    cache: bool  # train on the frozen part's cached output
    state: dict  # checkpoints/state.json of a resumed run
    base_weights: dict | None  # the --weights file's path, spec fingerprint and sha256, kept in state.json

    @property
    def first_epoch(self) -> int:
        return self.state.get("epoch", 0)

    @property
    def chief(self) -> bool:
        """This process writes the run folder (the other workers of a multi-worker run write a temporary one)."""
        return self.run == Path(self.cfg.out)

    @property
    def finishing(self) -> bool:
        """Every epoch ran, but the final files were not all written (killed, or out of disk, at the end)."""
        return self.first_epoch >= self.cfg.epochs


def make_plan(cfg: FinetuneConfig) -> Plan:
    from zoo import store
    from zoo.registry import load_weights, resolve_spec

    run = Path(cfg.out)
    state = resume_state(cfg, run)  # a wrong --out is refused before anything is said or read
    path = store.take(cfg.weights, cfg.model, "starting from")
    # config.json records the file itself: --resume and the report take the same one whatever the store holds by then
    cfg = replace(cfg, weights=str(path) if path is not None else None)
    weights = load_weights(path) if path is not None else None
    base_spec = resolve_spec(cfg.model, weights)
    train, val, head = load_samples(cfg)
    spec = base_spec.with_num_classes(head)
    trained = resolve_trainable(spec.layer_names, [n.name for n in spec.weighted_nodes], cfg.train, cfg.freeze)
    if not trained:
        raise ZooError("every weighted layer is frozen: nothing to train")
    if spec.head not in trained and head != base_spec.num_classes:
        raise ZooError(f"the new head {spec.head} must be trained (it is freshly initialised)")
    frozen_prefix = _frozen_prefix(spec, trained)
    cache = _caching(cfg, frozen_prefix)
    if weights is None:
        say(f"starting {spec.id} from RANDOM initialisation (weights random), not pretrained weights; "
            f"`zoo fetch {base_spec.id}` stores the published ones")
    base = _base_weights(weights)
    started = state.get("base_weights", base)  # runs before this check recorded none
    if cfg.resume and started != base:
        was = f"sha256 {started['sha256']}, spec fingerprint {started['fingerprint']}" if started else "random initialisation"
        raise ZooError(f"not the base weights this run started from ({was}); resuming would train on other weights", cfg.weights)
    return Plan(cfg, run, weights, base_spec, spec, train, val, trained, frozen_prefix, cache, state, base)


def _base_weights(weights) -> dict | None:
    from zoo.weights import file_digest

    if weights is None:
        return None
    path = Path(weights.path).absolute()
    return {"path": str(path), "fingerprint": weights.spec.fingerprint, "sha256": file_digest(path)}


def _frozen_prefix(spec, trained: list[str]) -> bool:
    """Whether everything before the first trained layer is frozen and meets the rest in one tensor."""
    first = spec.layer_names.index(trained[0])
    split = cut(spec.nodes, trained[0])
    return split is not None and split[0] != INPUT and \
        all(n.name in trained for n in spec.weighted_nodes if spec.layer_names.index(n.name) >= first)


def _caching(cfg: FinetuneConfig, frozen_prefix: bool) -> bool:
    if cfg.cache_features == "on" and not frozen_prefix:
        raise ZooError("--cache-features on needs every weighted layer after the first trained one to be trained, and the "
                       "frozen layers to meet the trained ones in one tensor")
    if cfg.cache_features == "on" and cfg.augment:
        say("feature caching with augmentation on: crops and flips are NOT applied (features are computed once, center crop)")
    if cfg.cache_features == "auto" and frozen_prefix and cfg.augment:
        say("feature caching is off because augmentation is on (random crops and flips change the frozen layers' output); "
            "--no-augment turns it on")
    return cfg.cache_features == "on" or (cfg.cache_features == "auto" and frozen_prefix and not cfg.augment)


def resume_state(cfg: FinetuneConfig, run: Path) -> dict:
    """checkpoints/state.json of the run to resume ({} for a new run), or a ZooError saying why there is none."""
    from zoo.finetune.checkpoints import LOCK, read_state

    if run.exists() and not run.is_dir():
        raise ZooError("--out is a file, not a run folder", run)
    if not cfg.resume:
        if run.exists() and any(p.name != LOCK for p in run.iterdir()):
            raise ZooError("run folder exists and is not empty; use --resume or another --out", run)
        return {}
    state = read_state(run / "checkpoints")
    if state.get("epoch", 0) >= cfg.epochs and state.get("finished") == state["epoch"]:
        raise ZooError(f"the run already finished {state['epoch']} epochs; pass more --epochs to go on", run)
    return state


def load_samples(cfg: FinetuneConfig):
    """(training samples, validation samples, classes of the head), from folders or list files."""
    from zoo import data

    classes = data.read_classes_file(cfg.classes) if cfg.classes else None
    skip_bad = _dropped if cfg.skip_bad_images else None
    if cfg.train_list or cfg.val_list:
        if not (cfg.train_list and cfg.val_list):
            raise ZooError("give both --train-list and --val-list")
        train = data.from_list(cfg.train_list, classes, skip_bad)
        val = data.from_list(cfg.val_list, classes or train.classes, skip_bad)
        names = classes or [str(i) for i in range(max(len(train.classes), len(val.classes)))]
        train.classes = val.classes = names
    else:
        folder = cfg.data
        if folder is None:
            folder = Path(cfg.out).parent / "zoo-example-data"
            if not folder.is_dir():
                from zoo.example import make_example

                make_example(folder)
            say(f"no --data given: training on the built-in example ({folder}: drawn circles vs squares, generated)")
        train, val = data.from_folder(folder, cfg.val_fraction, cfg.seed, skip_bad)
        if classes:
            if len(classes) != len(train.classes):
                raise ZooError(f"--classes names {len(classes)} classes, the data has {len(train.classes)}", cfg.classes)
            train.classes = val.classes = classes
    n = len(train.classes)
    if n < 2:
        raise ZooError(f"the data has {n} class(es); fine-tuning needs at least 2")
    top = int(max(train.labels.max(), val.labels.max()))
    head = cfg.head or n
    if top >= head:
        raise ZooError(f"label {top} is out of range for a head of {head} classes")
    if head > n:
        raise ZooError(f"--head {head} is larger than the data's {n} classes")
    return train, val, head


def _dropped(bad: list[tuple]):
    """--skip-bad-images: how many were dropped, and the first few."""
    from zoo.data import name_bad

    say(f"--skip-bad-images: dropped {len(bad)} image(s) that do not decode: {name_bad(bad)}")


def resolve_trainable(layer_names: list[str], weighted: list[str], train, freeze) -> list[str]:
    """The weighted layers to train, from --train or --freeze names/globs; unknown names are errors."""
    if train and freeze:
        raise ZooError("give --train or --freeze, not both")

    def expand(patterns):
        chosen = set()
        for pattern in patterns:
            hits = fnmatch.filter(layer_names, pattern)
            if not hits:
                raise ZooError(f"no layer matches {pattern!r}; layers: {', '.join(layer_names)}")
            chosen.update(hits)
        return chosen

    if train:
        picked = expand(train)
        return [n for n in weighted if n in picked]
    frozen = expand(freeze) if freeze else set()
    return [n for n in weighted if n not in frozen]
