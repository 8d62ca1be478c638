"""zoo bench: the arithmetic each kind reports, the machine's limit, and the command end to end."""

import json

import pytest

from zoo.bench import macs, peak_flops
from zoo.registry import get_spec


@pytest.mark.parametrize("spec, gmacs", [("alexnet@torchvision", 0.714), ("vgg16@torchvision", 15.470), ("resnet50@torchvision", 4.089)])
def test_macs_match_the_published_counts(spec, gmacs):
    """torchvision's weights metadata (`_ops`, GMAC an image) for the same networks."""
    assert macs(get_spec(spec)) / 1e9 == pytest.approx(gmacs, abs=5e-4)


def test_peak_flops_follows_the_cpu_and_its_override(monkeypatch):
    flops, how = peak_flops()
    assert flops > 1e9 and "cores" in how
    monkeypatch.setenv("ZOO_PEAK_GFLOPS", "100")
    assert peak_flops() == (100e9, "ZOO_PEAK_GFLOPS")


def test_bench_runs_every_runtime_a_spec_allows_and_prints_json(cli, narrow_spec):
    code, out, err = cli("bench", narrow_spec.id, "--batch", "1,2", "--seconds", "0.1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == narrow_spec.id and result["gmacs_per_image"] == pytest.approx(macs(narrow_spec) / 1e9)
    assert [(r["runtime"], r["batch"]) for r in result["rows"]] == [("keras", 1), ("keras", 2), ("onnx", 1), ("onnx", 2)]
    for r in result["rows"]:
        assert r["images_per_second"] > 0 and r["spread"][0] <= r["images_per_second"] <= r["spread"][1] and r["calls"] >= 5
        assert r["limit_images_per_second"] == pytest.approx(result["peak_gflops"] * 1e9 / (2 * macs(narrow_spec)))


@pytest.mark.parametrize("args, message", [(["--runtimes", "savedmodel"], "cannot run savedmodel: a spec has no SavedModel"),
                                           (["--runtimes", "tflite"], "unknown runtime 'tflite'")])
def test_bench_refuses_a_runtime_it_cannot_run_in_one_line(cli, narrow_spec, args, message):
    code, out, err = cli("bench", narrow_spec.id, *args)
    assert code == 1 and out == "" and err.count("\n") == 1 and message in err, err


def test_bench_names_a_missing_file(cli, tmp_path):
    code, _, err = cli("bench", tmp_path / "nothing.onnx")
    assert code == 1 and f"{tmp_path / 'nothing.onnx'}: no such file" in err


def test_onnx_sessions_run_as_many_threads_as_the_process_has_cpus():
    import os

    from zoo.backends.onnx import session_options

    assert session_options().intra_op_num_threads == len(os.sched_getaffinity(0))
    assert session_options(1).intra_op_num_threads == 1


def test_measure_times_a_way_from_outside_zoo_in_the_same_process_and_clock(tmp_path):
    """benchmarks/bench_forward.py's peers go through zoo.bench.measure with a builder: its forward gets the
    seeded batch (transposed to NCHW where the job says so) after the warm-up calls."""
    from zoo.bench import make_job, measure, spec_json

    (tmp_path / "peer_way.py").write_text(
        "import time\n"
        "def build(job, spec):\n"
        "    def forward(x):\n"
        "        assert x.shape == (job['batch'], 3, *spec.input_shape[:2]), x.shape\n"
        "        time.sleep(0.01)\n"
        "    return forward\n")
    spec = get_spec("alexnet@torchvision")
    job = make_job("peer", 2, spec_json(spec, tmp_path), 0.05, builder="peer_way:build", path=[str(tmp_path)], layout="NCHW",
                   min_calls=3, warmup=1)
    row = measure(job, limit=123.0)
    assert row.runtime == "peer" and row.batch == 2 and row.calls >= 3 and row.limit_images_per_second == 123.0
    assert 10 <= row.latency_ms < 1000 and row.images_per_second == pytest.approx(2000 / row.latency_ms)
