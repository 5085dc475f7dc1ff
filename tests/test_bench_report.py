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
from torch.autograd import DeviceType

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

def _combos(selected):
    return {(c.shape.dims + (c.shape.groups,), cases.dtype_name(c.dtype), c.layout) for c in selected}


def test_gpu_set_runs_every_issue_shape_nchw_and_channels_last_where_asked():
    gpu = cases.select_cases("cuda")
    nchw = {(64, 256, 8, 8, 8), (64, 256, 56, 56, 64), (64, 512, 28, 28, 64),
            (64, 1024, 14, 14, 64), (64, 2048, 7, 7, 64), (16, 256, 80, 80, 8),
            (8, 64, 256, 256, 8)}
    channels_last = {(64, 256, 56, 56, 64), (16, 256, 80, 80, 8), (8, 64, 256, 256, 8),
                     (1, 256, 56, 56, 64), (8, 256, 56, 56, 64), (1, 64, 256, 256, 8)}
    combos = _combos(gpu)
    for dtype in ("float32", "bfloat16"):
        assert {d for d, t, l in combos if t == dtype and l == "nchw"} == nchw
        assert {d for d, t, l in combos if t == dtype and l == "channels_last"} == channels_last
    assert len(gpu) == 2 * len(combos)  # forward and forward+backward of each
    for case in gpu:
        assert case.shape.channels % (2 * case.shape.groups) == 0
    assert {c.shape.name for c in gpu if c.groupnorm} == {"seed"}  # issue 10's GPU host-cost case
    assert cases.select_cases("cpu", "full") == gpu


def test_quick_set_is_small_and_holds_the_host_cost_case():
    quick = cases.select_cases("cpu")
    assert quick == cases.select_cases("cuda", "quick")
    assert max(math.prod(c.shape.dims) for c in quick) <= 4_000_000
    tiny = [c for c in quick if c.shape.dims == (2, 16, 2, 2)]
    assert {(c.shape.groups, c.dtype, c.layout, c.groupnorm) for c in tiny} == {
        (8, torch.float32, "nchw", True)}  # nn.GroupNorm(8, 16) on it is the yardstick
    assert {c.layout for c in quick} == {"nchw", "channels_last"}


def test_cpu_set_has_the_stage_shapes_at_batch_8_in_both_layouts_and_dtypes():
    cpu = cases.select_cases("cpu", "cpu")
    combos = _combos(cpu)
    for dims in ((8, 256, 56, 56, 64), (8, 512, 28, 28, 64), (8, 1024, 14, 14, 64),
                 (8, 2048, 7, 7, 64), (64, 256, 8, 8, 8), (2, 256, 56, 56, 64)):
        for dtype in ("float32", "bfloat16"):
            for layout in cases.LAYOUTS:
                assert (dims, dtype, layout) in combos
    assert ((2, 16, 2, 2, 8), "float32", "nchw") in combos
    with pytest.raises(ValueError, match="shape set"):
        cases.select_cases("cpu", "tiny")


def test_each_case_runs_its_yardsticks_and_baselines_before_the_fused_providers():
    selected = cases.select_cases("cpu", "quick")
    pairs = cases.parametrization(selected, cases.PROVIDERS)
    by_case = {}
    for case, provider in pairs:
        by_case.setdefault(case, []).append(provider)
    for case, providers in by_case.items():
        assert providers == [p for p in cases.PROVIDERS if p in providers]  # run order
        assert ("copy" in providers) == (case.mode == "forward")
        assert ("groupnorm" in providers) == case.groupnorm
        assert {"eager", "compile", "cuda", "triton", "cpu", "torch"} <= set(providers)
    # forward before forward+backward of the same shape, dtype and layout: the copy comes first
    order = [case for case in dict.fromkeys(case for case, _ in pairs)]
    for i, case in enumerate(order):
        if case.mode == "forward+backward":
            assert order[i - 1].family == case.family and order[i - 1].mode == "forward"
    none = cases.parametrization(selected, cases.PROVIDERS, "none")
    assert not [p for _, p in none if p == "compile"] and len(none) < len(pairs)
    with pytest.raises(ValueError, match="sa-compile"):
        cases.parametrization(selected, cases.PROVIDERS, "some")


