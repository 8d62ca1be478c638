import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import small_layers


def run_zoo_checking_imports(*argv, cwd=None):
    """Run the CLI in a fresh interpreter and report whether TensorFlow got imported."""
    code = (
        "import sys\nfrom zoo.cli import main\n"
        f"try:\n    rc = main({[str(a) for a in argv]!r})\nexcept SystemExit as e:  # --help\n    rc = e.code\n"
        "print('TF-IMPORTED' if 'tensorflow' in sys.modules else 'TF-NOT-IMPORTED')\nsys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("argv", [("list",), ("info", "alexnet"), ("plugins",), ("--help",), ("convert", "--help")])
def test_light_commands_do_not_import_tensorflow(argv):
    p = run_zoo_checking_imports(*argv)
    assert p.returncode == 0 and p.stdout.rstrip().endswith("TF-NOT-IMPORTED"), p.stdout[-300:] + p.stderr[-300:]


def test_convert_and_verify_do_not_import_tensorflow(tmp_path):
    np.save(tmp_path / "w.npy", {k: v for k, v in small_layers().items()})
    # the tiny spec is contributed by a plugin module on the path, like any third-party spec
    (tmp_path / "tinyplug.py").write_text(
        "from zoo.hookspecs import hookimpl\nfrom conftest import TINY_SPEC\n"
        "@hookimpl\ndef zoo_model_specs():\n    return [TINY_SPEC]\n")
    tests_dir = str(Path(__file__).parent)
    code = (
        f"import sys\nsys.path[:0] = [{str(tmp_path)!r}, {tests_dir!r}]\n"
        "import tinyplug\nfrom zoo.plugins import get_plugins\nget_plugins().register(tinyplug, 'tiny')\n"
        "from zoo.cli import main\n"
        f"assert main(['convert', {str(tmp_path / 'w.npy')!r}]) == 0\n"
        f"assert main(['verify', {str(tmp_path / 'w.safetensors')!r}]) == 0\n"
        "print('TF-IMPORTED' if 'tensorflow' in sys.modules else 'TF-NOT-IMPORTED')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "TF-NOT-IMPORTED" in p.stdout


def test_usage_errors_exit_2(cli):
    assert cli("frobnicate")[0] == 2
    assert cli("convert")[0] == 2
    assert cli("convert", "a", "b", "c")[0] == 2


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.npy"
    p = subprocess.run([sys.executable, "-m", "zoo", "convert", "caffe", str(missing)], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr == f"zoo: error: {missing}: no such file\n"
    p = subprocess.run([sys.executable, "-m", "zoo", "--debug", "convert", "caffe", str(missing)], capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("zoo") or str(Path(sys.executable).parent / "zoo")
    p = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("zoo ")
