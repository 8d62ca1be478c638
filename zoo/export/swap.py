"""Replacing an earlier export: new files reach their names only once checked, and a kill at any moment leaves
the earlier export or the new one whole."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

ONNX_FILES = ("model.onnx.data", "model.onnx")  # the main file last
FILES = {"keras": ("model.keras.json", "model.keras"), "tflite": ("model.tflite.json", "model.tflite"),
         "tflite-int8": ("model-int8.tflite.json", "model-int8.tflite"), "onnx-int8": ("model-int8.onnx",)}
EXPORTS = (("savedmodel",), ONNX_FILES, *FILES.values())


def swap_in(out: Path, new: dict[str, Path]):
    """Move each new file or folder to out/<name>, the last name being the export's main file; a name whose new
    path does not exist is removed. The earlier export goes aside first (main file first) and is deleted
    last, so a kill at any moment leaves the earlier export whole (in place, or aside where recover() puts
    it back) or the new one whole: never a mix, never nothing."""
    names = list(new)
    aside = recover(out, names)
    aside.mkdir()
    for name in reversed(names):  # while the main file is in place, the earlier export is whole
        if (out / name).exists():
            os.replace(out / name, aside / name)
    for name in names:  # once the main file is in place, the new export is whole
        if new[name].exists():
            os.replace(new[name], out / name)
    shutil.rmtree(aside)


def recover(out: Path, names: list[str]) -> Path:
    """Finish or undo a swap_in of `names` that was killed: without its main file in place, what went aside
    goes back over what came in (the main file is absent; the others are files). Returns the aside folder's
    path (absent now)."""
    aside = out / f".{names[-1]}.old"
    if aside.exists():
        if not (out / names[-1]).exists():
            for name in names:
                if (aside / name).exists():
                    os.replace(aside / name, out / name)
        shutil.rmtree(aside)
    return aside


@contextmanager
def staged(out: Path, fmt: str):
    """A fresh hidden folder in `out` for `fmt`'s files, removed afterwards whatever happens: they reach their
    names only by swap_in, once checked, so a failed check leaves an earlier export as it was."""
    tmp = out / f".{fmt}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(out: Path, tmp: Path, fmt: str, meta: dict) -> Path:
    """Write `meta` as the format's `<file>.json` where it has one, and move its checked files into place."""
    names = FILES[fmt]
    if names[0].endswith(".json"):
        (tmp / names[0]).write_text(json.dumps(meta, indent=2) + "\n")
    swap_in(out, {name: tmp / name for name in names})
    return out / names[-1]
