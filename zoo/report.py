"""A fine-tune run's report: loss and accuracy curves, the validation confusion matrix, the most confidently wrong
validation images (PNG files), and index.html with the run's summary, all under RUN/report/.

It reads only what the run folder holds (config.json, classes.txt, val.txt, metrics.csv, checkpoints/), so an
interrupted run gets one too. Matplotlib is imported here only, through its object API on the Agg canvas: no
pyplot, no global backend, nothing shown.
"""

from __future__ import annotations

import csv
import html
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.errors import ZooError

MOST_WRONG = 12  # images in wrong.png


@dataclass
class Evaluation:
    """The best weights on the validation images."""

    spec: object  # zoo.spec.ModelSpec, with the run's head
    trained: list[str]  # the trained layers, in graph order
    paths: list[str]
    labels: np.ndarray
    probabilities: np.ndarray  # [images, classes]

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    def confusion(self, n: int) -> np.ndarray:
        """Counts: rows the true class, columns the predicted one."""
        counts = np.zeros((n, n), np.int64)
        np.add.at(counts, (self.labels, self.predicted), 1)
        return counts

    def rows(self, classes: list[str]) -> list[dict]:
        """Each image's file, true and predicted class, and the predicted class's probability."""
        return [{"file": path, "true": classes[label], "predicted": classes[p], "probability": float(probs[p])}
                for path, label, p, probs in zip(self.paths, self.labels, self.predicted, self.probabilities)]

    def most_wrong(self, k: int) -> list[int]:
        """The indices of up to `k` misclassified images, most confident first."""
        wrong = np.flatnonzero(self.predicted != self.labels)
        return wrong[np.argsort(-self.probabilities[wrong].max(1), kind="stable")][:k].tolist()


def write_report(run_dir) -> Path:
    """Write RUN/report/ (curves.png, confusion.png, wrong.png when any image is wrong, report.json, index.html)
    and return the path of index.html."""
    from zoo.finetune.checkpoints import read_state
    from zoo.finetune.config import FinetuneConfig

    run = Path(run_dir)
    if not (run / "config.json").exists():
        raise ZooError("not a run folder (no config.json)", run)
    cfg = FinetuneConfig(**json.loads((run / "config.json").read_text()))
    state = read_state(run / "checkpoints")
    if "best" not in state:
        raise ZooError("the run has not finished an epoch yet: nothing to report", run)
    for name in ("classes.txt", "val.txt"):
        if not (run / name).exists():  # zoo finetune writes both when a run starts or resumes
            raise ZooError(f"no {name}: the run was started by a zoo without reports (--resume writes it)", run)
    classes = (run / "classes.txt").read_text().splitlines()
    evaluation = evaluate(run, cfg, state, classes)
    epochs = read_metrics(run / "metrics.csv")
    out = run / "report"
    out.mkdir(exist_ok=True)
    plot_curves(epochs, state["best_epoch"], cfg.epochs, out / "curves.png")
    confusion = evaluation.confusion(len(classes))
    plot_confusion(confusion, classes, out / "confusion.png")
    wrong = evaluation.most_wrong(MOST_WRONG)
    (out / "wrong.png").unlink(missing_ok=True)  # a rebuilt report must not show an older run state's images
    if wrong:
        plot_wrong(evaluation, wrong, classes, out / "wrong.png")
    summary = {"run": str(run), "spec": evaluation.spec.id, "classes": classes, "trained_layers": evaluation.trained,
               "epochs_finished": state["epoch"], "epochs_planned": cfg.epochs, "best_epoch": state["best_epoch"],
               "best_val_accuracy": state["best_val_accuracy"], "val_images": len(evaluation.labels),
               "confusion": confusion.tolist(), "predictions": evaluation.rows(classes)}
    summary["wrong"] = [summary["predictions"][i] for i in wrong]
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    page = out / "index.html"
    page.write_text(render_html(summary, cfg, epochs))
    return page


