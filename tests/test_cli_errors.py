"""Every command, walked through ordinary mistakes: each must end with exit 1 and one line, `zoo: error: ...`,
naming the path at fault, with no traceback and nothing left behind (2 only where argparse refuses the
command line itself).

The tests run as root, where permission bits do not stop reading or writing: unreadable and unwritable
places are made of what root cannot get past (a directory where a file is expected, a file where a folder
is, a FIFO, /proc, a file-size limit standing in for a full disk).
"""

import contextlib
import faulthandler
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import small_layers

from zoo.weights import save_weights


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds the start of its image data only (what a bomb's
    header looks like: the size is all that is read before refusing it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))


@pytest.fixture
def world(tmp_path, tiny_spec, monkeypatch, cli):
    """The files the mistakes are made with: weights of the tiny spec, images, a folder, a FIFO, ..."""
    from PIL import Image

    from zoo.registry import load_weights

    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "store"))
    np.save(tmp_path / "w.npy", small_layers())
    assert cli("convert", tmp_path / "w.npy", "-o", tmp_path / "w.safetensors")[0] == 0
    w = load_weights(tmp_path / "w.safetensors")
    save_weights(tmp_path / "badclasses.safetensors", w.spec, w.tensors, {"classes": "cat, dog, bird"})
    Image.new("RGB", (12, 12), "red").save(tmp_path / "img.png")
    (tmp_path / "huge.png").write_bytes(png_header(18000, 10000))  # 180 megapixels
    (tmp_path / "folder").mkdir()
    (tmp_path / "out").mkdir()  # an export's folder: nothing may be left in it
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("a file\n")
    (tmp_path / "binary").write_bytes(bytes(range(256)) * 4)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "garbage.onnx").write_bytes(b"not an onnx model" * 10)
    (tmp_path / "alien" / "assets").mkdir(parents=True)  # a SavedModel zoo did not write: no class names
    (tmp_path / "alien" / "saved_model.pb").write_bytes(b"\x08\x01")
    (tmp_path / "latin1.txt").write_bytes(f"{tmp_path / 'img.png'} caf\xe9\n".encode("latin-1"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + f"{tmp_path / 'img.png'} a\n{tmp_path / 'img.png'} b\n".encode())
    return tmp_path


@contextlib.contextmanager
def disk_full_at(nbytes: int):
    """Writes past `nbytes` fail (EFBIG) as on a full disk: RLIMIT_FSIZE, with SIGXFSZ ignored so that the
    write fails instead of the process being killed."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)



# (command line with {t} for the test's folder, the path the message must name, or None for a name that is
# no path); `full`: run with the disk full past 256 bytes
MISTAKES = [
    ("info nosuchnet", "nosuchnet"),
    ("info alexnet@nope", "alexnet@nope"),
    ("convert {t}/missing.npy", "{t}/missing.npy"),
    ("convert {t}/folder", "{t}/folder"),
    ("convert {t}/fifo", "{t}/fifo"),
    ("convert {t}/file.txt", "{t}/file.txt"),
    ("convert {t}/w.npy -o {t}/folder", "{t}/folder"),
    ("convert {t}/w.npy -o {t}/nowhere/w.safetensors", "{t}/nowhere"),
    ("convert {t}/w.npy -o {t}/file.txt/w.safetensors", "{t}/file.txt"),
    ("convert {t}/w.npy -o /proc/w.safetensors", "/proc/w.safetensors"),
    ("convert {t}/w.npy -o {t}/fifo", "{t}/fifo"),
    ("convert {t}/w.npy --spec nosuch@net", "nosuch@net"),
    ("convert {t}/w.npy --map {t}/missing.json", "{t}/missing.json"),
    ("convert {t}/w.npy --map {t}/binary", "{t}/binary"),
    ("convert caffemodel {t}/binary --prototxt {t}/binary", "{t}/binary"),
    ("verify {t}/missing.safetensors", "{t}/missing.safetensors"),
    ("verify {t}/folder", "{t}/folder"),
    ("verify {t}/fifo", "{t}/fifo"),
    ("verify {t}/w.npy", "{t}/w.npy"),
    ("verify {t}/badclasses.safetensors", "{t}/badclasses.safetensors"),
    ("export {t}/w.safetensors --opset 5 --out {t}/out", "opset 5"),
    ("export {t}/w.safetensors --opset 99 --out {t}/out", "opset 99"),
    ("export {t}/w.safetensors --out {t}/file.txt", "{t}/file.txt"),
    ("export {t}/w.safetensors --out /proc/zoo-export", "/proc/zoo-export"),
    ("export {t}/missing.safetensors", "{t}/missing.safetensors"),
    ("export {t}/badclasses.safetensors --out {t}/out", "{t}/badclasses.safetensors"),
    ("export {t}/w.safetensors --format tflite-int8 --calibration {t}/missing --out {t}/out", "{t}/missing"),
    ("predict {t}/missing.onnx {t}/img.png", "{t}/missing.onnx"),
    ("predict {t}/garbage.onnx {t}/img.png", "{t}/garbage.onnx"),
    ("predict {t}/alien {t}/img.png", "{t}/alien"),
    ("predict {t}/folder {t}/img.png", "{t}/folder"),
    ("predict {t}/w.safetensors {t}/missing.png", "{t}/missing.png"),
    ("predict {t}/w.safetensors {t}/empty", "{t}/empty"),
    ("predict {t}/w.safetensors {t}/huge.png", "huge.png: ValueError: over the 89,478,485-pixel limit"),
    ("predict {t}/w.safetensors {t}/img.png --top 0", "--top is 1 or more"),
    ("predict {t}/badclasses.safetensors {t}/img.png", "{t}/badclasses.safetensors"),
    ("features tiny@test {t}/img.png -o {t}/folder", "{t}/folder"),
    ("features tiny@test {t}/img.png -o {t}/nowhere/f.npy", "{t}/nowhere"),
    ("features tiny@test {t}/missing.png -o {t}/f.npy --weights random", "{t}/missing.png"),
    ("features tiny@test {t}/img.png -o {t}/f.npy --weights {t}/missing.safetensors", "{t}/missing.safetensors"),
    ("features tiny@test {t}/huge.png -o {t}/f.npy --weights random", "{t}/huge.png: over the 89,478,485-pixel limit"),
    ("features tiny@test {t}/img.png -o {t}/f.npy --batch-size 0 --weights random", "batch size is 1 or more, not 0"),
    ("bench {t}/missing.onnx", "{t}/missing.onnx"),
    ("bench {t}/w.safetensors --batch 0", "batch sizes are 1 or more"),
    ("bench {t}/w.safetensors --batch x", "--batch"),
    ("bench {t}/w.safetensors --seconds -1", "-1"),
    ("bench {t}/w.safetensors --runtimes tpu", "tpu"),
    ("report {t}/missing", "{t}/missing"),
    ("report {t}/file.txt", "{t}/file.txt"),
    ("report {t}/folder", "{t}/folder"),
    ("fetch nosuch@net", "nosuch@net"),
    ("fetch tiny@test", "tiny@test"),
    ("weights show nosuch@net", "nosuch@net"),
    ("weights rm nosuch@net", "nosuch@net"),
    ("weights show", "NAME"),
    pytest.param("finetune tiny@test --weights random --data {t}/missing", "{t}/missing", id="finetune-missing-data"),
    pytest.param("finetune tiny@test --weights random --seed -1 --out {t}/run", "--seed", id="finetune-seed"),
    pytest.param("finetune tiny@test --weights random --out {t}/file.txt", "{t}/file.txt", id="finetune-out-file"),
    pytest.param("finetune tiny@test --weights random --train-list {t}/latin1.txt --val-list {t}/latin1.txt --out {t}/run", "{t}/latin1.txt",
                 id="finetune-latin1-list"),
    pytest.param("finetune tiny@test --weights random --train-list {t}/bom.txt --val-list {t}/bom.txt --out {t}/run", "{t}/bom.txt",
                 id="finetune-bom-list"),
]
FULL_DISK = [
    ("convert {t}/w.npy -o {t}/full.safetensors", "{t}/full.safetensors"),
    ("export {t}/w.safetensors --format onnx --out {t}/out", "{t}/out"),
    ("features tiny@test {t}/img.png --layer conv1 -o {t}/f.npy --weights random", "{t}/f.npy"),
]
USAGE = ["list extra", "plugins extra", "completion tcsh", "weights frobnicate", "convert", "export {t}/w.safetensors --opset x"]


def _files(folder) -> set:
    return {p for p in folder.rglob("*")}


def _check(cli, world, line: str, named: str, full: bool = False):
    argv = line.format(t=world).split()
    before = _files(world)
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)  # a read of a FIFO would wait for ever: end the run instead
    try:
        with disk_full_at(256) if full else contextlib.nullcontext():
            code, _, err = cli(*argv)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert code == 1, (code, err)
    assert err.startswith("zoo: error: ") and err.count("\n") == 1, err
    assert named.format(t=world) in err and "Traceback" not in err and "unexpected" not in err, err
    assert _files(world) == before, _files(world) - before


@pytest.mark.parametrize("line, named", MISTAKES)
def test_a_mistake_is_one_line_naming_the_path(cli, world, line, named):
    _check(cli, world, line, named)


@pytest.mark.parametrize("line, named", FULL_DISK)
def test_a_full_disk_is_one_line_naming_the_output(cli, world, line, named):
    _check(cli, world, line, named, full=True)


@pytest.mark.parametrize("line", USAGE)
def test_a_malformed_command_line_is_a_usage_error(cli, world, line):
    code, _, err = cli(*line.format(t=world).split())
    assert code == 2 and "usage: zoo" in err and "Traceback" not in err


def test_debug_goes_before_or_after_the_command(tmp_path):
    missing = tmp_path / "missing.npy"
    for argv in (["--debug", "convert", str(missing)], ["convert", str(missing), "--debug"], ["verify", str(missing), "--debug"]):
        p = subprocess.run([sys.executable, "-m", "zoo", *argv], capture_output=True, text=True)
        assert p.returncode == 1 and "Traceback" in p.stderr and str(missing) in p.stderr, (argv, p.stderr[-500:])


def test_a_source_truncated_while_it_is_read_is_one_line(tmp_path):
    """A file that shrinks under the mapping: the pages past its new end raise SIGBUS when touched, which kills
    the forked reader (zoo.forked), not zoo."""
    source = tmp_path / "w.npy"
    np.save(source, {k: v for k, v in small_layers().items()})
    code = (f"import os, sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from conftest import TinySpecPlugin\nfrom zoo.plugins import get_plugins\n"
            "get_plugins().register(TinySpecPlugin(), name='tiny-specs')\n"
            "import zoo.converters.caffe_npy as reader\n"
            "mapped = reader.map_file\n"
            "def shrinking(path):  # mapped, then cut short by 'another process'\n"
            "    data = mapped(path)\n    os.truncate(path, 0)\n    return data\n"
            "reader.map_file = shrinking\n"
            "from zoo.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", code, "convert", str(source), "-o", str(tmp_path / "w.safetensors")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith(f"zoo: error: {source}: ") and p.stderr.count("\n") == 1, (p.returncode, p.stderr)
    assert json.dumps(sorted(os.listdir(tmp_path))) == json.dumps(["w.npy"])
