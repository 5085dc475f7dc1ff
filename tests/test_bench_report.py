"""The benchmark suite's importable half (sa_kernels.bench): byte counts, the saved-tensor probe,
case selection, timing plumbing, the report's table and plot, and the command line. No GPU needed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sa_kernels
from sa_kernels.bench import cases, environment, metrics, report, timing, workload
from sa_kernels.bench import __main__ as cli

from helpers import TOLERANCES

SMALL = cases.Shape("small", 2, 16, 5, 7, 2)


# --- bytes, bandwidth, speedups ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bytes_moved_is_2x_input_forward_and_5x_forward_backward(dtype):
    input_bytes = torch.empty(SMALL.dims, dtype=dtype).nbytes
    forward = cases.Case(SMALL, dtype, "forward")
    training = cases.Case(SMALL, dtype, "forward+backward")
    assert forward.input_bytes == training.input_bytes == input_bytes
    assert metrics.bytes_moved(forward.input_bytes, forward.mode) == 2 * input_bytes
    assert metrics.bytes_moved(training.input_bytes, training.mode) == 5 * input_bytes
    with pytest.raises(ValueError, match="mode"):
        metrics.bytes_moved(input_bytes, "backward")


def test_bandwidth_percentages_and_speedups():
    assert metrics.effective_gbps(3e9, 0.5) == pytest.approx(6.0)
    assert metrics.percent_of(1500.0, 3000.0) == pytest.approx(50.0)
    assert metrics.speedup(3e-3, 1e-3) == pytest.approx(3.0)
    assert metrics.speedup(1e-3, 4e-3) == pytest.approx(0.25)
    for missing in (metrics.effective_gbps(None, 1.0), metrics.percent_of(1.0, None),
                    metrics.speedup(None, 1e-3), metrics.speedup(1e-3, 0.0)):
        assert missing is None


# --- saved-tensor probe -----------------------------------------------------------------------

def test_saved_bytes_counts_each_storage_once_and_whole():
    x = torch.randn(1000, requires_grad=True)
    assert metrics.saved_tensor_bytes(lambda: x * x)[0] == x.nbytes  # x saved twice: one storage
    assert metrics.saved_tensor_bytes(lambda: x[:10].sin())[0] == x.nbytes  # a view keeps x alive
    saved, out = metrics.saved_tensor_bytes(lambda: (x * 2).exp())  # exp saves its new output
    assert saved == x.nbytes and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    with torch.no_grad():
        assert metrics.saved_tensor_bytes(lambda: x.sin())[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_torch_backend_saves_the_input_plus_per_plane_stats_and_reference_far_more(dtype):
    shape = cases.Shape("probe", 4, 64, 12, 12, 4)
    case = cases.Case(shape, dtype, "forward+backward")
    rotation = workload.make_inputs(case, "cpu", 1, seed=1)
    saved = {}
    for provider in ("eager", "torch"):
        module = workload.build_module(provider, shape, dtype, "cpu", seed=1)
        saved[provider], out = metrics.saved_tensor_bytes(
            workload.forward_for_saved_bytes(module, rotation))
        assert out.grad_fn is not None
    b, c = shape.batch, shape.channels
    half = c // (2 * shape.groups)
    param_bytes = torch.empty((), dtype=dtype).element_size()
    # What the fused op saves: x, mean and rstd (B, C) in float32, and the six parameters.
    assert case.input_bytes <= saved["torch"] <= case.input_bytes + 2 * b * c * 4 + 6 * half * param_bytes
    # The reference autograd graph keeps several full-size intermediates besides x.
    assert saved["eager"] > 2 * saved["torch"]


def test_peak_memory_is_only_measured_on_cuda():
    peak, result = metrics.peak_memory_delta(lambda: torch.ones(3), "cpu")
    assert peak is None and result.sum().item() == 3


# --- cases and providers ----------------------------------------------------------------------

def test_gpu_runs_every_specified_shape_and_cpu_a_quick_subset():
    gpu = cases.select_cases("cuda")
    cpu = cases.select_cases("cpu")
    spec = {(64, 256, 8, 8, 8), (64, 256, 56, 56, 64), (64, 512, 28, 28, 64),
            (64, 1024, 14, 14, 64), (64, 2048, 7, 7, 64), (16, 256, 80, 80, 8),
            (8, 64, 256, 256, 8)}
    assert {c.shape.dims + (c.shape.groups,) for c in gpu} == spec
    assert len(gpu) == len(spec) * len(cases.DTYPES) * len(cases.MODES)
    assert {c.shape for c in cpu} == set(cases.QUICK_SHAPES) and len(cpu) < len(gpu)
    # The quick set is small enough for a CPU: at most a few million elements per case.
    assert max(math.prod(c.shape.dims) for c in cpu) <= 4_000_000
    for case in gpu + cpu:
        assert case.shape.channels % (2 * case.shape.groups) == 0
        assert {c.dtype for c in gpu} == {torch.float32, torch.bfloat16}
    assert cases.select_cases("cpu", "full") == gpu
    assert cases.select_cases("cuda", "quick") == cpu
    with pytest.raises(ValueError, match="shape set"):
        cases.select_cases("cpu", "tiny")


def test_each_case_runs_its_baselines_before_the_fused_providers():
    pairs = cases.parametrization(cases.select_cases("cpu"))
    assert len(pairs) == len(cases.select_cases("cpu")) * len(cases.PROVIDERS)
    order = [provider for case, provider in pairs if case == pairs[0][0]]
    assert order[:2] == ["eager", "compile"] and set(order[2:]) == {"cuda", "triton", "cpu", "torch"}
    assert len({case.id for case, _ in pairs}) == len(cases.select_cases("cpu"))


def test_provider_skip_reasons(monkeypatch):
    cpu = torch.device("cpu")
    assert cases.provider_skip_reason("eager", cpu) is None
    assert cases.provider_skip_reason("torch", cpu) is None
    if torch._dynamo.is_dynamo_supported():
        assert cases.provider_skip_reason("compile", cpu) is None
    assert cases.provider_skip_reason("triton", cpu)  # the registry's reason or the interpreter's
    with pytest.raises(ValueError, match="provider"):
        cases.provider_skip_reason("numpy", cpu)

    # The registry's reason is passed on as it is (e.g. a backend not built on this branch).
    monkeypatch.setattr(sa_kernels.backends, "unavailable_reason",
                        lambda name, device, build=True: f"no {name} here")
    assert cases.provider_skip_reason("cuda", cpu) == "no cuda here"
    # Where the registry would run Triton, the interpreter is still not a benchmark provider.
    monkeypatch.setattr(sa_kernels.backends, "unavailable_reason",
                        lambda name, device, build=True: None)
    assert "interpreter" in cases.provider_skip_reason("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET=1" in cases.provider_skip_reason("triton", torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert cases.provider_skip_reason("triton", torch.device("cuda")) is None


# --- workload ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", cases.MODES)
def test_input_rotation_cycles_through_distinct_random_buffers(mode):
    case = cases.Case(SMALL, torch.float32, mode)
    rotation = workload.make_inputs(case, "cpu", 3, seed=5)
    assert len(rotation) == 3 and rotation.nbytes == 3 * workload.input_set_bytes(case)
    first = [rotation.next() for _ in range(3)]
    assert rotation.next()[0] is first[0][0]  # round-robin
    assert len({s[0].data_ptr() for s in first}) == 3
    x = first[0][0]
    assert x.std() > 1 and x.abs().min() > 0  # random, never zeros
    assert x.requires_grad == (mode == "forward+backward")
    if mode == "forward+backward":
        assert not torch.equal(first[0][1], x)  # dy is its own draw
    again = workload.make_inputs(case, "cpu", 1, seed=5).next()[0]
    assert torch.equal(again, x)  # every provider of a case gets the same inputs


def test_the_fused_provider_computes_what_the_eager_provider_computes():
    # float32: a bf16 eager reference rounds its intermediates, so it is no yardstick for bf16.
    dtype = torch.float32
    seed = workload.case_seed("equal")
    rotation = workload.make_inputs(cases.Case(SMALL, dtype, "forward+backward"), "cpu", 1, seed)
    results = {}
    for provider in ("eager", "torch"):
        module = workload.build_module(provider, SMALL, dtype, "cpu", seed)
        results[provider] = workload.make_step(module, "forward+backward", rotation)()
        forward = workload.make_step(module, "forward", workload.InputRotation(
            [(rotation.sets[0][0].detach(),)]))
        results[provider + "-forward"] = forward()
    assert len(results["torch"]) == 7  # dx and the six parameter gradients
    assert results["torch"][0].shape == SMALL.dims
    assert not results["torch-forward"].requires_grad
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(results["torch-forward"], results["eager-forward"], **tol)
    torch.testing.assert_close(results["torch"][0], results["eager"][0], **tol)
    for fused, ref in zip(results["torch"][1:], results["eager"][1:]):
        assert fused.shape == ref.shape
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


def test_build_module_rejects_unknown_providers():
    with pytest.raises(ValueError, match="provider"):
        workload.build_module("jax", SMALL, torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="mode"):
        workload.make_step(torch.nn.Identity(), "backward", None)


# --- timing -----------------------------------------------------------------------------------

def test_rotation_exceeds_twice_the_cache():
    mib = 1 << 20
    for set_bytes in (2 * mib, 3 * mib + 1, 40 * mib):
        count = timing.rotation_count(set_bytes, 50 * mib)
        assert count * set_bytes >= 2 * 50 * mib and (count - 1) * set_bytes < 2 * 50 * mib
    assert timing.rotation_count(400 * mib, 50 * mib) == 2  # never fewer than two
    assert timing.rotation_count(1, 50 * mib) == 256  # capped
    with pytest.raises(ValueError):
        timing.rotation_count(0, 50 * mib)
    assert timing.cache_bytes("cpu") > 0


def test_cpu_cache_size_is_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "266240K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert timing._cpu_last_level_cache_bytes(str(tmp_path)) == 266240 << 10
    assert timing._cpu_last_level_cache_bytes(str(tmp_path / "missing")) == 0


def test_plan_rounds_fills_the_budget_and_batches_short_steps():
    assert timing.plan_rounds(0.1, 1.0, min_rounds=5) == (10, 1)
    assert timing.plan_rounds(1.0, 1.0, min_rounds=5) == (5, 1)  # at least min_rounds
    rounds, iterations = timing.plan_rounds(10e-6, 1.0, min_round_s=1e-3, min_rounds=10)
    assert iterations == 100 and rounds == 1000
    rounds, iterations = timing.plan_rounds(200e-6, 0.5, min_round_s=1e-3, min_rounds=10)
    assert iterations == 5 and rounds == 500


class _FakeEvent:
    """Stands in for torch.cuda.Event: records the fake device time, counts synchronisations."""
    now_ms = 0.0

    def __init__(self):
        self.time_ms, self.synchronized = None, False

    def record(self):
        self.time_ms = _FakeEvent.now_ms

    def synchronize(self):
        self.synchronized = True

    def elapsed_time(self, end):
        return end.time_ms - self.time_ms


def test_cuda_event_clock_reads_the_interval_between_its_events():
    clock = timing.CudaEventClock(new_event=_FakeEvent)
    start = clock()
    _FakeEvent.now_ms += 2.5
    end = clock()
    assert end - start == pytest.approx(2.5e-3)
    assert end.event.synchronized and not start.event.synchronized
    assert clock.__name__ == "cuda_event_clock"


_CLOCK_IN_PYTEST_BENCHMARK = """
from sa_kernels.bench import timing


