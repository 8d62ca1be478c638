"""Small files that declare gigabytes: HDF5 datasets never written (HDF5 makes their values up from the fill
value), gzip-compressed zeros, and zip archives whose compressed members add up.

Each is converted by `zoo convert` in a child process under an address-space limit and a timeout (as the
pickle bombs are): exit 1, one line naming the file and the problem, quickly, with little memory. Before
DeclaredBytes, the unwritten and the gzip files ended in a MemoryError after allocating gigabytes; before
MappedZip's running total (a cap per member), the torch zip did.
"""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from test_pickle_bombs import CHILD
from zoo.converters.keras_h5 import read_h5_params

from zoo import ZooError
from zoo.mapped import INFLATE_RATIO, map_file

FC6 = (25088, 4096)  # vgg16's largest tensor: each bomb tensor below is within the largest tensor of a spec


def keras3_layers(f, n: int, **dataset):
    """`n` dense layers in Keras 3's .weights.h5 layout (layers/<group>/vars/0), each kernel made by `dataset`."""
    for i in range(n):
        group = f.create_group(f"layers/dense_{i}/vars")
        group.attrs["name"] = f"dense_{i}"
        group.create_dataset("0", **dataset)


def unwritten(path):
    """20 full-size float32 kernels, chunked, never written: 8 GB declared in ~100 KB."""
    import h5py

    with h5py.File(path, "w") as f:
        keras3_layers(f, 20, shape=FC6, dtype="f4", chunks=(64, 4096))


def gzip_zeros(path):
    """40 kernels of 32 MB of gzip-compressed zeros: 1.3 GB from ~1 MB."""
    import h5py

    zeros = np.zeros((2048, 4096), np.float32)
    with h5py.File(path, "w") as f:
        keras3_layers(f, 40, data=zeros, chunks=(256, 4096), compression="gzip")


def partly_written(path):
    """Uncompressed chunked kernels with one chunk written each: the rest would be the fill value."""
    import h5py

    with h5py.File(path, "w") as f:
        keras3_layers(f, 20, shape=FC6, dtype="f4", chunks=(1, 4096))
        for i in range(20):
            f[f"layers/dense_{i}/vars/0"][0] = 1.0


def _padding(archive: zipfile.ZipFile, size: int):
    """A stored member of random bytes: the archive is larger, so that each compressed member alone is within
    INFLATE_RATIO times it and only their running total is not."""
    archive.writestr(zipfile.ZipInfo("padding.bin"), np.random.default_rng(0).bytes(size), zipfile.ZIP_STORED)


def keras_archive(path):
    """A .keras zip whose model.weights.h5 and config.json are deflated, each inflating to 3x the archive."""
    import h5py

    h5 = path.with_suffix(".h5")
    with h5py.File(h5, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.zeros(3 << 18, np.float32))  # 3 MB
    config = json.dumps({"class_name": "Functional", "config": {"layers": []}}) + " " * (3 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        _padding(z, 1 << 20)
        z.write(h5, "model.weights.h5")
        z.writestr("config.json", config)
    h5.unlink()


def torch_zip(path):
    """torch.save's zip of 150 one-element tensors whose storage members are each 4 MB of deflated zeros:
    600 MB inflated from ~3 MB."""
    torch = pytest.importorskip("torch")
    small = path.with_suffix(".small")
    torch.save({f"t{i}": torch.zeros(1) for i in range(150)}, small)
    zeros = bytes(4 << 20)
    with zipfile.ZipFile(small) as zin, zipfile.ZipFile(path, "w") as zout:
        _padding(zout, 2 << 20)
        for info in zin.infolist():
            storage = "/data/" in info.filename and info.filename.rsplit("/", 1)[1].isdigit()
            zout.writestr(info.filename, zeros if storage else zin.read(info), zipfile.ZIP_DEFLATED if storage else zipfile.ZIP_STORED)
    small.unlink()


BOMBS = [("h5", unwritten, ".weights.h5", "layers/dense_0/vars/0 was never written"),
         ("h5", gzip_zeros, ".weights.h5", f"compressed datasets declare 1,342,177,280 bytes, over {INFLATE_RATIO}x the file's"),
         ("h5", partly_written, ".weights.h5", "layers/dense_0/vars/0 is only partly written (16,384 of 411,041,792 bytes stored)"),
         ("h5", keras_archive, ".keras", "config.json claims 3,145,782 bytes inflated: with the members before it"),
         ("torch", torch_zip, ".pth", f"claims 4,194,304 bytes inflated: with the members before it, over {INFLATE_RATIO}x the archive")]


@pytest.mark.parametrize("reader, make, suffix, message", BOMBS, ids=[b[1].__name__ for b in BOMBS])
def test_declared_gigabytes_are_refused_in_one_line_quickly_and_small(tmp_path, reader, make, suffix, message):
    path = tmp_path / f"bomb{suffix}"
    make(path)
    size = path.stat().st_size
    assert size < 4 << 20
    child = subprocess.run([sys.executable, "-c", CHILD, reader, str(path), str(tmp_path / "out.safetensors")],
                           capture_output=True, text=True, timeout=30, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert child.returncode == 1, (child.returncode, child.stderr[-2000:])
    assert child.stderr.startswith(f"zoo: error: {path}: ") and child.stderr.count("\n") == 1, child.stderr[-2000:]
    assert message in child.stderr and "Traceback" not in child.stderr and "MemoryError" not in child.stderr, child.stderr
    result = json.loads(child.stdout)
    assert result["seconds"] < 2, result
    assert result["peak"] < 400 << 20, result
    assert not (tmp_path / "out.safetensors").exists()


def test_uncompressed_datasets_fit_in_the_file(tmp_path):
    """What uncompressed datasets declare is in the file: declaring more means a corrupt file (checked here with a
    mapping shorter than the file, as a file whose datasets' addresses overlap would be)."""
    import h5py

    path = tmp_path / "w.weights.h5"
    with h5py.File(path, "w") as f:
        keras3_layers(f, 2, data=np.ones((64, 64), np.float32))
    data = map_file(path)
    assert read_h5_params(path, 1 << 20, data)[0].keys() == {"dense_0", "dense_1"}
    with pytest.raises(ZooError, match="uncompressed datasets declare 32,768 bytes, more than the file's 20,000"):
        read_h5_params(path, 1 << 20, data[:20_000])


def test_datasets_beyond_every_spec_are_refused(tmp_path, tiny_spec, cli):
    """With --spec, all datasets together declare no more than the spec's tensors at 8 bytes a value."""
    import h5py

    path = tmp_path / "w.weights.h5"
    with h5py.File(path, "w") as f:
        keras3_layers(f, 3, data=np.ones((16, 16), np.float32))  # 3 KB; tiny@test's tensors: 2.4 KB at float64
    code, _, err = cli("convert", "h5", path, "--spec", "tiny@test")
    assert code == 1 and err == (f"zoo: error: {path}: its datasets declare 3,072 bytes, more than all the tensors of "
                                 f"the spec(s) it could be for (2,456)\n"), err
