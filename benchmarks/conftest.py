"""Fixtures every benchmark file shares: device, timing, input rotation, copy bandwidth, environment.

A benchmark file (see test_bench_shuffle_attention.py) uses them like this::

    def test_something(benchmark, bench_device, measure, input_cache, copy_bandwidth, environment):
        rotation = input_cache.get(key, build_inputs)   # one case's rotated inputs, reused
        median = measure(step)                          # warm-up, then device-timed rounds
        benchmark.extra_info.update(...)                # what the report reads

Without a GPU the benchmarks run on CPU tensors. This conftest never sets
TRITON_INTERPRET (tests/conftest.py does, for the tests only); the Triton
provider is skipped with a reason whenever it would run in the interpreter.
A run's JSON (``--benchmark-json``) gains an ``sa_kernels`` section: the
environment, the measured copy bandwidth and the skipped providers with why.
"""
import pytest
import torch

from sa_kernels.bench import cases
from sa_kernels.bench import environment as environment_info
from sa_kernels.bench import timing

_RUN_INFO = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("sa-kernels", "sa-kernels benchmarks")
    group.addoption("--sa-shapes", choices=cases.SHAPE_SETS, default="auto",
                    help="shape set: auto (full on a GPU, quick on CPU), quick or full")
    group.addoption("--sa-seconds", type=float, default=None,
                    help="measured seconds per case, warm-up excluded "
                         f"(default {timing.DEFAULT_BUDGET_S['cuda']} on a GPU, "
                         f"{timing.DEFAULT_BUDGET_S['cpu']} on CPU)")


def pytest_configure(config):
    config.stash[_RUN_INFO] = {"skipped": {}}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["sa_kernels"] = config.stash[_RUN_INFO]


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def environment(bench_device, pytestconfig):
    """Device name, torch/triton/CUDA versions, date; also written to the JSON."""
    info = environment_info.environment_info(bench_device)
    pytestconfig.stash[_RUN_INFO]["environment"] = info
    return info


@pytest.fixture(scope="session")
def copy_bandwidth(bench_device, pytestconfig):
    """The device-to-device copy bandwidth measured in this run (GB/s, read + write bytes)."""
    result = timing.measure_copy_bandwidth(bench_device)
    pytestconfig.stash[_RUN_INFO]["copy_bandwidth"] = result
    return result["gbps"]


@pytest.fixture(scope="session")
def medians():
    """Medians measured so far in this session, per case and provider (for speedups)."""
    return {}


class InputCache:
    """Holds the rotated inputs of one case at a time, so all providers of a case share them."""

    def __init__(self):
        self._key, self._value = None, None

    def get(self, key, build):
        if key != self._key:
            self._key, self._value = None, None  # free the previous case's buffers first
            self._value, self._key = build(), key
        return self._value


@pytest.fixture(scope="session")
def input_cache():
    return InputCache()


@pytest.fixture
def measure(benchmark, bench_device, pytestconfig):
    """``measure(step) -> median seconds``: warm-up, then pedantic rounds timed on the device."""
    budget = pytestconfig.getoption("--sa-seconds")

    def run(step):
        return timing.run_benchmark(benchmark, step, bench_device, budget)
    return run


@pytest.fixture
def skip_provider(pytestconfig):
    """``skip_provider(provider, reason)``: skip this test, and keep the reason for the report."""
    def skip(provider, reason):
        pytestconfig.stash[_RUN_INFO]["skipped"][provider] = reason
        pytest.skip(f"{provider}: {reason}")
    return skip
