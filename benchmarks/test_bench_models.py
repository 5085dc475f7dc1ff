"""End to end: an SA-ResNet-50 training step and inference forward per way of running its SA layers.

    pytest benchmarks/test_bench_models.py --benchmark-only
    pytest benchmarks/test_bench_models.py --benchmark-only --sa-compile all   # + whole-model compile

Each row holds the wall time per step (steps back to back), the device time (the profiler's
kernels, memsets and copies), images per second, the step's peak memory, and SA's cost over
the same network without SA. Cases and providers live in ``sa_kernels.bench.models``.
"""
import pytest
import torch

from sa_kernels.bench import metrics, models, timing

# Warm-up steps before timing: the first runs cuDNN's algorithm search (cudnn.benchmark).
WARMUP_STEPS = 2
# A model step lasts milliseconds and barely varies: few steps give its time, and the suite
# has 48 model rows on a GPU to fit in its minutes.
ESTIMATE_STEPS = 2
MIN_ROUNDS = 5
PROFILED_STEPS = 2
# A round lasts at least this long, so short (inference, batch 1) steps run back to back.
MIN_ROUND_S = 20e-3


def pytest_generate_tests(metafunc):
    if {"model_case", "provider"} <= set(metafunc.fixturenames):
        config = metafunc.config
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        selected = models.select_model_cases(device_type, config.getoption("--sa-models"),
                                             config.getoption("--sa-shapes"))
        providers = models.parse_model_providers(config.getoption("--sa-model-providers"),
                                                 device_type)
        pairs = models.model_parametrization(selected, providers, config.getoption("--sa-compile"))
        metafunc.parametrize(("model_case", "provider"), pairs,
                             ids=[f"{case.id}-{provider}" for case, provider in pairs])


@pytest.fixture(scope="module", autouse=True)
def cudnn_benchmark():
    """cuDNN picks its fastest convolution algorithms (as training scripts ask), for this file only."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = previous


def test_sa_resnet50(benchmark, model_case, provider, bench_device, measure, refs, environment,
                     skip_provider):
    reason = models.model_skip_reason(provider, bench_device)
    if reason is not None:
        skip_provider(provider, reason)
    step = models.model_step(model_case, provider, bench_device)
    benchmark.group = model_case.id
    try:
        wall = measure(step, warmup_calls=WARMUP_STEPS, min_round_s=MIN_ROUND_S,
                       min_rounds=MIN_ROUNDS, estimate_calls=ESTIMATE_STEPS)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        skip_provider(provider, f"torch.compile failed here: {str(e).splitlines()[0]}")
    if wall is None:  # --benchmark-disable: one smoke step
        return
    device = timing.measure_device_time(step, bench_device, calls=PROFILED_STEPS)
    device_s = None if device["device_us"] is None else device["device_us"] * 1e-6
    refs.record(model_case, provider, wall, device_s)
    peak, _ = metrics.peak_memory_delta(step, bench_device)
    benchmark.extra_info.update(
        models.model_record(model_case, provider, wall, device,
                            refs.for_case(model_case, ("no-sa", "eager")), peak,
                            models.sa_backend_of(provider, bench_device)),
        threads=torch.get_num_threads(), cudnn_benchmark=torch.backends.cudnn.benchmark,
        tf32_conv=torch.backends.cudnn.allow_tf32, **environment)
