"""PyTorch state dicts: read without torch, checked against real PyTorch (torch==2.13.0, CPU)."""

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import fuzz_convert, scale_error  # noqa: E402
from torch_models import TinyNet, TorchvisionAlexNet  # noqa: E402

from zoo import ZooError  # noqa: E402
from zoo.conversion import convert  # noqa: E402
from zoo.registry import load_weights  # noqa: E402


def torch_logits(model, x_nhwc):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def keras_logits(weights, x_nhwc):
    import zoo

    return zoo.create_model(None, weights=weights).predict(x_nhwc, verbose=0)


@pytest.mark.slow
def test_torchvision_alexnet_matches_pytorch(tmp_path, cli):
    torch.manual_seed(0)
    model = TorchvisionAlexNet()
    src = tmp_path / "alexnet.pth"
    torch.save(model.state_dict(), src)
    code, out, err = cli("convert", "torch", src, "-o", tmp_path / "tv.safetensors")
    assert code == 0, err
    assert "alexnet@torchvision" in out and "features.0 -> conv1" in out and "classifier.6 -> fc8" in out
    x = np.random.default_rng(0).random((4, 224, 224, 3), dtype=np.float32)
    want, got = torch_logits(model, x), keras_logits(tmp_path / "tv.safetensors", x)
    assert scale_error(got, want) < 1e-4
    np.testing.assert_array_equal(np.argsort(-got, 1)[:, :5], np.argsort(-want, 1)[:, :5])


@pytest.fixture
def tiny_torch(tiny_spec):
    torch.manual_seed(1)
    return TinyNet()


def test_tiny_net_matches_pytorch_including_the_flatten_reorder(tmp_path, tiny_torch):
    torch.save(tiny_torch.state_dict(), tmp_path / "t.pth")
    result = convert(tmp_path / "t.pth")
    assert result.spec == "tiny@test"
    x = np.random.default_rng(1).random((5, 9, 9, 3), dtype=np.float32)
    assert scale_error(keras_logits(result.output, x), torch_logits(tiny_torch, x)) < 1e-5


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 7, "optimizer": {"lr": 0.1}},
    lambda sd: {"model": sd, "args": ["--lr", "0.1"]},
    lambda sd: collections.OrderedDict(("module." + k, v) for k, v in sd.items()),  # DataParallel
])
def test_what_training_scripts_save(tmp_path, tiny_torch, wrap):
    sd = tiny_torch.state_dict()
    torch.save(wrap(sd), tmp_path / "c.pth")
    w = load_weights(convert(tmp_path / "c.pth").output)
    np.testing.assert_array_equal(w.tensors["conv1.bias"], sd["features.0.bias"].numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_widened_exactly(tmp_path, tiny_torch, dtype):
    sd = {k: v.to(dtype) for k, v in tiny_torch.state_dict().items()}
    torch.save(sd, tmp_path / "h.pth")
    result = convert(tmp_path / "h.pth")
    w = load_weights(result.output)
    np.testing.assert_array_equal(w.tensors["conv1.bias"], sd["features.0.bias"].float().numpy())
    name = str(dtype).removeprefix("torch.")
    assert any(n.startswith(f"converted {name} to float32") for n in result.notes), result.notes


def test_views_with_offsets_strides_and_shared_storage(tmp_path, tiny_spec):
    big = torch.randn(200, 70)
    sd = collections.OrderedDict()
    sd["features.0.weight"] = big.flatten()[100:208].view(4, 3, 3, 3)
    sd["features.0.bias"] = big[3, 5:9]  # offset view sharing the storage
    sd["classifier.weight"] = big[20:84, 1:4].t()  # strided, transposed view: (3, 64)
    sd["classifier.bias"] = big[50, ::20][:3]  # stride 20
    torch.save(sd, tmp_path / "v.pth")
    w = load_weights(convert(tmp_path / "v.pth").output)
    np.testing.assert_array_equal(w.tensors["conv1.bias"], sd["features.0.bias"].numpy())
    np.testing.assert_array_equal(w.tensors["fc2.bias"], sd["classifier.bias"].numpy())
    np.testing.assert_array_equal(w.tensors["conv1.kernel"], sd["features.0.weight"].numpy().transpose(2, 3, 1, 0))
    with zipfile.ZipFile(tmp_path / "v.pth") as z:
        assert len([n for n in z.namelist() if "/data/" in n]) == 1  # really one shared storage


def test_hostile_pth_is_refused_before_it_runs(tmp_path, cli):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"features.0.weight": Payload()}, tmp_path / "evil.pth")
    code, _, err = cli("convert", "torch", tmp_path / "evil.pth")
    assert code == 1 and ("posix.system" in err or "os.system" in err), err
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pth", weights_only=True)  # torch's own safe mode refuses it too
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()  # ... and the unsafe mode runs it: the test file is real