def test_providers_option():
    assert cases.parse_providers("auto", "cuda") == cases.DEFAULT_PROVIDERS["cuda"]
    assert "cpu" in cases.parse_providers(None, "cpu") and "cuda" not in cases.parse_providers("", "cpu")
    assert cases.parse_providers("torch, eager,copy", "cpu") == ("copy", "eager", "torch")
    with pytest.raises(ValueError, match="providers"):
        cases.parse_providers("eager,numpy", "cpu")


def test_cases_round_trip_through_json():
    for case in cases.select_cases("cpu", "cpu")[:6]:
        assert cases.case_from_dict(json.loads(json.dumps(case.to_dict()))) == case
    with pytest.raises(ValueError, match="dtype"):
        cases.dtype_from_name("Tensor")


def test_provider_skip_reasons(monkeypatch):
    cpu = torch.device("cpu")
    for provider in ("eager", "torch", "copy", "groupnorm"):
        assert cases.provider_skip_reason(provider, cpu) is None
    if torch._dynamo.is_dynamo_supported():
        assert cases.provider_skip_reason("compile", cpu) is None
    assert cases.provider_skip_reason("triton", cpu)  # the registry's reason or the interpreter's
    with pytest.raises(ValueError, match="provider"):
        cases.provider_skip_reason("numpy", cpu)

    # A backend this build lacks is skipped with a reason that names it, never a crash.
    monkeypatch.setattr(sa_kernels.backends, "BACKENDS", ("cuda", "triton", "torch"))
    reason = cases.provider_skip_reason("cpu", cpu)
    assert "no 'cpu' backend" in reason and "BACKENDS" in reason
    # Once the registry has it, its own answer decides.
    monkeypatch.setattr(sa_kernels.backends, "BACKENDS", ("cuda", "triton", "cpu", "torch"))
    monkeypatch.setattr(sa_kernels.backends, "unavailable_reason",
                        lambda name, device, build=True: None)
    assert cases.provider_skip_reason("cpu", cpu) is None
    # The registry's reason is passed on as it is (e.g. a backend not built on this machine).
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


@pytest.mark.parametrize("mode", cases.MODES)
def test_channels_last_cases_get_channels_last_inputs(mode):
    case = cases.Case(SMALL, torch.float32, mode, "channels_last")
    for tensor in workload.make_inputs(case, "cpu", 2, seed=3).next():
        assert tensor.is_contiguous(memory_format=torch.channels_last)
        assert not tensor.is_contiguous()
    x = workload.make_inputs(case, "cpu", 1, seed=3).next()[0]
    nchw = workload.make_inputs(cases.Case(SMALL, torch.float32, mode), "cpu", 1, seed=3).next()[0]
    assert torch.equal(x, nchw)  # the same values in another layout
    assert x.requires_grad == (mode == "forward+backward")


@pytest.mark.parametrize("layout", cases.LAYOUTS)
def test_yardsticks_are_a_copy_of_x_and_group_norm_with_the_case_groups(layout):
    case = cases.Case(SMALL, torch.float32, "forward", layout)
    (x,) = workload.make_inputs(case, "cpu", 1, seed=4).next()
    copy = workload.make_step(workload.build_module("copy", SMALL, torch.float32, "cpu", 0),
                              "forward", workload.InputRotation([(x,)]))()
    assert torch.equal(copy, x) and copy.data_ptr() != x.data_ptr()
    assert copy.is_contiguous(memory_format=case.memory_format)
    gn = workload.build_module("groupnorm", SMALL, torch.float32, "cpu", 0)
    assert (gn.num_groups, gn.num_channels) == (SMALL.groups, SMALL.channels)
    assert not torch.equal(gn.weight, torch.ones_like(gn.weight))  # random affine parameters
    expected = torch.nn.functional.group_norm(x.double(), SMALL.groups, gn.weight.double(),
                                              gn.bias.double(), gn.eps)
    torch.testing.assert_close(gn(x).double(), expected, **TOLERANCES[torch.float32])
    rotation = workload.make_inputs(cases.Case(SMALL, torch.float32, "forward+backward", layout),
                                    "cpu", 1, seed=4)
    assert len(workload.make_step(gn, "forward+backward", rotation)()) == 3  # dx, dweight, dbias


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


