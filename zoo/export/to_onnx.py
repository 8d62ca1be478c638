"""model.onnx: written from the spec by zoo.backends.onnx, checked by onnx.checker and ONNX Runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

from zoo.backends.onnx import DEFAULT_OPSET, check_onnx, checked_copy, onnx_graph, size_free, write_onnx
from zoo.errors import ZooError
from zoo.export.checks import Source, check_batch, checker
from zoo.export.swap import ONNX_FILES, swap_in
from zoo.features import Part


def export_onnx(src: Source, out: Path, reference, opset: int = DEFAULT_OPSET, external: bool | None = None) -> Path:
    """Write model.onnx (and model.onnx.data when the weights go beside it: past protobuf's 2 GiB, or
    `external`), check it (parsed by protobuf, then onnx.checker and ONNX Runtime on that parse with the weights
    read where they lie in the file: zoo.backends.onnx.checked_copy; against `reference()`, the Keras model's output
    on check_batch), and only then move it into place. Where the graph allows any input size from the
    spec's up (zoo.backends.onnx.size_free), its height and width are symbolic and it is also checked at
    a second size against `reference(size)`.

    No TensorFlow is needed until `reference()` is called, after the ONNX Runtime session is gone: the
    two runtimes' memory never adds up."""
    import onnx
    import onnxruntime as ort

    target = out / "model.onnx"
    tmp = out / ".onnx.tmp"  # a folder: the external data file's name is recorded in the model
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        part = src.part
        dynamic = size_free(part, src.weights.tensors)
        model, inits = onnx_graph(src.spec, src.weights.tensors, src.classes, opset, part, dynamic)
        offsets = write_onnx(tmp / target.name, model, inits, release=src.weights.release, external=external)
        del model, inits
        checked = checked_copy(tmp / target.name, offsets)  # the file's graph, its weights read where they lie
        check_onnx(checked)
        options = ort.SessionOptions()  # prepacking would hold the dense weights twice while the session starts
        options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            session = ort.InferenceSession(str(checked), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...): what it said, in one line
            raise ZooError(f"ONNX Runtime cannot load the written file: {str(e).splitlines()[0]}", target) from None
        sizes = [None, second_size(part)] if dynamic else [None]  # None: the part's own
        output = "logits" if part.logits else "features"
        got = [session.run([output], {"image": check_batch(part, size=size)})[0] for size in sizes]
        del session
        for size, g in zip(sizes, got):
            checker(part)("the ONNX model (ONNX Runtime" + (f", at {size[0]}x{size[1]})" if size else ")"), g,
                           reference(size) if size else reference(), target)
        swap_in(out, {n: tmp / n for n in ONNX_FILES})  # no .data file: an earlier export's goes
    except onnx.checker.ValidationError as e:
        raise ZooError(f"onnx.checker rejected the model: {str(e).splitlines()[0]}", target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def second_size(part: Part) -> tuple[int, int]:
    """Where an ONNX graph of any input size is checked besides the part's own: larger, neither side a
    multiple of 32, so the layers' padding and rounding meet other remainders."""
    h, w = part.size
    return (h + 19, w + 37)


MIN_OPSET = 13  # the ops zoo writes (Softmax's axis, BatchNormalization's outputs) as they are from opset 13 on


def check_opset(opset: int) -> None:
    """Before any work: an opset zoo's nodes are written for, up to the installed onnx's newest."""
    import onnx

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ZooError(f"ONNX opset {opset} is not supported: zoo writes opsets {MIN_OPSET} to {onnx.defs.onnx_opset_version()} "
                       f"(the installed onnx {onnx.__version__}'s newest)")
