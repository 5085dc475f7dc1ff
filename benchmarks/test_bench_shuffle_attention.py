"""Shuffle Attention per provider: wall and device time of a forward and a training step, per case.

    pytest benchmarks/ --benchmark-only        # the suite
    python -m sa_kernels.bench                 # the suite, then the table and the plot

Cases, byte counts and timing live in ``sa_kernels.bench``; this file only wires them up.
"""
import torch

from sa_kernels.bench import cases, metrics, timing, workload

REFERENCE_PROVIDERS = ("copy", "groupnorm", "eager", "compile")


def pytest_generate_tests(metafunc):
    if {"case", "provider"} <= set(metafunc.fixturenames):
        config = metafunc.config
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        selected = cases.select_cases(device_type, config.getoption("--sa-shapes"))
        providers = cases.parse_providers(config.getoption("--sa-providers"), device_type)
        pairs = cases.parametrization(selected, providers, config.getoption("--sa-compile"))
        metafunc.parametrize(("case", "provider"), pairs,
                             ids=[f"{case.id}-{provider}" for case, provider in pairs])


def test_shuffle_attention(benchmark, case, provider, bench_device, measure, input_cache,
                           copy_bandwidth, refs, environment, skip_provider):
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
        wall = measure(step)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        skip_provider(provider, f"torch.compile failed here: {str(e).splitlines()[0]}")
    if wall is None:  # --benchmark-disable: the step ran once, as a smoke test
        return
    device = timing.measure_device_time(step, bench_device)
    device_s = None if device["device_us"] is None else device["device_us"] * 1e-6
    refs.record(case, provider, wall, device_s)

    peak, _ = metrics.peak_memory_delta(step, bench_device)
    saved = None
    if case.mode == "forward+backward":
        saved, _ = metrics.saved_tensor_bytes(workload.forward_for_saved_bytes(module, rotation))
    extra = {"rotated_input_sets": len(rotation), "threads": torch.get_num_threads()}
    if provider == "compile":
        extra["compile_backend"] = workload.compile_backend()
    benchmark.extra_info.update(
        metrics.case_record(case, provider, wall, device, refs.for_case(case, REFERENCE_PROVIDERS),
                            copy_bandwidth, peak, saved),
        **extra, **environment)
