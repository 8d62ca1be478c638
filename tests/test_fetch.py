"""`zoo fetch` against a local HTTP server (127.0.0.1, a thread) that serves files made by the real tools
(torch.save, np.save, protobuf's .caffemodel) and misbehaves on request: wrong bytes, a short body, a dropped connection, 404, Range
ignored. A test-only spec lists them as its published files."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from caffe_proto import write_caffemodel
from conftest import NARROW_SPEC

from zoo.spec import ModelSpec
from zoo.specs.builders import HASHES

SPEC = dict(NARROW_SPEC, family="fetchnet", version="published", description="narrow@test's network, published on a local server")


class Server(BaseHTTPRequestHandler):
    """Serves `files` by path with Range support; `faults[path]` misbehaves once: "drop" (half the body,
    then the connection closes), "short" (a shorter file, its own length declared), "no-range" (Range ignored)."""

    files: dict[str, bytes] = {}
    faults: dict[str, str] = {}
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Range")))
        body, fault = self.files.get(self.path), self.faults.pop(self.path, None)
        if body is None:
            return self.send_error(404)
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") and fault != "no-range" else None
        if start is not None and start >= len(body):
            return self.send_error(416)
        body = body[: len(body) // 2] if fault == "short" else body
        self.send_response(200 if start is None else 206)
        if start is not None:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - (start or 0)))
        self.end_headers()
        rest = body[start or 0:]
        self.wfile.write(rest[: len(rest) // 2] if fault == "drop" else rest)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def torch_state_dict(spec: ModelSpec, seed: int) -> dict:
    """Random weights under torch's names and layouts (OIHW kernels, (out, in) dense)."""
    import torch

    g, state = torch.Generator().manual_seed(seed), {}
    for name, t in spec.tensors.items():
        layer, param = name.rsplit(".", 1)
        shape = (t.shape[3], t.shape[2], *t.shape[:2]) if len(t.shape) == 4 else t.shape[::-1]
        state[f"{layer}.{'weight' if param == 'kernel' else 'bias'}"] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def made(module_folder):
    """{file name: bytes}: a torch hub-style .pth (its sha256 prefix in its name), another .pth (the wrong file),
    a caffe-tensorflow .npy and a .caffemodel in Caffe's V1 layout (protobuf, tests/caffe_proto.py)."""
    import torch

    folder, spec = module_folder("made"), ModelSpec.from_dict(SPEC)
    torch.save(torch_state_dict(spec, 0), folder / "a.pth")
    torch.save(torch_state_dict(spec, 1), folder / "other.pth")
    rng = np.random.default_rng(0)
    layers = {}
    for name, t in spec.tensors.items():
        layer, param = name.rsplit(".", 1)
        layers.setdefault(layer, {})["weights" if param == "kernel" else "biases"] = rng.normal(size=t.shape).astype(np.float32)
    np.save(folder / "fetchnet.npy", layers)
    caffe = {n: (t.numpy(), state[n.replace("weight", "bias")].numpy())  # Caffe's layouts are torch's: OIHW, (out, in)
             for state in [torch_state_dict(spec, 2)] for n, t in state.items() if n.endswith(".weight")}
    write_caffemodel(folder / "fetchnet.caffemodel", {n.split(".")[0]: wb for n, wb in caffe.items()},
                     groups={"conv2": 2}, v1=True, name="fetchnet")  # V1 layers, as the BVLC files were written
    good = (folder / "a.pth").read_bytes()
    return {f"fetchnet-{hashlib.sha256(good).hexdigest()[:8]}.pth": good, "other.pth": (folder / "other.pth").read_bytes(),
            "fetchnet.npy": (folder / "fetchnet.npy").read_bytes(), "fetchnet.caffemodel": (folder / "fetchnet.caffemodel").read_bytes()}


@pytest.fixture
def published(server, made, tmp_path, monkeypatch):
    """The test spec registered with its published files at `URL/models/<file>`: the .pth (sha256 prefix), the .npy
    (md5, as Keras publishes), the .npy again under a name with no published hash and the .caffemodel (sha1, as the
    BVLC model zoo publishes); an empty store."""
    from zoo.hookspecs import hookimpl
    from zoo.plugins import get_plugins

    pth = next(name for name in made if name.startswith("fetchnet-"))
    npy = made["fetchnet.npy"]
    files = {pth: {"sha256_prefix": pth[9:17], "source": "torch"}, "fetchnet.npy": {"md5": hashlib.md5(npy).hexdigest(), "source": "caffe"},
             "unhashed.npy": {"hash": "unknown", "source": "caffe"},
             "fetchnet.caffemodel": {"sha1": hashlib.sha1(made["fetchnet.caffemodel"]).hexdigest(), "source": "caffemodel"}}
    spec = dict(SPEC, provenance={"reference_files": {name: entry | {"url": f"{server}/models/{name}", "license": "test"}
                                                      for name, entry in files.items()}})

    class Plugin:
        @hookimpl
        def zoo_model_specs(self):
            return [spec]

    get_plugins().register(Plugin(), name="fetch-test-specs")
    Server.files = {f"/models/{pth}": made[pth], "/models/fetchnet.npy": npy, "/models/unhashed.npy": npy,
                    "/models/fetchnet.caffemodel": made["fetchnet.caffemodel"]}
    Server.faults, Server.seen = {}, []
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ZOO_MIRROR", raising=False)
    return pth


