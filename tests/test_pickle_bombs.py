"""Pickles that make work without code, and pickles that try to change the unpickler for later files.

Each bomb is a hand-written opcode stream put where the caffe reader (an object .npy) and the torch
reader (a torch.save zip's data.pkl) read it, converted by `zoo convert` in a child process under an
address-space limit and a timeout: it must end with exit 1 and one line naming the file, quickly,
with little memory. Before the unpickler's budget, the same files ran for minutes until the memory
limit (doubling, memo, APPENDS), ended in a MemoryError (length claim, calls) or a segmentation fault
(deep key); the deep list was already refused.
"""

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from conftest import small_layers
from py2pickle import _wrap, py2_pickle
from zoo.converters import caffe_npy, torch_pth

from zoo import ZooError, safe_pickle

LIMIT = 1536 << 20  # bytes of address space for the child: numpy and zoo take ~150 MB
CHILD = rf"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))
from zoo.cli import main
start = time.perf_counter()
code = main(["convert", sys.argv[1], sys.argv[2], "-o", sys.argv[3]])
seconds = time.perf_counter() - start
peak = next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"seconds": seconds, "peak": peak}}))
sys.exit(code)
"""


def _put(i: int) -> bytes:
    return b"q" + bytes([i])  # BINPUT


def _get(i: int) -> bytes:
    return b"h" + bytes([i])  # BINGET


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def doubling(levels=40) -> bytes:
    """A list holding the list before it twice, `levels` deep: 2**40 leaves from 330 bytes."""
    out = b"]" + _put(0)
    for i in range(1, levels + 1):
        out += b"(" + _get(i - 1) * 2 + b"l" + _put(i)
    return out


def deep_list(n=100_000) -> bytes:
    return b"]" * n + b"a" * (n - 1)  # n empty lists, each APPENDed to the one before


def deep_key(n=250_000) -> bytes:
    return b"})" + b"\x85" * n + b"Ns"  # {((((),),)...): None}: hash() recurses n deep in C (8 MB stack: ~130k)


def memo_get(n=20_000) -> bytes:
    return b"(N" + b"2" * (n - 1) + b"l" + _put(0) + b"(" + _get(0) * n + b"l"  # n GETs of a list of n


def appends(n=100_000) -> bytes:
    return b"]((N" + b"2" * (n - 1) + b"l" + b"2" * (n - 1) + b"e"  # APPENDS n DUPs of a list of n


def length_claim() -> bytes:
    return b"\x96" + struct.pack("<Q", 1 << 40) + b"x" * 16  # BYTEARRAY8 of 1 TiB, 16 bytes present


def encode_calls(n=40_000) -> bytes:
    """_codecs.encode of one 64 KiB string n times, kept in a list: 2.6 GB from 500 KB."""
    return (b"c_codecs\nencode\n" + _put(0) + _unicode("x" * 65536) + b"\x85" + _put(1)
            + b"](" + (_get(0) + _get(1) + b"R") * n + b"e")


def ordereddict_calls(pairs=10_000, n=20_000) -> bytes:
    """OrderedDict(one list of `pairs` pairs) n times: 2*10**8 entries from 300 KB."""
    items = b"".join(b"J" + struct.pack("<i", i) + b"N\x86" for i in range(pairs))
    return (b"ccollections\nOrderedDict\n" + _put(0) + b"(" + items + b"l\x85" + _put(1)
            + b"](" + (_get(0) + _get(1) + b"R") * n + b"e")


def write_npy(path, stream: bytes):
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (), }"
    header += b" " * (63 - len(header)) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + stream)


def write_pth(path, stream: bytes):
    with zipfile.ZipFile(path, "w") as z:  # what torch.save writes around data.pkl
        z.writestr("archive/data.pkl", stream)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


READERS = {"caffe": (".npy", write_npy), "torch": (".pth", write_pth)}
EXPANDS = "refused: the pickle expands to more than"
REFUSALS = {doubling: EXPANDS, deep_list: "refused: the pickle nests containers more than 64 deep",
            deep_key: "refused a dict key or set member of type tuple", memo_get: EXPANDS, appends: EXPANDS,
            length_claim: "data claims 1099511627776 bytes where only 17 remained"}
BOMBS = [("caffe", encode_calls, EXPANDS), ("torch", ordereddict_calls, EXPANDS)] + [
    (reader, bomb, message) for bomb, message in REFUSALS.items() for reader in READERS]


@pytest.mark.parametrize("reader, bomb, message", BOMBS, ids=[f"{r}-{b.__name__}" for r, b, _ in BOMBS])
def test_bombs_are_refused_in_one_line_quickly_and_small(tmp_path, reader, bomb, message):
    suffix, write = READERS[reader]
    path = tmp_path / f"bomb{suffix}"
    write(path, b"\x80\x02" + bomb() + b".")
    size = path.stat().st_size
    timeout = 20 + size / 20_000  # seconds: the child's imports, then work in proportion to the file
    child = subprocess.run([sys.executable, "-c", CHILD, reader, str(path), str(tmp_path / "out.safetensors")],
                           capture_output=True, text=True, timeout=timeout, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert child.returncode == 1, (child.returncode, child.stderr[-2000:])
    assert child.stderr.startswith(f"zoo: error: {path}: ") and child.stderr.count("\n") == 1, child.stderr[-2000:]
    assert message in child.stderr and "Traceback" not in child.stderr and "MemoryError" not in child.stderr
    result = json.loads(child.stdout)
    assert result["seconds"] < 1 + size / 100_000, result  # 0.1-0.8 s here; the timeout is 20 s and more
    assert result["peak"] < 400 << 20, result
    assert not (tmp_path / "out.safetensors").exists()


# --- a hostile file changes nothing for the next one -------------------------------------------------


def _hostile(module: str, name: str) -> list[bytes]:
    """Streams that try to change the allow-list value `module.name`: BUILD with a dict state, BUILD with
    slot state (setattr), SETITEM and APPEND into it, and the same on what an allowed call returns of it."""
    target = f"c{module}\n{name}\n".encode()
    retype = _unicode("name") + _unicode("IntStorage")  # what would make torch.FloatStorage read int32
    passed = b"ctorch._utils\n_rebuild_parameter\n" + target + b"NN\x87R"  # _rebuild_parameter(x, None, None) is x
    return [target + b"}" + retype + b"sb.", target + b"N}" + retype + b"s\x86b.",
            target + retype + b"s.", target + b"Na.", passed + b"}" + retype + b"sb."]


def _snapshot(allowed: dict):
    return [(dict(vars(v)) if hasattr(v, "__dict__") else None, getattr(v, "__defaults__", None),
             getattr(v, "__kwdefaults__", None), [getattr(v, a) for a in getattr(type(v), "__slots__", ())])
            for v in allowed.values()]


def test_a_hostile_npy_changes_nothing_for_the_next_file(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, small_layers())
    before, globals_before = caffe_npy.read_npy_object(good), _snapshot(safe_pickle.NUMPY_GLOBALS)
    for i, stream in enumerate(s for module, name in safe_pickle.NUMPY_GLOBALS for s in _hostile(module, name)):
        write_npy(tmp_path / f"evil{i}.npy", b"\x80\x02" + stream)
        with pytest.raises(ZooError, match="evil"):
            caffe_npy.read_npy_object(tmp_path / f"evil{i}.npy")
    assert _snapshot(safe_pickle.NUMPY_GLOBALS) == globals_before
    after = caffe_npy.read_npy_object(good)
    assert after.keys() == before.keys()
    for layer, (w, b) in before.items():
        for old, new in zip((w, b), after[layer]):
            assert new.dtype == old.dtype and np.array_equal(new, old)


def test_a_hostile_pth_changes_nothing_for_the_next_file(tmp_path, tiny_spec):
    torch = pytest.importorskip("torch")
    from zoo.conversion import convert
    from zoo.registry import load_weights

    torch.manual_seed(0)
    state = OrderedDict([("features.0.weight", torch.randn(4, 3, 3, 3)), ("features.0.bias", torch.randn(4)),
                         ("classifier.weight", torch.randn(3, 64)), ("classifier.bias", torch.randn(3))])
    torch.save(state, tmp_path / "good.pth")
    alone = load_weights(convert(tmp_path / "good.pth", output=tmp_path / "alone.safetensors").output).tensors
    globals_before = _snapshot(torch_pth.ALLOWED)
    for i, stream in enumerate(s for module, name in torch_pth.ALLOWED for s in _hostile(module, name)):
        write_pth(tmp_path / f"evil{i}.pth", b"\x80\x02" + stream)
        with pytest.raises(ZooError, match="evil"):
            convert(tmp_path / f"evil{i}.pth", source="torch")
    assert _snapshot(torch_pth.ALLOWED) == globals_before
    after = load_weights(convert(tmp_path / "good.pth", output=tmp_path / "after.safetensors").output).tensors
    assert after.keys() == alone.keys() and all(np.array_equal(after[k], alone[k]) for k in alone)


class _Box:
    pass


def test_no_allowed_value_is_changed_however_mutable():
    """The rule holds for any allow-list: a pickle fills only containers and stand-ins it made itself."""
    box, items, table = _Box(), [], {}
    allowed = {("m", "box"): box, ("m", "items"): items, ("m", "table"): table, ("m", "same"): lambda x: x}
    streams = [b"cm\nbox\n}" + _unicode("a") + b"Nsb.", b"cm\nbox\nN}" + _unicode("a") + b"Ns\x86b.",
               b"cm\nitems\nNa.", b"cm\nitems\n(Ne.", b"cm\ntable\nNNs.", b"cm\ntable\n(NNu.",
               b"cm\nsame\ncm\nitems\n\x85RNa."]  # a call that hands the value back is no way round
    for stream in streams:
        with pytest.raises(ZooError, match=r"^x\.pkl: refused: the pickle changes a"):
            safe_pickle.load(b"\x80\x02" + stream, allowed, path="x.pkl")
    assert vars(box) == {} and items == [] and table == {}


# --- real files are read as before, well within the budget --------------------------------------------


def _spent_per_byte(stream: bytes) -> float:
    unpickler = safe_pickle.RestrictedUnpickler(safe_pickle.SmallReader(stream), safe_pickle.NUMPY_GLOBALS)
    unpickler.load()
    return unpickler.budget.spent / len(stream)


def test_real_pickles_spend_a_fraction_of_the_budget():
    layers = small_layers()
    many = {f"layer{i}": [np.zeros(3, np.float32), np.zeros(1, np.float32)] for i in range(2000)}
    streams = [pickle.dumps(_wrap(layers), protocol=p) for p in (2, 3, 4, 5)]
    streams += [py2_pickle(_wrap(layers)), pickle.dumps(_wrap(many), protocol=2), py2_pickle(_wrap(many))]
    for stream in streams:
        assert _spent_per_byte(stream) < safe_pickle.Budget.PER_BYTE / 8  # ResNet-50's data.pkl: 0.17


def _nested(depth: int) -> list:
    out = []
    for _ in range(depth - 1):
        out = [out]
    return out


def test_keys_are_scalars_and_nesting_is_bounded():
    with pytest.raises(ZooError, match="refused a dict key or set member of type tuple"):
        safe_pickle.load(b"\x80\x02}(K\x01\x85Nu.")
    with pytest.raises(ZooError, match="refused a dict key or set member of type int"):
        safe_pickle.load(b"\x80\x02}\x8a\x09" + b"\x00" * 8 + b"\x01Ns.")  # 2**64: beyond 64 bits
    assert safe_pickle.load(b"\x80\x02" + b"]" * 60 + b"a" * 59 + b".") == _nested(60)
    with pytest.raises(ZooError, match="more than 64 deep"):
        safe_pickle.load(b"\x80\x02" + b"]" * 70 + b"a" * 69 + b".")


def test_an_error_message_from_the_file_stays_one_line():
    with pytest.raises(ZooError) as e:  # STACK_GLOBAL takes the names from strings, newlines included
        safe_pickle.load(b"\x80\x04" + _unicode("os\nimport evil") + _unicode("x" * 5000) + b"\x93.", path="f.pkl")
    assert "\n" not in str(e.value) and len(str(e.value)) < 500 and "os\\nimport evil" in str(e.value)
