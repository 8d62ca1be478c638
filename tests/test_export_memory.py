"""`zoo export` of a finished run checks each artifact against the trained Keras model's logits, stored at the
end of `zoo finetune` (checkpoints/reference.npz): the ONNX export imports no TensorFlow, and still refuses a
file that differs from them."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zoo.export import check_batch, open_source
from zoo.export.checks import REFERENCE, stored_reference


@pytest.fixture(autouse=True)
def _narrow_registered(narrow_spec):
    yield


def export_in_a_child(run: Path, out: Path, perturb: bool = False):
    """`zoo export RUN --format onnx` in a fresh interpreter (the narrow spec registered), with `perturb` every
    weight written 1% larger; prints whether TensorFlow got imported."""
    code = (
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import NarrowSpecPlugin\nfrom zoo.plugins import get_plugins\n"
        "get_plugins().register(NarrowSpecPlugin(), name='narrow-specs')\n"
        "import zoo.export.to_onnx\nwrite = zoo.export.to_onnx.write_onnx\n"
        "def perturbed(path, model, inits, **kw):\n    return write(path, model, [(n, a * 1.01) for n, a in inits], **kw)\n"
        f"if {perturb}:\n    zoo.export.to_onnx.write_onnx = perturbed\n"
        "from zoo.cli import main\n"
        f"rc = main(['export', {str(run)!r}, '--format', 'onnx', '--out', {str(out)!r}])\n"
        "print('TF-IMPORTED' if 'tensorflow' in sys.modules else 'TF-NOT-IMPORTED')\nsys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_stored_reference_is_the_trained_keras_models_output(narrow_run):
    import zoo

    src = open_source(narrow_run)
    stored = stored_reference(narrow_run, src)
    model = zoo.create_model(None, weights=narrow_run / "weights.safetensors")
    want = model.predict(check_batch(src.spec), verbose=0)
    np.testing.assert_allclose(stored, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_onnx_export_of_a_run_imports_no_tensorflow_and_refuses_a_different_file(narrow_run, tmp_path):
    p = export_in_a_child(narrow_run, tmp_path / "good")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "TF-NOT-IMPORTED" in p.stdout and (tmp_path / "good" / "model.onnx").exists()
    p = export_in_a_child(narrow_run, tmp_path / "bad", perturb=True)
    assert p.returncode == 1 and "does not match the Keras model" in p.stderr, p.stderr[-2000:]
    assert "TF-NOT-IMPORTED" in p.stdout and not (tmp_path / "bad" / "model.onnx").exists()


def test_a_reference_of_other_weights_is_not_used(narrow_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(narrow_run, run)
    assert stored_reference(run, open_source(run)) is not None
    with open(run / "weights.safetensors", "r+b") as f:  # a value in the last tensor's bytes: another model
        f.seek(-4, 2)
        f.write(np.float32(0.5).tobytes())
    assert stored_reference(run, open_source(run)) is None
    (run / REFERENCE).write_bytes(b"not an npz")
    assert stored_reference(run, open_source(run)) is None


def _spoiled(how):
    """write_onnx as the export calls it, then the written file changed by `how(path, offsets)`."""
    import zoo.export.to_onnx

    write = zoo.export.to_onnx.write_onnx

    def spoiled(path, model, inits, **kw):
        offsets = write(path, model, inits, **kw)
        how(path, offsets, dict(inits))
        return offsets

    return spoiled


def _flip_middle_of_largest(path, offsets, inits):
    name = max(inits, key=lambda n: inits[n].nbytes)
    _, offset = offsets[name]
    with open(path, "r+b") as f:  # the bytes ONNX Runtime runs are the file's: a changed value there must show
        f.seek(offset + inits[name].nbytes // 2 // 4 * 4)
        f.write(np.float32(50.0).tobytes() * 16)


def _truncate(path, offsets, inits):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)


@pytest.mark.parametrize("how, message", [(_flip_middle_of_largest, "does not match the Keras model"),
                                          (_truncate, "the written ONNX file is not valid protobuf")])
def test_the_onnx_check_reads_the_written_files_bytes(narrow_run, tmp_path, monkeypatch, how, message):
    import zoo.backends.onnx
    import zoo.export.to_onnx
    from zoo.errors import ZooError
    from zoo.export import export

    monkeypatch.setattr(zoo.backends.onnx, "SMALL", 256)  # the narrow net's weights read in place, as full-size ones are
    monkeypatch.setattr(zoo.export.to_onnx, "write_onnx", _spoiled(how))
    with pytest.raises(ZooError, match=message):
        export(narrow_run, formats=["onnx"], out=tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists() and not list((tmp_path / "out").glob(".*"))


def test_the_onnx_check_refuses_weights_not_where_the_writer_says(narrow_run, tmp_path, monkeypatch):
    import zoo.backends.onnx
    import zoo.export.to_onnx
    from zoo.errors import ZooError
    from zoo.export import export

    write = zoo.export.to_onnx.write_onnx

    def misplaced(path, model, inits, **kw):
        offsets = write(path, model, inits, **kw)
        return {name: (file, offset + 4) for name, (file, offset) in offsets.items()}

    monkeypatch.setattr(zoo.backends.onnx, "SMALL", 256)
    monkeypatch.setattr(zoo.export.to_onnx, "write_onnx", misplaced)
    with pytest.raises(ZooError, match="bytes are not where the writer put them"):
        export(narrow_run, formats=["onnx"], out=tmp_path / "out")


def test_the_onnx_check_reads_large_weights_in_place(narrow_run, tmp_path, monkeypatch):
    import onnx

    import zoo.backends.onnx
    from zoo.export import export

    monkeypatch.setattr(zoo.backends.onnx, "SMALL", 256)
    seen, check = [], zoo.backends.onnx.check_onnx

    def checked_as(checked):
        seen.append(onnx.load_model(str(checked), load_external_data=False))
        check(checked)

    monkeypatch.setattr(zoo.export.to_onnx, "check_onnx", checked_as)
    (written,) = export(narrow_run, formats=["onnx"], out=tmp_path / "out")
    external = [t.name for t in seen[0].graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = {t.name: t for t in onnx.load_model(str(written)).graph.initializer}
    assert external and all(inline[name].raw_data and len(inline[name].raw_data) > 256 for name in external)