class _ProfilerEvent:
    """Stands in for a torch.profiler FunctionEvent: what the device-time reader looks at."""

    def __init__(self, name, device, duration_us, activity_type=None, annotation=False):
        self.name, self.duration_us = name, duration_us
        self.device_type = getattr(DeviceType, device.upper())
        if activity_type is not None:
            self.activity_type = activity_type
        self.is_user_annotation = annotation
        self.time_range = type("Range", (), {"elapsed_us": lambda _: duration_us})()


def _two_calls_of_gpu_events(with_types=True):
    t = (lambda kind: kind) if with_types else (lambda kind: None)
    events = [
        _ProfilerEvent("aten::mul", "cpu", 10.0, t("cpu_op")),
        _ProfilerEvent("cudaLaunchKernel", "cpu", 5.0, t("cuda_runtime")),
        _ProfilerEvent("## Call CompiledFxGraph ##", "cuda", 40.0, t("gpu_user_annotation"),
                       annotation=True),  # spans kernels that are counted on their own
    ]
    for _ in range(2):
        events += [_ProfilerEvent("sa_forward_kernel", "cuda", 7.0, t("kernel")),
                   _ProfilerEvent("Memcpy DtoD", "cuda", 3.0, t("gpu_memcpy")),
                   _ProfilerEvent("Memset", "cuda", 1.0, t("gpu_memset"))]
    return events


@pytest.mark.parametrize("with_types", [True, False], ids=["activity-types", "older-torch"])
def test_device_time_sums_kernels_memcpys_and_memsets_per_call(with_types):
    events = _two_calls_of_gpu_events(with_types)
    if with_types:  # host-side overhead records can sit on the device timeline: never device work
        events.append(_ProfilerEvent("Lazy Function Loading", "cuda", 500.0, "overhead"))
    result = timing.summarize_activities(events, "cuda", calls=2)
    assert result == {"device_us": pytest.approx(11.0), "launches": 3.0}
    assert [e.name for e in timing.device_activities(events, "cuda")] == \
        ["sa_forward_kernel", "Memcpy DtoD", "Memset"] * 2
    cpu = timing.summarize_activities(events, "cpu", calls=2)
    assert cpu["device_us"] is None  # on a CPU the wall time is the only time
    assert cpu["launches"] == (0.5 if with_types else 1.0)  # cpu_op (typed) or any CPU event
    with pytest.raises(ValueError):
        timing.summarize_activities(events, "cuda", calls=0)


def test_device_time_reader_falls_back_on_the_device_when_no_activity_type_is_known():
    events = [_ProfilerEvent("k", "cuda", 4.0, activity_type=7),  # a type this reader does not know
              _ProfilerEvent("range", "cuda", 9.0, activity_type=8, annotation=True),
              _ProfilerEvent("aten::add", "cpu", 2.0, activity_type=9)]
    assert timing.summarize_activities(events, "cuda", calls=1) == {"device_us": 4.0, "launches": 1.0}


def test_device_time_reader_on_the_cpu_profiler():
    a, b = torch.randn(64, 64), torch.randn(64, 64)

    def step():
        with torch.profiler.record_function("a user range"):  # annotations are not operators
            return torch.mm(a, b).relu_().sum()
    step()
    for calls in (2, 4):
        events = timing.profile_calls(step, "cpu", calls)
        ops = [e for e in events if e.name.startswith("aten::")]
        result = timing.summarize_activities(events, "cpu", calls)
        assert result["device_us"] is None
        assert result["launches"] == len(ops) / calls >= 3  # mm, relu_, sum (and what they call)
        assert not any(e.name == "a user range" for e in timing.device_activities(events, "cpu"))
    measured = timing.measure_device_time(step, "cpu", calls=3)
    assert measured["launches"] == result["launches"] and measured["device_us"] is None
    assert measured["profiled_calls"] == 3 and measured["profile_s"] > 0
    assert timing.launch_cost_us("cpu", calls=20) > 0


