"""PyTorch's legacy (pre-1.6, non-zip) torch.save format, read without torch; and tensors whose layout would
make a tiny file widen into gigabytes, in either format. Files are written by real torch==2.13.0 (CPU)."""

import collections
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import DATA, fuzz_convert  # noqa: E402
from seeded import seeded_state  # noqa: E402
from torch_models import TinyNet  # noqa: E402
from zoo.converters import torch_pth  # noqa: E402

from zoo import ZooError  # noqa: E402
from zoo.conversion import convert  # noqa: E402
from zoo.registry import load_weights  # noqa: E402

LEGACY = {"_use_new_zipfile_serialization": False}
FORMATS = {"zip": {}, "legacy": LEGACY}


def read_state(path):
    """The file's state dict as zoo reads it: {key: numpy array}."""
    state = torch_pth.state_dict_of(torch_pth.open_torch_file(path).load(), path)
    torch_pth.check_storage_use(state, path)
    return {k: t.numpy() for k, t in state.items()}


def as_numpy(t):
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def converted(path, **kw):
    return load_weights(convert(path, **kw).output).tensors


@pytest.fixture
def tiny_torch(tiny_spec):
    torch.manual_seed(1)
    return TinyNet()


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def test_every_storage_type_reads_as_torch_has_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict((str(d), (torch.randn(5, 7, generator=g) * 50).to(d)) for d in DTYPES)
    assert len(DTYPES) == len(torch_pth.STORAGE_DTYPES)  # every storage type the zip reader accepts
    for name, kw in FORMATS.items():
        torch.save(sd, tmp_path / f"{name}.pth", **kw)
    legacy, zipped = read_state(tmp_path / "legacy.pth"), read_state(tmp_path / "zip.pth")
    assert list(legacy) == list(sd)
    for key, t in sd.items():
        np.testing.assert_array_equal(legacy[key], as_numpy(t))
        assert legacy[key].dtype == zipped[key].dtype == as_numpy(t).dtype
        np.testing.assert_array_equal(legacy[key], zipped[key])


def test_views_offsets_strides_and_shared_storage(tmp_path):
    big = torch.randn(200, 70)
    sd = collections.OrderedDict()
    sd["flat"] = big.flatten()[100:208].view(4, 3, 3, 3)
    sd["row"] = big[3, 5:9]  # offset view sharing the storage
    sd["transposed"] = big[20:84, 1:4].t()  # non-contiguous: strides (1, 70)
    sd["strided"] = big[50, ::20][:3]  # stride 20
    sd["scalar"] = torch.tensor(7, dtype=torch.int64)
    sd["empty"] = torch.zeros(0, 3)
    sd["unused_stride"] = torch.randn(3).as_strided((1, 3), (2**62, 1))  # valid in torch: a size-1 dimension's
    sd["empty_wide"] = torch.zeros(0).as_strided((0, 2**20, 2**19), (1, 2**62, 1))  # ... and an empty tensor's
    torch.save(sd, tmp_path / "v.pth", **LEGACY)
    got = read_state(tmp_path / "v.pth")
    for key, t in sd.items():
        assert got[key].shape == tuple(t.shape)
        np.testing.assert_array_equal(got[key], t.numpy())
    assert got["transposed"].strides == (4, 280)  # a zero-copy view of the file, as torch laid it out
    assert not got["flat"].flags.owndata and not got["flat"].flags.writeable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tiny_net_legacy_converts_as_its_zip_does(tmp_path, tiny_torch, dtype, cli):
    sd = {k: v.to(dtype) for k, v in tiny_torch.state_dict().items()}
    torch.save(sd, tmp_path / "zip.pth")
    torch.save(sd, tmp_path / "legacy.pth", **LEGACY)
    code, out, err = cli("convert", tmp_path / "legacy.pth", "-o", tmp_path / "legacy.safetensors")  # sniffed
    assert code == 0, err
    want = converted(tmp_path / "zip.pth")
    got = load_weights(tmp_path / "legacy.safetensors")
    assert got.metadata["source_format"] == "torch-legacy-state-dict"
    assert sorted(got.tensors) == sorted(want) == ["conv1.bias", "conv1.kernel", "fc2.bias", "fc2.kernel"]
    for name in want:
        np.testing.assert_array_equal(got.tensors[name], want[name])
    np.testing.assert_array_equal(got.tensors["conv1.bias"], sd["features.0.bias"].float().numpy())


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 7, "optimizer": {"lr": 0.1}},
    lambda sd: {"model": sd, "args": ["--lr", "0.1"]},
    lambda sd: collections.OrderedDict(("module." + k, v) for k, v in sd.items()),  # DataParallel
])
def test_what_training_scripts_save(tmp_path, tiny_torch, wrap):
    sd = tiny_torch.state_dict()
    torch.save(wrap(sd), tmp_path / "c.pth", **LEGACY)
    w = converted(tmp_path / "c.pth")
    np.testing.assert_array_equal(w["conv1.bias"], sd["features.0.bias"].numpy())
    np.testing.assert_array_equal(w["fc2.kernel"][:, 0], sd["classifier.weight"][0].numpy().reshape(4, 4, 4).transpose(1, 2, 0).ravel())


