"""Run reports (zoo.report, `zoo report`): one small fine-tune through the CLI, its report checked, then copies of
its folder as an interrupted run and as a run without wrong images."""

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
from conftest import NarrowSpecPlugin
from PIL import Image

from zoo.cli import main

IMAGES = {"curves.png": (800, 300), "confusion.png": (300, 300), "wrong.png": (300, 300)}  # least width, height


@pytest.fixture(scope="module")
def finished(module_folder, example_data):
    """(run folder, `zoo finetune --json`'s output): narrow@test from random init, conv2 to fc8 trained for 2 epochs."""
    from zoo.plugins import get_plugins

    get_plugins().register(NarrowSpecPlugin(), name="narrow-specs")
    run = module_folder("report") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["finetune", "narrow", "--weights", "random", "--data", str(example_data), "--epochs", "2", "--batch-size", "32", "--optimizer", "adam",
                     "--lr", "0.003", "--train", "conv2,fc6,fc7,fc8", "--out", str(run), "--json"])
    assert code == 0
    lines = stdout.getvalue().splitlines()
    assert not any(line.startswith("report ") for line in lines)  # under --json the path is in the JSON only
    return run, json.loads("\n".join(lines[lines.index("{"):]))


def copy_run(finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished[0], copy)
    shutil.rmtree(copy / "report")
    return copy


def summary(run):
    return json.loads((run / "report" / "report.json").read_text())


def check_page(page):
    """Every image the page shows exists, decodes and is big enough to read; returns their names."""
    linked = set(re.findall(r'(?:src|href)="([^"]+)"', page.read_text()))
    for name in linked:
        with Image.open(page.parent / name) as image:
            image.load()
            width, height = IMAGES[name]
            assert image.format == "PNG" and image.width >= width and image.height >= height, (name, image.size)
            assert np.asarray(image.convert("L")).std() > 10, name  # drawn on, not blank
    return linked


def test_finetune_writes_a_report_linking_every_image(finished):
    run, result = finished
    page = run / "report" / "index.html"
    assert result["report"] == str(page)
    wrong = summary(run)["wrong"]
    assert check_page(page) == (set(IMAGES) if wrong else {"curves.png", "confusion.png"})
    text = page.read_text()
    assert "narrow@test" in text and "conv2, fc6, fc7, fc8" in text and "2 of 2" in text and "Interrupted" not in text
    assert len(re.findall(r"<tr(?: class=best)?><td>\d+</td>", text)) == 2  # a row per epoch
    assert len(re.findall(r"<tr class=best><td>\d+</td>", text)) == 1


def test_confusion_matrix_matches_independent_predictions(finished, narrow_spec):
    from zoo.predict import predict

    run, result = finished
    report = summary(run)
    classes = report["classes"]
    val = [line.rsplit(maxsplit=1) for line in (run / "val.txt").read_text().splitlines()]
    assert len(val) == 16  # 20% of example_data's 40 per class
    confusion = np.array(report["confusion"])
    assert confusion.sum() == report["val_images"] == len(val)
    # one image at a time through zoo predict's own path, from the best weights
    predicted = predict(run / "checkpoints" / "best.safetensors", [path for path, _ in val], top=1)
    want = np.zeros_like(confusion)
    for (_, label), p in zip(val, predicted):
        want[int(label), classes.index(p.top[0][0])] += 1
    np.testing.assert_array_equal(confusion, want)
    assert [r["file"] for r in report["predictions"]] == [path for path, _ in val]
    np.testing.assert_allclose([r["probability"] for r in report["predictions"]], [p.top[0][1] for p in predicted], rtol=1e-4)
    # the run's own validation accuracy at its best epoch
    assert np.trace(confusion) / confusion.sum() == pytest.approx(result["best_val_accuracy"], abs=1e-6)
    wrong = report["wrong"]
    assert len(wrong) == min(12, confusion.sum() - np.trace(confusion))
    assert all(w["true"] != w["predicted"] for w in wrong)
    assert [w["probability"] for w in wrong] == sorted((w["probability"] for w in wrong), reverse=True)


def test_interrupted_run_gets_the_same_report_from_its_checkpoints(finished, narrow_spec, tmp_path, cli):
    """Killed during epoch 3 of 4: no best.safetensors or weights.safetensors yet, metrics.csv short of the plan.
    The report rebuilds the best weights from the seed (frozen random layers) and the best slot."""
    run = copy_run(finished, tmp_path)
    (run / "checkpoints" / "best.safetensors").unlink()
    (run / "weights.safetensors").unlink()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"epochs": 4}))
    code, out, err = cli("report", run, "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert printed["report"] == str(run / "report" / "index.html")
    assert check_page(run / "report" / "index.html") >= {"curves.png", "confusion.png"}
    ours, theirs = summary(run), summary(finished[0])
    assert ours["confusion"] == theirs["confusion"]
    assert [(r["file"], r["predicted"]) for r in ours["predictions"]] == [(r["file"], r["predicted"]) for r in theirs["predictions"]]
    np.testing.assert_allclose([r["probability"] for r in ours["predictions"]], [r["probability"] for r in theirs["predictions"]],
                               rtol=1e-6)
    assert (ours["epochs_finished"], ours["epochs_planned"]) == (2, 4)
    assert "Interrupted after epoch 2 of 4" in (run / "report" / "index.html").read_text()


def test_no_wrong_image_is_said_not_drawn(finished, narrow_spec, tmp_path, cli, monkeypatch):
    from zoo.finetune import caching

    run = copy_run(finished, tmp_path)
    (run / "report").mkdir()
    (run / "report" / "wrong.png").write_bytes(b"an older report's")
    monkeypatch.setattr(caching, "features", lambda model, samples, spec, batch_size: np.eye(2)[samples.labels] * 5)
    code, out, err = cli("report", run)
    assert code == 0, err
    assert out == f"report {run / 'report' / 'index.html'}\n"
    assert check_page(run / "report" / "index.html") == {"curves.png", "confusion.png"}
    assert not (run / "report" / "wrong.png").exists()
    assert "None: the best weights classify all 16 validation images right" in (run / "report" / "index.html").read_text()
    assert np.trace(summary(run)["confusion"]) == 16


def test_errors_are_one_line(finished, tmp_path, cli):
    code, out, err = cli("report", tmp_path)
    assert code == 1 and out == ""
    assert err == f"zoo: error: {tmp_path}: not a run folder (no config.json)\n"
    run = copy_run(finished, tmp_path)
    (run / "val.txt").unlink()  # as in a run started before zoo wrote it
    code, out, err = cli("report", run)
    assert code == 1 and out == ""
    assert err == f"zoo: error: {run}: no val.txt: the run was started by a zoo without reports (--resume writes it)\n"


def test_ctrl_c_during_finetune_says_how_to_continue_and_draw_the_report(finished, tmp_path, cli, monkeypatch):
    import zoo.finetune

    def interrupted(**config):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo.finetune, "finetune", interrupted)
    run = copy_run(finished, tmp_path)
    code, out, err = cli("finetune", "narrow", "--data", tmp_path, "--out", run)
    assert (code, out) == (130, "")
    assert err == (f"zoo: interrupted; {run} keeps its last complete epoch: `zoo finetune ... --out {run} --resume` "
                   f"continues it, `zoo report {run}` draws its report\n")
    code, out, err = cli("finetune", "narrow", "--data", tmp_path, "--out", tmp_path / "before-any-epoch")
    assert (code, out, err) == (130, "", "zoo: interrupted\n")