# --- what the run holds ------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv's rows as floats, one per epoch ("epoch" counts from 1, as the console does). A run killed between the CSV row and the
    checkpoint repeats that epoch on resume: the later row wins."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = {int(row["epoch"]): row for row in csv.DictReader(f)}
    # a column a row lacks (a metric added on resume) is empty: not a number
    return [{k: float(v or "nan") for k, v in row.items()} | {"epoch": epoch} for epoch, row in sorted(rows.items())]


def evaluate(run: Path, cfg, state: dict, classes: list[str]) -> Evaluation:
    """The best weights' class probabilities on the run's validation list, batched through the same eval
    preprocessing and forward pass as cached features (zoo.finetune.caching.features)."""
    from zoo.data import from_list
    from zoo.finetune.caching import features

    with np.load(run / "checkpoints" / state["best"], allow_pickle=False) as best:  # its arrays are read on use
        spec, model = best_model(run, cfg, state, len(classes), best)
        trained = [n.name for n in spec.weighted_nodes if any(t.name in best.files for t in n.tensors)]
    val = from_list(run / "val.txt", classes)
    logits = features(model, val, spec, cfg.batch_size).astype(np.float64)
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return Evaluation(spec, trained, val.paths, val.labels, exp / exp.sum(1, keepdims=True))


def best_model(run: Path, cfg, state: dict, num_classes: int, best_slot):
    """(spec, Keras model) at the best epoch. best.safetensors when the run wrote it for that epoch (a run
    resumed past its end and interrupted again still has the older one). Otherwise the model the run started
    from, rebuilt as the engine builds it (its --weights, or the same seeded random initialisation: frozen
    layers never change), with the trained layers of the best slot."""
    import keras

    from zoo.backends.keras import create_model
    from zoo.registry import load_weights, resolve_spec
    from zoo.weights import read_header

    best = run / "checkpoints" / "best.safetensors"
    if best.exists() and read_header(best).get("epoch") == str(state["best_epoch"]):
        weights = load_weights(best)
        return weights.spec, create_model(None, weights=weights)
    weights = load_weights(cfg.weights) if cfg.weights else None
    base = resolve_spec(cfg.model, weights)
    keras.utils.set_random_seed(cfg.seed)
    model = create_model(None if weights else base, weights=weights, num_classes=num_classes)
    spec = base.with_num_classes(num_classes)
    for name in best_slot.files:
        t = spec.tensors[name]
        {v.name: v for v in model.get_layer(t.layer).variables}[t.param].assign(best_slot[name])
    return spec, model


# --- figures ------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_curves(epochs: list[dict], best_epoch: int, planned: int, path: Path):
    """Loss and accuracy per epoch; the x axis spans the planned epochs, so an interrupted run shows as one."""
    figure = _figure(10, 4)
    x = [e["epoch"] for e in epochs]
    for ax, metric, title in zip(figure.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy")):
        for key, label, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "--s")):
            if epochs and key in epochs[0]:
                ax.plot(x, [e[key] for e in epochs], style, label=label, markersize=4)
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set(title=title, xlabel="epoch", ylabel=metric, xlim=(0.5, max([planned, *x]) + 0.5))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3)  # one legend: the panels share it
    figure.suptitle("Training and validation, per epoch")
    figure.savefig(path)


def plot_confusion(counts: np.ndarray, classes: list[str], path: Path):
    n = len(classes)
    side = min(20.0, 3.0 + 0.45 * n)
    figure = _figure(side + 1.5, side)
    ax = figure.subplots()
    shown = ax.imshow(counts, cmap="Blues", vmin=0)
    figure.colorbar(shown, ax=ax, label="images")
    if n <= 50:  # beyond that the names overlap whatever their size
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
    if n <= 30:
        for (i, j), count in np.ndenumerate(counts):
            dark = count > counts.max() / 2
            ax.text(j, i, str(count), ha="center", va="center", color="white" if dark else "black")
    right = int(np.trace(counts))
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"Validation confusion matrix\n{right} of {counts.sum()} right ({right / max(1, counts.sum()):.1%})")
    figure.savefig(path)