def stored(tmp_path) -> list:
    return sorted(p.name for p in (tmp_path / "home" / "weights").rglob("*") if p.is_file())


def downloads(tmp_path) -> list:
    return sorted(p.name for p in (tmp_path / "home" / "downloads").iterdir() if not p.name.endswith(".lock"))


def test_a_good_file_is_checked_converted_and_stored_once(cli, published, made, tmp_path):
    from zoo.conversion import convert
    from zoo.registry import load_weights

    code, out, err = cli("fetch", "fetchnet")
    assert code == 0, err
    name = f"fetchnet@published/{published[:-4]}"
    assert out.startswith(f"stored {name} (") and "sha256 " + published[9:17] + " as published" in out
    assert downloads(tmp_path) == []  # the source is gone once its verified conversion is stored
    (tmp_path / published).write_bytes(made[published])
    direct = convert(tmp_path / published, output=tmp_path / "direct.safetensors")
    w = load_weights(next((tmp_path / "home" / "weights").rglob("*.safetensors")))
    assert w.spec.id == "fetchnet@published" and w.metadata["source_sha256"] == hashlib.sha256(made[published]).hexdigest()
    assert all(np.array_equal(w.tensors[k], v) for k, v in load_weights(direct.output).tensors.items())
    Server.seen.clear()
    code, out, _ = cli("fetch", "fetchnet@published")
    assert code == 0 and out.startswith(f"{name} is stored already") and Server.seen == []


