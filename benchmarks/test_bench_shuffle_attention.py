"""Shuffle Attention per provider: forward and forward+backward time for each shape and dtype.

    pytest benchmarks/ --benchmark-only        # the suite
    python -m sa_kernels.bench                 # the suite, then the table and the plot

Cases, byte counts and timing live in ``sa_kernels.bench``; this file only wires them up.
"""
import torch

from sa_kernels.bench import cases, metrics, timing, workload


def pytest_generate_tests(metafunc):
    if {"case", "provider"} <= set(metafunc.fixturenames):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        selected = cases.select_cases(device_type, metafunc.config.getoption("--sa-shapes"))
        pairs = cases.parametrization(selected)
        metafunc.parametrize(("case", "provider"), pairs,
                             ids=[f"{case.id}-{provider}" for case, provider in pairs])


def test_shuffle_attention(benchmark, case, provider, bench_device, measure, input_cache,
                           copy_bandwidth, medians, environment, skip_provider):
    reason = cases.provider_skip_reason(provider, bench_device)
    if reason is not None:
        skip_provider(provider, reason)
    seed = workload.case_seed(case.id)
    count = timing.rotation_count(workload.input_set_bytes(case), timing.cache_bytes(bench_device))
    rotation = input_cache.get(case.id, lambda: workload.make_inputs(case, bench_device, count, seed))
    module = workload.build_module(provider, case.shape, case.dtype, bench_device, seed)
    step = workload.make_step(module, case.mode, rotation)

    benchmark.group = case.id
    try:
        median = measure(step)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        skip_provider(provider, f"torch.compile failed here: {str(e).splitlines()[0]}")
    if median is None:  # --benchmark-disable: the step ran once, as a smoke test
        return
    medians.setdefault(case.id, {})[provider] = median

    peak = saved = None
    if case.mode == "forward+backward":
        peak, _ = metrics.peak_memory_delta(step, bench_device)
        saved, _ = metrics.saved_tensor_bytes(workload.forward_for_saved_bytes(module, rotation))
    benchmark.extra_info.update(
        metrics.case_record(case, provider, median, copy_bandwidth, medians[case.id], peak, saved),
        rotated_input_sets=len(rotation),
        **environment)