class FakeEvent:  # each record lands 2 ms of device time after the previous one
    now_ms = 0.0

    def record(self):
        FakeEvent.now_ms += 2.0
        self.time_ms = FakeEvent.now_ms

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.time_ms - self.time_ms


def test_clock(benchmark):
    clock = timing.CudaEventClock(new_event=FakeEvent)
    assert timing.use_device_clock(benchmark, "cuda", clock) == "cuda events"
    benchmark.pedantic(lambda: None, rounds=3, iterations=4, warmup_rounds=1)
    # start and end events 2 ms apart around 4 iterations: 0.5 ms per step, every round
    assert benchmark.stats.stats.data == [0.5e-3] * 3
"""


def test_pytest_benchmark_times_rounds_with_the_installed_clock(tmp_path):
    """The one private hook the suite relies on (pytest-benchmark's per-fixture ``_timer``)."""
    (tmp_path / "test_clock.py").write_text(_CLOCK_IN_PYTEST_BENCHMARK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(sa_kernels.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
         str(tmp_path / "test_clock.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class _FakeBenchmark:
    disabled = False

    def __init__(self):
        self.extra_info, self.calls = {}, []

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        self.calls.append((rounds, iterations, warmup_rounds))
        for _ in range(warmup_rounds + rounds * iterations):
            target()
        self.stats = type("S", (), {"stats": type("T", (), {"median": 0.125})})


def test_run_benchmark_warms_up_before_the_timed_rounds():
    bench, steps = _FakeBenchmark(), []
    median = timing.run_benchmark(bench, lambda: steps.append(len(bench.calls)), "cpu", budget_s=0)
    assert median == 0.125
    warm = steps.index(1)  # the first step inside pedantic
    assert warm >= 2  # a warm-up step and the estimate's step before any timed round
    assert bench.calls == [(5, 1, 1)] and bench.extra_info["timer"] == "perf_counter"
    bench.disabled = True
    bench.pedantic = lambda target: target()
    assert timing.run_benchmark(bench, lambda: None, "cpu") is None


def test_copy_bandwidth_counts_read_and_write_bytes():
    result = timing.measure_copy_bandwidth("cpu", nbytes=4 << 20, repeats=3)
    assert result["bytes_copied"] == 4 << 20
    assert result["gbps"] == pytest.approx(2 * result["bytes_copied"] / result["median_s"] / 1e9)


# --- report -----------------------------------------------------------------------------------

def _bench(case, dtype, mode, provider, median, **extra):
    info = dict(case=case, dtype=dtype, mode=mode, provider=provider, **extra)
    return {"name": f"test[{case}-{provider}]", "extra_info": info, "stats": {"median": median}}


def _synthetic_run():
    fwd = dict(bytes_moved=2_000_000, input_bytes=1_000_000, copy_gbps=8.0)
    bwd = dict(bytes_moved=5_000_000, input_bytes=1_000_000, copy_gbps=8.0,
               peak_memory_bytes=3 << 20, saved_bytes=1_048_576)
    return {
        "datetime": "2026-11-25T01:02:03+00:00",
        "machine_info": {},
        "benchmarks": [
            # pytest-benchmark may list benchmarks in any order; the report restores case order
            _bench("seed 64x256x8x8 G8", "float32", "forward", "torch", 0.5e-3, **fwd),
            _bench("seed 64x256x8x8 G8", "float32", "forward", "eager", 2e-3, **fwd),
            _bench("seed 64x256x8x8 G8", "float32", "forward", "compile", 1e-3, **fwd),
            _bench("seed 64x256x8x8 G8", "float32", "forward+backward", "torch", 2.5e-3, **bwd),
            _bench("seed 64x256x8x8 G8", "float32", "forward+backward", "compile", 5e-3, **bwd),
            {"name": "other", "extra_info": {}, "stats": {"median": 1.0}},  # not a case: ignored
        ],
        "sa_kernels": {
            "environment": {"device_name": "NVIDIA H100 80GB HBM3", "date": "2026-11-25",
                            "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"},
            "copy_bandwidth": {"gbps": 8.0, "method": "synthetic"},
            "skipped": {"cuda": "the cuda backend could not be imported"},
        },
    }


def test_report_rows_recompute_speedups_from_the_medians():
    rows = report.rows_from_json(_synthetic_run())
    assert [(r.mode, r.provider) for r in rows] == [
        ("forward", "eager"), ("forward", "compile"), ("forward", "torch"),
        ("forward+backward", "compile"), ("forward+backward", "torch")]
    by = {(r.mode, r.provider): r for r in rows}
    assert by["forward", "torch"].speedup_vs_eager == pytest.approx(4.0)
    assert by["forward", "torch"].speedup_vs_compile == pytest.approx(2.0)
    assert by["forward", "compile"].speedup_vs_eager == pytest.approx(2.0)
    assert by["forward", "eager"].speedup_vs_eager == pytest.approx(1.0)
    assert by["forward+backward", "torch"].speedup_vs_eager is None  # no eager in that case
    assert by["forward+backward", "torch"].speedup_vs_compile == pytest.approx(2.0)
    assert by["forward", "torch"].gbps == pytest.approx(4.0)  # 2e6 bytes in 0.5 ms
    assert by["forward", "torch"].pct_of_copy == pytest.approx(50.0)


def test_report_table_formats_every_column():
    rows = report.rows_from_json(_synthetic_run())
    table = report.format_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(report.TABLE_HEADER) + " |"
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == len(report.TABLE_HEADER) + 1 for line in lines)
    torch_fwd = next(line for line in lines if "| torch |" in line and "500 us" in line)
    for cell in ("500 us", "4.0", "50.0%", "4.00x", "2.00x"):
        assert f"| {cell} |" in torch_fwd
    torch_bwd = lines[-1]
    for cell in ("2.50 ms", "| - |", "3.0 MiB", "1.0 MiB (1.05x in)"):
        assert cell in torch_bwd
    assert lines[2].startswith("| seed 64x256x8x8 G8 | float32 | forward | eager |")
    assert lines[3].startswith("|  |  |  | compile |")  # the case is named once


def test_report_text_names_device_bandwidth_and_skips():
    data = _synthetic_run()
    text = report.format_report(data)
    assert "NVIDIA H100 80GB HBM3" in text and "8.0 GB/s" in text and "torch 2.11.0" in text
    assert "- cuda: the cuda backend could not be imported" in text
    assert report.output_stem(report.run_info(data)) == "nvidia-h100-80gb-hbm3-2026-11-25"
    data["benchmarks"] = []
    assert "No benchmark results" in report.format_report(data)


def test_time_formats_and_slugs():
    assert report.format_time(12.345e-6) == "12.3 us"
    assert report.format_time(1.5e-3) == "1.50 ms"
    assert report.format_time(250e-3) == "250 ms"
    assert report.format_time(None) == "-"
    assert environment.slug("CPU Intel(R) Xeon(R) Processor") == "cpu-intel-xeon-processor"
    assert environment.slug("NVIDIA H200") == "nvidia-h200"
    info = environment.environment_info("cpu")
    assert info["device_name"].startswith("CPU") and info["torch"] == torch.__version__


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.write_plot(report.rows_from_json(_synthetic_run()), tmp_path / "p.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(report.MissingDependencyError, match=r"pip install 'sa-kernels\[bench\]'"):
        report.write_plot(report.rows_from_json(_synthetic_run()), tmp_path / "p.png")
    with pytest.raises(SystemExit, match="matplotlib"):
        cli.main(["--json", "unused.json", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # it failed before writing anything


# --- command line -----------------------------------------------------------------------------

def test_cli_reports_an_existing_json_into_files_named_by_device_and_date(tmp_path, capsys):
    source = tmp_path / "run.json"
    source.write_text(json.dumps(_synthetic_run()))
    out = tmp_path / "results"
    assert cli.main(["--json", str(source), "--out", str(out), "--no-plot"]) == 0
    stem = "nvidia-h100-80gb-hbm3-2026-11-25"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    assert "| torch |" in capsys.readouterr().out
    assert json.loads((out / f"{stem}.json").read_text()) == _synthetic_run()
    if pytest.importorskip("matplotlib"):
        assert cli.main(["--json", str(source), "--out", str(out)]) == 0
        assert (out / f"{stem}-2.png").is_file()  # a second report never overwrites the first
    with pytest.raises(SystemExit):
        cli.main(["--json", str(source), "--out", str(out), "--", "-k", "seed"])