def test_broken_and_wrong_files_get_one_line(tmp_path, tiny_torch, cli):
    torch.save(tiny_torch.state_dict(), tmp_path / "good.pth")
    good = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) * 2 // 3])
    (tmp_path / "empty.pth").write_bytes(b"")
    np.save(tmp_path / "x.npy", np.zeros(3))
    resnetish = collections.OrderedDict(
        [("conv1.weight", torch.zeros(64, 3, 7, 7)), ("bn1.weight", torch.ones(64)), ("bn1.bias", torch.zeros(64)),
         ("fc.weight", torch.zeros(1000, 512)), ("fc.bias", torch.zeros(1000))])
    torch.save(resnetish, tmp_path / "resnet.pth")
    shapes = tiny_torch.state_dict()
    shapes["classifier.weight"] = torch.zeros(3, 65)
    torch.save(shapes, tmp_path / "shapes.pth")
    expected = {
        "truncated.pth": "", "empty.pth": "", "x.npy": "not a torch.save zip",
        "resnet.pth": "match no registered model spec", "shapes.pth": "fc2.weight: (3, 65) != (3, 64)",
    }
    before = set(os.listdir(tmp_path))
    for name, message in expected.items():
        code, out, err = cli("convert", "torch", tmp_path / name)
        assert code == 1, name
        assert err.startswith(f"zoo: error: {tmp_path / name}: ") and err.count("\n") == 1, err
        assert message in err, err
    assert set(os.listdir(tmp_path)) == before


def test_a_storage_claiming_more_than_the_file_is_refused(tmp_path, tiny_torch):
    torch.save(tiny_torch.state_dict(), tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    # rewrite the first storage's numel to 100 G elements
    members[pkl_name] = members[pkl_name].replace(pickle.dumps(108, protocol=2)[2:-1], b"\x8a\x05\x00\x00\x00\x00\x17", 1)
    with zipfile.ZipFile(tmp_path / "huge.pth", "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(ZooError, match="claims"):
        convert(tmp_path / "huge.pth")


def test_a_member_whose_local_header_is_not_where_the_directory_says_is_refused(tmp_path, tiny_torch):
    """The central directory points each storage at its local header: a header that is not there (a damaged or
    spliced archive) is refused, not read from wherever the offset lands."""
    torch.save(tiny_torch.state_dict(), tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    data = bytearray((tmp_path / "ok.pth").read_bytes())
    assert data[info.header_offset:info.header_offset + 4] == b"PK\x03\x04"
    data[info.header_offset:info.header_offset + 4] = b"XX\x03\x04"
    (tmp_path / "moved.pth").write_bytes(data)
    with pytest.raises(ZooError, match=f"{info.filename}: no local zip header where the directory says"):
        convert(tmp_path / "moved.pth", output=tmp_path / "moved.safetensors")
    assert not (tmp_path / "moved.safetensors").exists()


def test_hash_prefix_in_the_name_is_checked(tmp_path, tiny_torch, cli):
    import hashlib

    torch.save(tiny_torch.state_dict(), tmp_path / "t.pth")
    digest = hashlib.sha256((tmp_path / "t.pth").read_bytes()).hexdigest()
    (tmp_path / "t.pth").rename(tmp_path / f"tiny-{digest[:8]}.pth")
    code, out, _ = cli("convert", tmp_path / f"tiny-{digest[:8]}.pth")
    assert code == 0 and f"sha256 starts with {digest[:8]}, as the file's name says" in out
    (tmp_path / f"tiny-{digest[:8]}.pth").rename(tmp_path / "alexnet-owt-7be5be79.pth")
    code, out, _ = cli("convert", tmp_path / "alexnet-owt-7be5be79.pth", "--spec", "tiny@test")
    assert code == 0 and "WARNING: the name says sha256 7be5be79" in out


def test_mutated_pth_files_fail_cleanly(tmp_path, tiny_torch):
    torch.save(tiny_torch.state_dict(), tmp_path / "ok.pth")
    assert fuzz_convert(tmp_path, (tmp_path / "ok.pth").read_bytes(), ".pth", "torch", 250, seed=3) > 50