def test_other_pickle_protocols(tmp_path, tiny_torch):
    sd = tiny_torch.state_dict()
    torch.save(sd, tmp_path / "p4.pth", pickle_protocol=4, **LEGACY)
    np.testing.assert_array_equal(converted(tmp_path / "p4.pth")["fc2.bias"], sd["classifier.bias"].numpy())


def test_seeded_resnet50_legacy_and_zip_give_the_same_weights(tmp_path):
    z = np.load(DATA / "torchvision" / "resnet50.npz")
    shapes = json.loads(str(z["shapes"]))
    state = seeded_state({k: shapes[k] for k in z["keys"].tolist()}, int(z["seed"]))
    sd = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items())
    for name, kw in FORMATS.items():
        torch.save(sd, tmp_path / f"{name}.pth", **kw)
    results = {name: convert(tmp_path / f"{name}.pth") for name in FORMATS}
    assert results["legacy"].spec == results["zip"].spec == "resnet50@torchvision"
    want, got = (load_weights(results[n].output).tensors for n in ("zip", "legacy"))
    assert sorted(got) == sorted(want) and len(got) == 53 + 53 * 4 + 2  # convs, batch norms, fc
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_array_equal(got["conv1.kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(got["layer4.2.bn3.moving_variance"], state["layer4.2.bn3.running_var"])


def test_broken_files_get_one_line(tmp_path, tiny_torch, cli):
    torch.save(tiny_torch.state_dict(), tmp_path / "good.pth", **LEGACY)
    good = (tmp_path / "good.pth").read_bytes()
    data_start = len(good) - (4 * 27 + 4 + 3 * 64 + 3) * 4 - 4 * 8  # the four storages and their counts
    cuts = {"in-pickle.pth": 300, "in-keys.pth": data_start - 10, "in-count.pth": data_start + 3,
            "in-data.pth": len(good) - 1}
    for name, cut in cuts.items():
        (tmp_path / name).write_bytes(good[:cut])
    (tmp_path / "v1002.pth").write_bytes(good.replace(pickle.dumps(1001, protocol=2), pickle.dumps(1002, protocol=2), 1))
    pid_end = re.compile(rb"Nt(q.)Q", re.S)  # view_metadata None, end of the persistent id, BINPUT, BINPERSID
    assert len(pid_end.findall(good)) == 4  # make the first a view
    (tmp_path / "view.pth").write_bytes(pid_end.sub(lambda m: b"(X\x01\x00\x00\x00vK\x00K\x01tt" + m[1] + b"Q", good, 1))
    expected = {"in-pickle.pth": "not a valid legacy torch.save stream (EOFError",
                "in-keys.pth": "not a valid legacy torch.save stream (EOFError",
                "in-count.pth": "the file ends before storage", "in-data.pth": "(truncated?)",
                "v1002.pth": "protocol version 1002: only 1001 is known", "view.pth": "storage view ('v', 0, 1)"}
    before = set(os.listdir(tmp_path))
    for name, message in expected.items():
        path = tmp_path / name
        code, out, err = cli("convert", "torch", path)
        assert code == 1, name
        assert err.startswith(f"zoo: error: {path}: ") and err.count("\n") == 1, err
        assert message in err, err
    assert set(os.listdir(tmp_path)) == before


def test_big_endian_is_refused(tmp_path, tiny_torch):
    torch.save(tiny_torch.state_dict(), tmp_path / "le.pth", **LEGACY)
    little = b"X\r\x00\x00\x00little_endianq\x02\x88"  # the sys_info entry, True
    data = (tmp_path / "le.pth").read_bytes()
    assert data.count(little) == 1
    (tmp_path / "be.pth").write_bytes(data.replace(little, little[:-1] + b"\x89"))
    with pytest.raises(ZooError, match=r"be\.pth: not a little-endian file"):
        convert(tmp_path / "be.pth")


def test_hostile_legacy_pth_is_refused_before_it_runs(tmp_path, cli):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"features.0.weight": Payload()}, tmp_path / "evil.pth", **LEGACY)
    code, _, err = cli("convert", "torch", tmp_path / "evil.pth")
    assert code == 1 and ("posix.system" in err or "os.system" in err) and err.count("\n") == 1, err
    assert not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()  # torch's unsafe mode runs it: the test file is real
    (tmp_path / "evil4.pth").write_bytes(legacy_stream(b"\x80\x04\x8c\x05os\nsy\x8c\x06system\x93."))  # STACK_GLOBAL
    code, _, err = cli("convert", "torch", tmp_path / "evil4.pth")
    assert code == 1 and "calls os\\nsy.system" in err and err.count("\n") == 1, err


