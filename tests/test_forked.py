"""zoo.forked.run_forked: the reader's child process and what its parent makes of each way it can end."""

import os
import signal
import sys

import pytest

from zoo.errors import ZooError
from zoo.forked import run_forked
from zoo.weights import atomic_output


def test_result_and_output_come_back_through_the_parents_streams(tmp_path, capsys):
    def work():
        print("progress", file=sys.stderr)
        print("said", flush=True)
        return {"n": 3, "pid": os.getpid()}

    result = run_forked(work, tmp_path / "src", tmp_path)
    out, err = capsys.readouterr()
    assert result["n"] == 3 and result["pid"] != os.getpid()
    assert (out, err) == ("said\n", "progress\n")


def test_a_reader_killed_mid_write_is_one_error_naming_the_source_and_its_temp_is_removed(tmp_path):
    keep = tmp_path / "earlier.safetensors"
    keep.write_bytes(b"the user's file")

    def work():
        atomic_output(tmp_path / "w.safetensors").write_bytes(b"half of it")
        os.kill(os.getpid(), signal.SIGBUS)  # what touching a page past a truncated file's end does

    with pytest.raises(ZooError, match="shrank while it was read") as e:
        run_forked(work, tmp_path / "src.npy", tmp_path)
    assert e.value.path == str(tmp_path / "src.npy")
    assert sorted(os.listdir(tmp_path)) == ["earlier.safetensors"]


@pytest.mark.parametrize("raised, caught", [(ZooError("bad tensor", "/x/w.npy"), ZooError),
                                            (PermissionError(13, "Permission denied", "/x/out"), PermissionError),
                                            (KeyError("conv1"), RuntimeError)])
def test_the_childs_exceptions_are_raised_in_the_parent(tmp_path, raised, caught):
    def work():
        raise raised

    with pytest.raises(caught) as e:
        run_forked(work, tmp_path / "src", tmp_path)
    assert str(raised) in str(e.value)
    if caught is ZooError:
        assert e.value.path == "/x/w.npy"
    if caught is RuntimeError:  # a bug: its name, and the child's traceback for --debug
        assert str(e.value).startswith("KeyError") and "in the forked reader" in e.value.__notes__[0]


def test_the_parents_garbage_is_not_collected_in_the_child(tmp_path):
    """Finalizers of the parent's objects (TensorFlow's, PyTorch's) may call into runtimes whose threads did not
    survive the fork: the child's collections leave them alone. Here a finalizer that kills any process but
    the parent: the child collects, and must come back whole."""
    import gc

    parent = os.getpid()

    class Finalized:
        def __del__(self):
            if os.getpid() != parent:
                os.kill(os.getpid(), signal.SIGSEGV)

    gc.disable()  # the cycle must still be garbage when the child starts
    try:
        cycle = Finalized()
        cycle.itself = cycle
        del cycle
        result = run_forked(lambda: {"collected": gc.collect()}, tmp_path / "src", tmp_path)  # raises if killed
    finally:
        gc.enable()
    assert "collected" in result
    assert gc.collect() >= 2  # the cycle was still garbage at the fork: the parent's collection takes it now


def test_a_crash_of_the_child_is_a_bug_with_its_python_stack_and_a_kill_is_an_error(tmp_path):
    def crash_here():
        os.kill(os.getpid(), signal.SIGSEGV)

    with pytest.raises(RuntimeError, match=r"src.npy: the reading process crashed \(SIGSEGV\); nothing was written") as e:
        run_forked(crash_here, tmp_path / "src.npy", tmp_path)
    stack = e.value.__notes__[0]
    assert stack.startswith("in the forked reader:") and "Segmentation fault" in stack and "in crash_here" in stack, stack

    with pytest.raises(ZooError, match="reading was stopped by SIGKILL; nothing was written") as e:
        run_forked(lambda: os.kill(os.getpid(), signal.SIGKILL), tmp_path / "src.npy", tmp_path)
    assert e.value.path == str(tmp_path / "src.npy")
    assert os.listdir(tmp_path) == []