def test_a_wrong_file_is_refused_before_any_reader_opens_it(cli, published, made, tmp_path, monkeypatch):
    import zoo.conversion

    monkeypatch.setattr(zoo.conversion, "convert", lambda *a, **k: pytest.fail("the file was converted"))
    Server.files[f"/models/{published}"] = made["other.pth"]  # a valid state dict, not the published one
    code, out, err = cli("fetch", "fetchnet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"zoo: error: {tmp_path / 'home' / 'downloads' / published}: sha256 ") and "is not the published" in err
    assert stored(tmp_path) == [] and downloads(tmp_path) == []  # its bytes cannot be trusted: nothing kept to resume


def test_a_short_response_fails_the_hash_and_leaves_nothing(cli, published, tmp_path):
    Server.faults[f"/models/{published}"] = "short"  # a shorter body under a matching Content-Length
    code, _, err = cli("fetch", "fetchnet")
    assert code == 1 and "is not the published" in err and stored(tmp_path) == [] and downloads(tmp_path) == []


def test_a_dropped_connection_is_resumed_by_the_next_fetch(cli, published, made, tmp_path, monkeypatch):
    import zoo.fetch

    monkeypatch.setattr(zoo.fetch, "CHUNK", 4096)  # the file is 32 kB: several chunks arrive before the drop
    url = f"/models/{published}"
    Server.faults[url] = "drop"
    code, _, err = cli("fetch", "fetchnet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert downloads(tmp_path) == [published + ".part"] and stored(tmp_path) == []
    kept = (tmp_path / "home" / "downloads" / (published + ".part")).stat().st_size
    assert 0 < kept <= len(made[published]) // 2
    assert f"download failed (connection dropped) after {kept:,} bytes; run zoo fetch again to resume" in err
    code, _, err = cli("fetch", "fetchnet")
    assert code == 0, err
    assert Server.seen[-1] == (url, f"bytes={kept}-")  # only the rest was asked for
    assert len(stored(tmp_path)) == 1 and downloads(tmp_path) == []


def test_a_whole_part_file_and_a_server_ignoring_range(cli, published, made, tmp_path):
    """A process killed after the last byte and before the check: the server answers 416, the part is checked as
    it is. A server that ignores Range sends the whole file again: the part is started over."""
    part = tmp_path / "home" / "downloads" / (published + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(made[published])
    code, _, err = cli("fetch", "fetchnet")
    assert code == 0 and Server.seen[-1][1] == f"bytes={len(made[published])}-", err
    cli("weights", "rm", "fetchnet@published")
    part.write_bytes(b"garbage that is not the start of the file")
    Server.faults[f"/models/{published}"] = "no-range"
    code, _, err = cli("fetch", "fetchnet")
    assert code == 0 and len(stored(tmp_path)) == 1, err


def test_download_progress_is_on_stderr_and_json_the_whole_stdout(cli, published, made, monkeypatch):
    import json

    from zoo import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # a plain line from the first update, as a long download gets
    code, out, err = cli("fetch", "fetchnet", "--json")
    assert code == 0, err
    assert json.loads(out)["downloaded"] is True
    lines = [line for line in err.splitlines() if line.startswith(f"downloading {published}:")]
    assert "\r" not in err and lines and "100%" in lines[-1] and "B/s" in lines[-1], err
    assert f"converting {published}: 100%" in err  # named by the source, not by the store's temporary file


def test_404_is_one_line_and_leaves_nothing(cli, published, tmp_path):
    del Server.files[f"/models/{published}"]
    code, out, err = cli("fetch", "fetchnet")
    assert code == 1 and out == "" and err.strip().splitlines() == [f"zoo: error: {published_url(published)}: HTTP 404 Not Found"]
    assert downloads(tmp_path) == [] and stored(tmp_path) == []


def published_url(name):
    from zoo.registry import get_spec

    return get_spec("fetchnet").provenance["reference_files"][name]["url"]


def test_a_mirror_serves_the_files_by_name(cli, published, made, server, tmp_path, monkeypatch):
    Server.files = {f"/internal/zoo/{published}": made[published]}  # the publisher's URL now answers 404
    code, out, err = cli("fetch", "fetchnet", "--mirror", f"{server}/internal/zoo/")
    assert code == 0 and f"downloaded from {server}/internal/zoo/{published}," in out, err
    cli("weights", "rm", "fetchnet@published")
    monkeypatch.setenv("ZOO_MIRROR", f"{server}/internal/zoo")
    code, _, err = cli("fetch", "fetchnet")
    assert code == 0 and Server.seen[-1][0] == f"/internal/zoo/{published}", err


def test_md5_and_unknown_hashes(cli, published, tmp_path):
    code, out, err = cli("fetch", "fetchnet", "--file", "fetchnet.npy")
    assert code == 0 and f"md5 {hashlib.md5(Server.files['/models/fetchnet.npy']).hexdigest()} as published" in out, err
    code, out, err = cli("fetch", "fetchnet", "--file", "unhashed.npy", "--json")
    assert code == 0 and '"hash_check": "no published hash to check against (its sha256 is recorded)"' in out, err
    assert '"source_sha256": "' + hashlib.sha256(Server.files["/models/unhashed.npy"]).hexdigest() in out
    code, _, err = cli("fetch", "fetchnet", "--file", "nope.pth")
    assert code == 1 and "has no published file 'nope.pth'; it lists: " in err


def test_sha1_as_the_bvlc_model_zoo_publishes(cli, published, made, tmp_path):
    """The BVLC .caffemodel files carry a sha1 (their readmes): a good file is checked by it, converted by the
    caffemodel source and stored; another file under the published name is refused on it before any reader."""
    from zoo.conversion import convert
    from zoo.registry import load_weights

    url, good = "/models/fetchnet.caffemodel", made["fetchnet.caffemodel"]
    Server.files[url] = made["other.pth"]  # a valid weights file, not the published one
    code, out, err = cli("fetch", "fetchnet", "--file", "fetchnet.caffemodel")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"zoo: error: {tmp_path / 'home' / 'downloads' / 'fetchnet.caffemodel'}: sha1 "
                          f"{hashlib.sha1(made['other.pth']).hexdigest()} is not the published {hashlib.sha1(good).hexdigest()}"), err
    assert stored(tmp_path) == [] and downloads(tmp_path) == []
    Server.files[url] = good
    code, out, err = cli("fetch", "fetchnet", "--file", "fetchnet.caffemodel")
    assert code == 0 and out.startswith("stored fetchnet@published/fetchnet (") and f"sha1 {hashlib.sha1(good).hexdigest()} as published" in out, err
    assert stored(tmp_path) == ["fetchnet.safetensors"] and downloads(tmp_path) == []
    (tmp_path / "fetchnet.caffemodel").write_bytes(good)
    direct = load_weights(convert(tmp_path / "fetchnet.caffemodel", source="caffemodel", spec="fetchnet@published",
                                  output=tmp_path / "direct.safetensors").output)
    w = load_weights(next((tmp_path / "home" / "weights").rglob("*.safetensors")))
    assert w.metadata["source_format"] == "caffemodel" and w.metadata["source_sha256"] == hashlib.sha256(good).hexdigest()
    assert w.tensors.keys() == direct.tensors.keys() and all(np.array_equal(w.tensors[k], v) for k, v in direct.tensors.items())


def test_every_registered_published_file_names_its_source_licence_and_a_hash_or_unknown():
    from zoo.conversion import weight_sources
    from zoo.registry import all_specs

    sources = set(weight_sources()) | {"caffemodel"}  # the zoo-caffemodel plugin's, installed or not
    for spec in all_specs().values():
        for name, entry in spec.provenance["reference_files"].items():
            hashes = set(HASHES) & set(entry)
            assert hashes or entry.get("hash") == "unknown", (spec.id, name)
            assert entry["source"] in sources and entry["license"], (spec.id, name)
            assert "url" not in entry or entry["url"].endswith("/" + name), (spec.id, name)