def legacy_stream(obj_pickle: bytes, keys=()) -> bytes:
    """A legacy torch.save stream around a hand-written object pickle."""
    head = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}]
    return b"".join(pickle.dumps(x, protocol=2) for x in head) + obj_pickle + pickle.dumps(list(keys), protocol=2)


@pytest.mark.parametrize("state", [
    b"}X\x04\x00\x00\x00nameX\r\x00\x00\x00DoubleStorages",  # a dict: __dict__ update
    b"N}X\x04\x00\x00\x00nameX\r\x00\x00\x00DoubleStorages\x86",  # (None, slots): setattr
])
def test_a_pickle_cannot_change_what_a_storage_type_means(tmp_path, tiny_torch, state):
    (tmp_path / "evil.pth").write_bytes(legacy_stream(b"\x80\x02ctorch\nFloatStorage\n" + state + b"b."))
    with pytest.raises(ZooError, match=r"evil\.pth: (not a valid legacy torch.save stream|refused)"):  # safe_pickle
        convert(tmp_path / "evil.pth")  # may refuse the BUILD itself; else the immutable type does
    assert torch_pth.ALLOWED[("torch", "FloatStorage")].name == "FloatStorage"
    torch.save(tiny_torch.state_dict(), tmp_path / "good.pth", **LEGACY)
    np.testing.assert_array_equal(converted(tmp_path / "good.pth")["conv1.bias"], tiny_torch.features[0].bias.detach().numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_sharing_elements_are_refused(tmp_path, fmt):
    w = torch.randn(4, 3, 3, 3)
    sd = {"features.0.weight": w, "features.0.bias": torch.randn(4), "tied.weight": w}
    torch.save(sd, tmp_path / "tied.pth", **FORMATS[fmt])
    with pytest.raises(ZooError, match="tensors take 216 elements from storage .* of 108: they overlap"):
        convert(tmp_path / "tied.pth")
    torch.save({"features.0.weight": torch.randn(5).as_strided((4, 2), (1, 1))}, tmp_path / "alias.pth", **FORMATS[fmt])
    with pytest.raises(ZooError, match=r"size \(4, 2\) with strides \(1, 1\) reads storage elements more than once"):
        convert(tmp_path / "alias.pth")
    torch.save({"features.0.weight": torch.zeros(0).as_strided((0, 2**30, 2**30), (1, 1, 1))}, tmp_path / "e.pth", **FORMATS[fmt])
    with pytest.raises(ZooError, match=r"e\.pth: tensor of size \(0, 1073741824, 1073741824\): too large"):
        convert(tmp_path / "e.pth")


BOMB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1500 << 20, 1500 << 20))  # numpy and zoo fit; a widened copy would not
from zoo.cli import main
sys.exit(main(["convert", "torch", sys.argv[1]]))
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_zero_stride_bomb_fails_cleanly_under_a_memory_limit(tmp_path, fmt):
    bomb = torch.zeros(1, dtype=torch.bfloat16).expand(1 << 17, 1 << 17)  # 2**34 elements over 1: 64 GiB as float32
    torch.save({"features.0.weight": bomb, "features.0.bias": torch.zeros(4)}, tmp_path / "bomb.pth", **FORMATS[fmt])
    assert (tmp_path / "bomb.pth").stat().st_size < 4096
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")  # per-thread buffers on many cores
    run = subprocess.run([sys.executable, "-c", BOMB, tmp_path / "bomb.pth"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert run.returncode == 1 and "MemoryError" not in run.stderr, run.stderr
    assert run.stderr == (f"zoo: error: {tmp_path / 'bomb.pth'}: tensor of size (131072, 131072) with strides (0, 0) "
                          "reads storage elements more than once\n")


def test_mutated_legacy_files_fail_cleanly(tmp_path, tiny_torch):
    torch.save(tiny_torch.state_dict(), tmp_path / "ok.pth", **LEGACY)
    errors = fuzz_convert(tmp_path, (tmp_path / "ok.pth").read_bytes(), ".pth", "torch", 200, seed=5)
    assert 100 < errors < 200  # mutations inside the storages still convert