def test_a_profiler_that_fails_leaves_the_wall_time(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("profiler already running\nmore")
    monkeypatch.setattr(timing, "profile_calls", broken)
    result = timing.measure_device_time(lambda: None, "cpu")
    assert result["device_us"] is None and result["launches"] is None
    assert result["profile_error"] == "profiler already running"


# --- report -----------------------------------------------------------------------------------

ENV = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "date": "2026-11-25",
       "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}
MB = 1_000_000


def _kernel(provider, mode, wall_us, device_us, case="seed 64x256x8x8 G8", dtype="float32",
            layout="nchw", shape=(64, 256, 8, 8), **extra):
    info = dict(kind="kernel", case=case, dtype=dtype, layout=layout, mode=mode, provider=provider,
                shape=list(shape), input_bytes=MB, bytes_moved=metrics.bytes_moved(MB, mode),
                wall_us=wall_us, device_us=device_us, launches=2.0,
                peak_bytes=3 << 20, saved_bytes=1_048_576 if mode != "forward" else None,
                **ENV, **extra)
    return {"name": f"test[{case}-{mode}-{provider}]", "extra_info": info,
            "stats": {"median": wall_us * 1e-6}}


def _model(provider, wall_ms, device_ms, mode="train", batch=64, **extra):
    info = dict(kind="model", model="sa_resnet50", case=f"sa_resnet50 {mode} b{batch} 224x224",
                mode=mode, batch=batch, image=224, layout="channels_last",
                precision="bf16-autocast", provider=provider, wall_us=wall_ms * 1e3,
                device_us=device_ms * 1e3, launches=900.0, peak_bytes=3 << 30, **ENV, **extra)
    return {"name": f"test[{mode}-{provider}]", "extra_info": info,
            "stats": {"median": wall_ms * 1e-3}}


def _synthetic_run():
    return {
        "datetime": "2026-11-25T01:02:03+00:00",
        "machine_info": {},
        "benchmarks": [
            # listed in any order; the report restores case order, then provider order
            _kernel("cuda", "forward", 100.0, 8.0),
            _kernel("copy", "forward", 10.0, 4.0),
            _kernel("eager", "forward", 300.0, 40.0),
            _kernel("groupnorm", "forward", 50.0, 5.0),
            _kernel("compile", "forward", 200.0, 16.0),
            _kernel("cuda", "forward+backward", 900.0, 36.0),
            _kernel("compile", "forward+backward", 950.0, 36.0),
            _model("no-sa", 20.0, 18.0),
            _model("cuda", 25.0, 21.0, sa_backend="cuda"),
            _model("eager", 50.0, 40.0),
            {"name": "other", "extra_info": {}, "stats": {"median": 1.0}},  # not a case: ignored
        ],
        "sa_kernels": {
            "environment": ENV,
            "copy_bandwidth": {"gbps": 4000.0, "method": "synthetic"},
            "skipped": {"triton": ["Triton is not installed"], "cpu": "an old-style reason"},
            "options": {"shapes": "full", "models": "full", "compile": "auto", "threads": 16,
                        "threads_option": None},
            "complete": True, "elapsed_s": 280.0,
        },
    }


def test_report_rows_recompute_every_comparison_on_both_clocks():
    rows = report.rows_from_json(_synthetic_run())
    kernel = [(r.info["mode"], r.info["provider"]) for r in rows if not r.is_model]
    assert kernel == [("forward", p) for p in ("copy", "groupnorm", "eager", "compile", "cuda")] + \
        [("forward+backward", "compile"), ("forward+backward", "cuda")]
    assert [r.info["provider"] for r in rows if r.is_model] == ["no-sa", "eager", "cuda"]
    by = {(r.info["mode"], r.info["provider"]): r for r in rows}
    fwd = by["forward", "cuda"]
    assert fwd.speedup_vs_eager_wall == pytest.approx(3.0)
    assert fwd.speedup_vs_eager_device == pytest.approx(5.0)
    assert fwd.speedup_vs_compile_wall == pytest.approx(2.0)
    assert fwd.speedup_vs_compile_device == pytest.approx(2.0)
    assert fwd.x_copy_wall == pytest.approx(10.0) and fwd.x_copy_device == pytest.approx(2.0)
    assert fwd.x_groupnorm_wall == pytest.approx(2.0) and fwd.x_groupnorm_device == pytest.approx(1.6)
    # % of copy: forward moves what a copy moves, so it is copy time over this time
    assert fwd.pct_copy_wall == pytest.approx(10.0) and fwd.pct_copy_device == pytest.approx(50.0)
    step = by["forward+backward", "cuda"]
    # forward+backward moves 5x the input, the copy 2x: (5/36 us) / (2/4 us)
    assert step.pct_copy_device == pytest.approx(100 * (5 / 36) / (2 / 4))
    assert step.x_copy_wall == pytest.approx(90.0)  # the forward's copy serves both modes
    assert step.speedup_vs_eager_wall is None  # no eager in that case
    assert step.x_groupnorm_wall is None
    assert step.speedup_vs_compile_wall == pytest.approx(950 / 900)
    assert by["forward", "copy"].pct_copy_wall == pytest.approx(100.0)
    assert fwd.gbps_wall == pytest.approx(2 * MB / 100e-6 / 1e9)


def test_report_falls_back_on_the_large_copy_when_the_case_has_none():
    data = _synthetic_run()
    data["benchmarks"] = [b for b in data["benchmarks"]
                          if b["extra_info"].get("provider") != "copy"]
    fwd = next(r for r in report.rows_from_json(data)
               if r.info.get("provider") == "cuda" and r.info["mode"] == "forward")
    # The run's large copy (its sa_kernels section: 4000 GB/s), as the suite's own rows have it.
    assert fwd.copy_reference == "large copy_"
    assert fwd.pct_copy_device == pytest.approx(100 * 2 * MB / 8e-6 / 1e9 / 4000.0)
    assert fwd.x_copy_wall is None
    table = report.format_kernel_table(report.rows_from_json(data))
    assert f"| {fwd.pct_copy_wall:.1f}% / {fwd.pct_copy_device:.1f}% |" in table  # the table shows it too


def test_model_rows_carry_sa_cost_over_the_no_sa_network():
    rows = [r for r in report.rows_from_json(_synthetic_run()) if r.is_model]
    by = {r.info["provider"]: r for r in rows}
    assert by["cuda"].sa_cost_us_wall == pytest.approx(5000.0)
    assert by["cuda"].sa_cost_pct_wall == pytest.approx(25.0)
    assert by["cuda"].sa_cost_us_device == pytest.approx(3000.0)
    assert by["eager"].sa_cost_pct_device == pytest.approx(100 * 22 / 18)
    assert by["cuda"].speedup_vs_eager_wall == pytest.approx(2.0)
    assert by["cuda"].images_per_s == pytest.approx(64 / 25e-3)
    assert by["no-sa"].sa_cost_us_wall == pytest.approx(0.0)


def test_kernel_table_shows_both_clocks_and_names_each_case_once():
    rows = report.rows_from_json(_synthetic_run())
    lines = report.format_kernel_table(rows).splitlines()
    header = report.kernel_header(True)
    assert lines[0] == "| " + " | ".join(header) + " |"
    assert "% copy (wall / device)" in header and "x GroupNorm (wall / device)" in header
    assert len(lines) == 2 + 7
    assert all(line.count("|") == len(header) + 1 for line in lines)
    cuda = next(line for line in lines if "| cuda |" in line and "| 100 us |" in line)
    for cell in ("| 8.00 us |", "| 10.0% / 50.0% |", "| 3.00x / 5.00x |", "| 2.00x / 2.00x |",
                 "| 10.00x / 2.00x |", "| 2.00x / 1.60x |", "| 3.0 MiB |"):
        assert cell in cuda, cell
    assert lines[2].startswith("| seed 64x256x8x8 G8 | float32 | nchw | forward | copy |")
    assert lines[3].startswith("|  |  |  |  | groupnorm |")
    assert "1.0 MiB (1.05x in)" in lines[-1]
    # A CPU run has no device time: single-clock cells and headers
    cpu_rows = [report.Row(dict(r.info, device_us=None), r.wall_s) for r in rows if not r.is_model]
    report.add_comparisons(cpu_rows)
    cpu_lines = report.format_kernel_table(cpu_rows).splitlines()
    assert "% copy (wall)" in cpu_lines[0] and " / " not in "".join(cpu_lines[2:])


def test_model_table():
    lines = report.format_model_table(report.rows_from_json(_synthetic_run())).splitlines()
    assert lines[0] == "| " + " | ".join(report.model_header(True)) + " |"
    assert lines[2].startswith("| train, batch 64, 224x224 | channels_last | bf16-autocast | no-sa |")
    cuda = lines[-1]
    for cell in ("| cuda |", "| 25.0 ms |", "| 21.0 ms |", "| 2560 |", "| 3072.0 MiB |",
                 "| +5.00 ms (+25%) |", "| +3.00 ms (+17%) |", "| 2.00x / 1.90x |"):
        assert cell in cuda, cell


def test_targets_are_checked_on_the_rows_they_name():
    data = _synthetic_run()
    results = {(t.name, p): (met, n, worst) for t, p, met, n, worst, _ in
               report.evaluate_targets(report.rows_from_json(data))}
    assert results[("GPU host cost: forward <= 1.5x nn.GroupNorm (wall)", "cuda")] == (0, 1, 2.0)
    assert not [name for name, _ in results if not name.startswith("GPU")]  # no CPU rows here
    cpu = dict(ENV, device="cpu", device_name="CPU x")
    tiny = dict(case="tiny 2x16x2x2 G8", shape=(2, 16, 2, 2))
    stage = dict(case="resnet50-s1-b8 8x256x56x56 G64", shape=(8, 256, 56, 56))
    data["benchmarks"] = [
        _kernel("groupnorm", "forward", 10.0, None, **tiny), _kernel("cpu", "forward", 14.0, None, **tiny),
        _kernel("copy", "forward", 100.0, None, **stage), _kernel("eager", "forward", 900.0, None, **stage),
        _kernel("compile", "forward", 400.0, None, **stage), _kernel("cpu", "forward", 250.0, None, **stage),
    ]
    for bench in data["benchmarks"]:
        bench["extra_info"].update(cpu)
    results = {(t.name, p): (met, n, round(worst, 3)) for t, p, met, n, worst, _ in
               report.evaluate_targets(report.rows_from_json(data))}
    assert results == {
        ("host cost: forward <= 1.5x nn.GroupNorm", "cpu"): (1, 1, 1.4),
        ("forward >= 3x eager", "cpu"): (1, 1, 3.6),
        ("forward >= 1.5x compile", "cpu"): (1, 1, 1.6),
        ("forward <= 2x copy_ (planes >= 28x28)", "cpu"): (0, 1, 2.5),
    }
    table = report.format_targets(report.rows_from_json(data))
    assert "| forward <= 2x copy_ (planes >= 28x28) | cpu | 0 / 1 | 2.50x |" in table


def test_report_text_names_device_versions_threads_skips_and_sections():
    data = _synthetic_run()
    text = report.format_report(data)
    for expected in ("NVIDIA H100 80GB HBM3", "4000.0 GB/s", "torch 2.11.0", "CPU threads: 16",
                     "## Kernels", "## End to end: SA-ResNet-50", "## Targets",
                     "- triton: Triton is not installed", "- cpu: an old-style reason",
                     "run time: 280 s"):
        assert expected in text, expected
    assert report.output_stem(report.run_info(data)) == "nvidia-h100-80gb-hbm3-2026-11-25"
    data["sa_kernels"]["complete"] = False
    assert "**incomplete run**" in report.format_report(data)
    data["benchmarks"] = []
    assert "No benchmark results" in report.format_report(data)
    data["sa_kernels"]["environment"] = dict(ENV, device="cpu", device_name="CPU Xeon", cpu_threads=1,
                                             cpu_cores=2, cpu_capability="AVX512")
    assert report.output_stem(report.run_info(data)) == "cpu-xeon-2026-11-25-t1"
    assert "of 2 cores; kernels for AVX512" in report.format_report(data)


def test_merging_a_kernel_run_and_a_model_run():
    data = _synthetic_run()
    kernels = dict(data, benchmarks=[b for b in data["benchmarks"]
                                     if b["extra_info"].get("kind") == "kernel"])
    models_run = json.loads(json.dumps(dict(data, benchmarks=[
        b for b in data["benchmarks"] if b["extra_info"].get("kind") == "model"])))
    models_run["sa_kernels"].update(complete=False, skipped={"triton": ["another reason"]},
                                    elapsed_s=20.0)
    merged = report.merge([kernels, models_run])
    assert len(merged["benchmarks"]) == 10
    assert merged["sa_kernels"]["complete"] is False and merged["sa_kernels"]["elapsed_s"] == 300.0
    assert merged["sa_kernels"]["skipped"]["triton"] == ["Triton is not installed", "another reason"]
    assert merged["sa_kernels"]["environment"] == ENV
    assert len(report.rows_from_json(merged)) == 10


def test_two_runs_of_the_same_case_are_each_compared_within_their_own_run():
    first, second = _synthetic_run(), _synthetic_run()
    for bench in second["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") == "kernel":
            info["wall_us"] *= 3
    rows = report.rows_from_json(report.merge([first, second]))
    eager = [r for r in rows if r.info.get("provider") == "eager" and not r.is_model]
    assert [r.speedup_vs_eager_wall for r in eager] == [1.0, 1.0]
    cuda = [r for r in rows if r.info.get("provider") == "cuda" and r.info.get("mode") == "forward"]
    assert [r.speedup_vs_eager_wall for r in cuda] == [pytest.approx(3.0), pytest.approx(3.0)]
    assert [r.run for r in cuda] == [0, 1]


def test_time_formats_and_slugs():
    assert report.format_time(12.345e-6) == "12.3 us"
    assert report.format_time(1.5e-3) == "1.50 ms"
    assert report.format_time(250e-3) == "250 ms"
    assert report.format_time(None) == "-"
    assert environment.slug("CPU Intel(R) Xeon(R) Processor") == "cpu-intel-xeon-processor"
    assert environment.slug("NVIDIA H200") == "nvidia-h200"
    info = environment.environment_info("cpu")
    assert info["device_name"].startswith("CPU") and info["torch"] == torch.__version__
    assert info["cpu_cores"] == os.cpu_count()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


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
    assert "| cuda |" in capsys.readouterr().out
    assert json.loads((out / f"{stem}.json").read_text()) == _synthetic_run()
    if pytest.importorskip("matplotlib"):
        assert cli.main(["--json", str(source), "--out", str(out)]) == 0
        assert (out / f"{stem}-2.png").is_file()  # a second report never overwrites the first
    with pytest.raises(SystemExit):
        cli.main(["--json", str(source), "--out", str(out), "--", "-k", "seed"])


@pytest.mark.parametrize("form", ["joined", "separate"])
def test_cli_reads_the_json_that_the_pytest_arguments_name(monkeypatch, tmp_path, form):
    named = tmp_path / "mine.json"
    written = []

    def fake_suite(benchmarks, json_path, pytest_args):
        written.append(json_path)
        Path(json_path).write_text(json.dumps(_synthetic_run()))
        return 0

    monkeypatch.setattr(cli, "run_suite", fake_suite)
    monkeypatch.setattr(cli, "find_benchmarks", lambda folder: tmp_path)
    args = [f"--sa-json={named}"] if form == "joined" else ["--sa-json", str(named)]
    out = tmp_path / "results"
    assert cli.main(["--out", str(out), "--no-plot", "--", "-k", "seed", *args]) == 0
    assert written == [named] and named.is_file()  # reported, and left where the caller put it
    assert json.loads((out / "nvidia-h100-80gb-hbm3-2026-11-25.json").read_text()) == _synthetic_run()


def test_cli_merges_several_runs_into_one_report(tmp_path):
    data = _synthetic_run()
    paths = []
    for kind in ("kernel", "model"):
        part = dict(data, benchmarks=[b for b in data["benchmarks"]
                                      if b["extra_info"].get("kind") == kind])
        paths += ["--json", str(tmp_path / f"{kind}.json")]
        (tmp_path / f"{kind}.json").write_text(json.dumps(part))
    out = tmp_path / "results"
    assert cli.main(paths + ["--out", str(out), "--no-plot"]) == 0
    stem = "nvidia-h100-80gb-hbm3-2026-11-25"
    merged = json.loads((out / f"{stem}.json").read_text())
    assert len(merged["benchmarks"]) == 10
    text = (out / f"{stem}.md").read_text()
    assert "## Kernels" in text and "## End to end: SA-ResNet-50" in text


@pytest.mark.parametrize("content", [None, "{not json"], ids=["missing", "not-json"])
def test_cli_names_a_json_it_cannot_read_in_one_line(tmp_path, content):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=r"^error: cannot read the run's JSON: "):
        cli.main(["--json", str(path), "--out", str(tmp_path / "out"), "--no-plot"])
