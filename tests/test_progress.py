"""Progress of long work (zoo.progress) as the commands show it: a live tqdm bar with rate and time left on a
terminal, plain lines otherwise, always on stderr, so that `--json` output is the whole of stdout. The frozen-
feature pass of `zoo finetune` is checked in test_cli_habits, `zoo fetch` in test_fetch."""

import io
import json
import re
import sys

import numpy as np
import pytest

from zoo import progress


@pytest.fixture
def every_update(monkeypatch):
    """Off a terminal, a plain line from the first update on, as long work gets after LOG_EVERY seconds."""
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)


def plain_lines(err: str, desc: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.startswith(desc)]
    assert "\r" not in err and lines and "100%" in lines[-1], err
    return lines


def test_a_terminal_gets_a_live_bar_with_rate_and_time_left(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress.bar(4 * 2**20, "converting bvlc_alexnet.npy", "B") as b:
        b.started -= 2  # two seconds of work done: past the terminal's one-second wait
        for _ in range(4):
            b.update(2**20)
    text = sys.stderr.getvalue()
    assert "\r" in text and "\n" not in text.rstrip("\n")  # redrawn in place, one line
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("converting bvlc_alexnet.npy: 100%") and "4.00M/4.00M" in last, last
    assert re.search(r"\[00:0\d<00:00, [\d.]+MB/s\]$", last), last  # elapsed < left, bytes per second


def test_convert_and_features_report_progress_on_stderr_only(cli, narrow_spec, example_data, tmp_path, every_update):
    from zoo.example import seeded_weights

    tensors = seeded_weights(narrow_spec)
    npy = tmp_path / "narrow.npy"
    np.save(npy, {n.name: [tensors[f"{n.name}.kernel"], tensors[f"{n.name}.bias"]] for n in narrow_spec.weighted_nodes})
    code, out, err = cli("convert", "caffe", npy, "--spec", "narrow@test", "-o", tmp_path / "w.safetensors", "--json")
    assert code == 0, err
    assert json.loads(out)["spec"] == "narrow@test"  # forked child's progress came through stderr, not stdout
    assert "B/s" in plain_lines(err, "converting narrow.npy:")[-1]
    code, out, err = cli("features", "narrow@test", example_data, "--weights", tmp_path / "w.safetensors", "--batch-size", "8",
                         "-o", tmp_path / "f.npy", "--json")
    assert code == 0, err
    assert json.loads(out)["shape"][0] == 80
    assert "80/80" in plain_lines(err, "features of")[-1]


def test_export_reports_progress_per_format(cli, narrow_spec, narrow_run, tmp_path, every_update):
    code, out, err = cli("export", narrow_run, "--format", "savedmodel,onnx", "--out", tmp_path / "exported", "--json")
    assert code == 0, err
    assert len(json.loads(out)["exported"]) == 2
    assert "2/2" in plain_lines(err, f"exporting to {tmp_path / 'exported'}:")[-1]