def plot_wrong(evaluation: Evaluation, indices: list[int], classes: list[str], path: Path):
    from PIL import Image

    cols = min(4, len(indices))
    rows = -(-len(indices) // cols)
    figure = _figure(max(6, 3 * cols), 3.3 * rows)  # at least the suptitle's width
    axes = np.atleast_1d(figure.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, indices):
        with Image.open(evaluation.paths[i]) as image:
            image = image.convert("RGB")
            image.thumbnail((256, 256))
        ax.imshow(np.asarray(image))
        title = (f"pred {classes[evaluation.predicted[i]]} (p={evaluation.probabilities[i].max():.2f}), "
                 f"true {classes[evaluation.labels[i]]}")
        ax.set_title(textwrap.fill(title, 34), fontsize=9)
        where = Path(evaluation.paths[i])  # with its folder: file names repeat across class folders
        ax.text(0.5, -0.04, f"{where.parent.name}/{where.name}", transform=ax.transAxes, ha="center", va="top", fontsize=7)
    figure.suptitle("Most confidently wrong validation images")
    figure.savefig(path)


# --- the page -----------------------------------------------------------------------------------------


def render_html(summary: dict, cfg, epochs: list[dict]) -> str:
    e = html.escape
    n, right = summary["val_images"], int(np.trace(summary["confusion"]))
    name = e(Path(summary["run"]).resolve().name)
    facts = [
        ("spec", summary["spec"]),
        ("started from", cfg.weights or "random initialisation"),
        ("data", cfg.data or (f"{cfg.train_list} / {cfg.val_list}" if cfg.train_list else "the built-in example")),
        ("classes", ", ".join(summary["classes"])),
        ("trained layers", ", ".join(summary["trained_layers"])),
        ("epochs", f"{summary['epochs_finished']} of {summary['epochs_planned']}"),
        ("best validation accuracy", f"{summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']}); "
                                     f"its weights here: {right} of {n} validation images right"),
    ]
    parts = [f"<h1>Fine-tuning run {name}</h1>"]
    if summary["epochs_finished"] < summary["epochs_planned"]:
        parts.append(f"<p class=note>Interrupted after epoch {summary['epochs_finished']} of {summary['epochs_planned']}: "
                     f"<code>zoo finetune --out {e(summary['run'])} --resume</code> continues it.</p>")
    parts.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts) + "</table>")
    parts.append(_image("Loss and accuracy", "curves.png", "loss and accuracy per epoch, train and validation"))
    parts.append(_image("Validation confusion matrix (best weights)", "confusion.png", "validation confusion matrix"))
    if summary["wrong"]:
        parts.append(_image(f"Most confidently wrong ({len(summary['wrong'])} of {n - right} wrong)", "wrong.png",
                            "the most confidently wrong validation images"))
    else:
        parts.append(f"<h2>Wrong images</h2><p>None: the best weights classify all {n} validation images right.</p>")
    parts.append("<h2>Per epoch</h2>" + _metrics_table(epochs, summary["best_epoch"]))
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>zoo report: {name}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}img{max-width:100%}"
         "table{border-collapse:collapse}th,td{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}"
         ".note{background:#fff3cd;padding:.5em}.best{font-weight:bold}")


def _image(title: str, name: str, alt: str) -> str:
    return f'<h2>{html.escape(title)}</h2><a href="{name}"><img src="{name}" alt="{html.escape(alt)}"></a>'


def _metrics_table(epochs: list[dict], best_epoch: int) -> str:
    if not epochs:
        return "<p>metrics.csv holds no epoch.</p>"
    first = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    keys = [k for k in first if k in epochs[0]] + sorted(k for k in epochs[0] if k not in first)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(("<tr class=best>" if row["epoch"] == best_epoch else "<tr>")
                   + "".join(f"<td>{row[k]:.4g}</td>" if k != "epoch" else f"<td>{row[k]}</td>" for k in keys) + "</tr>"
                   for row in epochs)
    return f"<table><tr>{head}</tr>{body}</table>"
