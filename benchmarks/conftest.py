"""Options, fixtures and hooks every benchmark file shares.

A benchmark file (see test_bench_shuffle_attention.py) uses them like this::

    def test_something(benchmark, bench_device, measure, environment, refs, skip_provider):
        wall = measure(step)                                   # warm-up, then wall-time rounds
        device = timing.measure_device_time(step, bench_device)  # the profiler's device time
        benchmark.extra_info.update(...)                       # what the report reads

Without a GPU the benchmarks run on CPU tensors. This conftest never sets
TRITON_INTERPRET (tests/conftest.py does, for the tests only); the Triton
provider is skipped with a reason whenever it would run in the interpreter.

The run is written as it goes: after every finished case the JSON at ``--sa-json``
(default ``.benchmarks/sa_kernels/last-run.json``) is replaced by one holding every
case so far, so a run stopped part-way keeps what it measured; a line per case shows
the progress. A pytest-benchmark JSON (``--benchmark-json``) gains the same
``sa_kernels`` section: environment, copy bandwidth, skipped providers, options.
"""
import os

import pytest
import torch

from sa_kernels.bench import cases, metrics, models, prewarm, runlog, timing
from sa_kernels.bench import environment as environment_info

_RUN_LOG = pytest.StashKey[runlog.RunLog]()
_PROGRESS = pytest.StashKey[dict]()
DEFAULT_RUN_JSON = os.path.join(".benchmarks", "sa_kernels", "last-run.json")
WRAPPED_ENV = "SA_KERNELS_BENCH_WRAPPED"  # set by python -m sa_kernels.bench, which reports the run itself


def pytest_addoption(parser):
    group = parser.getgroup("sa-kernels", "sa-kernels benchmarks")
    group.addoption("--sa-shapes", choices=cases.SHAPE_SETS, default="auto",
                    help="kernel shape set: auto (full on a GPU, quick on CPU), quick, full, "
                         "or cpu (issue 10's CPU targets)")
    group.addoption("--sa-providers", default="auto",
                    help="comma-separated kernel providers (default: the device's own, "
                         f"{dict(cases.DEFAULT_PROVIDERS)}); any of {cases.PROVIDERS}")
    group.addoption("--sa-compile", choices=cases.COMPILE_CHOICES, default="auto",
                    help="torch.compile cases: auto (every kernel case, no whole-model "
                         "compile), all (also the whole model on its flagged cases: minutes "
                         "of compilation), none")
    group.addoption("--sa-models", choices=models.MODEL_SETS, default="auto",
                    help="end-to-end model cases: auto (full on a GPU, quick with "
                         "--sa-shapes quick, cpu on a CPU), quick, full, cpu, none")
    group.addoption("--sa-model-providers", default="auto",
                    help=f"comma-separated model providers; any of {models.MODEL_PROVIDERS}")
    group.addoption("--sa-seconds", type=float, default=None,
                    help="measured wall-time seconds per case, warm-up excluded "
                         f"(default {timing.DEFAULT_BUDGET_S['cuda']} on a GPU, "
                         f"{timing.DEFAULT_BUDGET_S['cpu']} on CPU)")
    group.addoption("--sa-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's default); the "
                         "report states the count")
    group.addoption("--sa-json", default=DEFAULT_RUN_JSON,
                    help="the JSON rewritten after every finished case "
                         f"(default {DEFAULT_RUN_JSON})")
    group.addoption("--sa-prewarm", type=int, default=None,
                    help="processes that compile the run's torch.compile cases before it, "
                         "filling Inductor's on-disk caches (default: half the cores, at most "
                         "8; none below 4 cores); 0 compiles each case in the run itself")


def bench_device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    threads = config.getoption("--sa-threads")
    if threads is not None and threads < 1:
        raise pytest.UsageError(f"--sa-threads must be at least 1, got {threads}")
    seconds = config.getoption("--sa-seconds")
    if seconds is not None and not seconds > 0:
        raise pytest.UsageError(f"--sa-seconds must be more than 0, got {seconds}")
    jobs = config.getoption("--sa-prewarm")
    if jobs is not None and jobs < 0:
        raise pytest.UsageError(f"--sa-prewarm must be 0 or more, got {jobs}")
    if threads is not None:
        torch.set_num_threads(threads)
    device_type = bench_device_type()
    try:
        providers = cases.parse_providers(config.getoption("--sa-providers"), device_type)
        model_providers = models.parse_model_providers(
            config.getoption("--sa-model-providers"), device_type)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    shape_set = cases.resolve_shape_set(device_type, config.getoption("--sa-shapes"))
    info = {
        "skipped": {},
        "options": {
            "shapes": shape_set,
            "providers": list(providers),
            "compile": config.getoption("--sa-compile"),
            "compile_backend": os.environ.get("SA_KERNELS_BENCH_COMPILE_BACKEND") or "inductor",
            "models": models.resolve_model_set(device_type, config.getoption("--sa-models"),
                                               config.getoption("--sa-shapes")),
            "model_providers": list(model_providers),
            "seconds": config.getoption("--sa-seconds"),
            "threads": torch.get_num_threads(),
            "threads_option": threads,
            "profiled_calls": timing.PROFILED_CALLS,
        },
    }
    config.stash[_RUN_LOG] = runlog.RunLog(config.getoption("--sa-json"), info)
    if config.option.verbose == 0:
        # Quiet pytest's own progress: the suite prints a line per case, and at the default
        # verbosity pytest would repeat the file's name before each of them.
        config.option.verbose = -1
    config.stash[_PROGRESS] = {"total": 0, "done": 0, "skip_reasons": set()}


def _benchmarks_enabled(config):
    return not (config.getoption("collectonly") or config.getoption("benchmark_disable", False))


def pytest_collection_modifyitems(session, config, items):
    """The SA layer's cases first, then the models (a run stopped early keeps the kernel table)."""
    items.sort(key=lambda item: "test_bench_shuffle_attention" not in item.nodeid)


def _compile_spec(item):
    """A prewarm spec for a collected compile case (``None`` for anything else)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    provider = params.get("provider")
    if "case" in params and provider == "compile":
        return {"kind": "kernel", "provider": provider, "case": params["case"].to_dict()}
    if "model_case" in params and provider in ("compile", "compile-fused"):
        return {"kind": "model", "provider": provider, "case": params["model_case"].to_dict()}
    return None


def pytest_collection_finish(session):
    config = session.config
    progress = config.stash[_PROGRESS]
    progress["total"] = sum(1 for item in session.items if "benchmark" in item.fixturenames)
    if not _benchmarks_enabled(config) or not progress["total"]:
        return
    log = config.stash[_RUN_LOG]
    log.write()  # a valid (empty) JSON from the start
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter else print
    say(f"sa-kernels: {progress['total']} benchmark cases; results written as they finish "
        f"to {log.path}")
    if torch._dynamo.is_dynamo_supported():
        specs = [s for s in map(_compile_spec, session.items) if s is not None]
        jobs = config.getoption("--sa-prewarm")
        jobs = prewarm.default_jobs() if jobs is None else jobs
        if len(specs) > 1 and jobs > 0:
            log.info["prewarm"] = prewarm.prewarm(
                specs, jobs, bench_device_type(), config.getoption("--sa-threads"), log=say)
            log.write()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    config = item.config
    if "benchmark" not in item.fixturenames or not _benchmarks_enabled(config):
        return
    finished = call.when == "call" or (call.when == "setup" and report.skipped)
    if not finished:
        return
    progress, log = config.stash[_PROGRESS], config.stash[_RUN_LOG]
    progress["done"] += 1
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    line = None
    bench = item.funcargs.get("benchmark") if call.when == "call" else None
    stats = getattr(bench, "stats", None)
    if report.passed and stats is not None and "provider" in bench.extra_info:
        log.add(runlog.benchmark_row(item.name, item.nodeid, bench.group, bench.extra_info,
                                     stats.stats, getattr(stats, "iterations", None)))
        line = runlog.progress_line(progress["done"], progress["total"], log.elapsed_s,
                                    bench.extra_info)
    elif report.skipped:
        log.write()  # the skip's reason is in the run's section now
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason not in progress["skip_reasons"]:  # each reason once; all are in the JSON
            progress["skip_reasons"].add(reason)
            line = runlog.skip_line(progress["done"], progress["total"], log.elapsed_s,
                                    item.name, reason.removeprefix("Skipped: "))
    elif report.failed:
        line = (f"[{progress['done']:>4}/{progress['total']:<4} {log.elapsed_s:6.0f} s] "
                f"{item.name}: FAILED")
    if line and reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(line)


def pytest_sessionfinish(session):
    config = session.config
    log = config.stash.get(_RUN_LOG, None)
    if log is None or not _benchmarks_enabled(config) or not config.stash[_PROGRESS]["total"]:
        return
    if "launch_us" in log.info:
        log.info["launch_us"]["end"] = timing.launch_cost_us("cuda")
    log.write(complete=True)


def pytest_terminal_summary(terminalreporter, config):
    log = config.stash.get(_RUN_LOG, None)
    if log is not None and log.rows:
        # Under python -m sa_kernels.bench the file is renamed and reported next: no hint then.
        hint = ("" if os.environ.get(WRAPPED_ENV) else
                f"; report it with python -m sa_kernels.bench --json {log.path}")
        terminalreporter.write_line(f"sa-kernels: {len(log.rows)} cases in {log.path} "
                                    f"({log.elapsed_s:.0f} s){hint}")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["sa_kernels"] = config.stash[_RUN_LOG].data(complete=True)["sa_kernels"]


@pytest.fixture(scope="session")
def run_info(pytestconfig):
    """The run's ``sa_kernels`` section (environment, copy bandwidth, skips, options)."""
    return pytestconfig.stash[_RUN_LOG].info


@pytest.fixture(scope="session")
def bench_device():
    return torch.device(bench_device_type())


@pytest.fixture(scope="session")
def environment(bench_device, run_info):
    """Device name, torch/triton/CUDA versions, date, threads; written to the JSON and every row."""
    info = environment_info.environment_info(bench_device)
    run_info["environment"] = info
    # The host's cost of one launch now and at the end: a growth would mean the run's
    # host-bound wall times grew with it (a profiler left attached, say).
    if bench_device.type == "cuda":
        run_info["launch_us"] = {"start": timing.launch_cost_us(bench_device)}
    return info


@pytest.fixture(scope="session")
def copy_bandwidth(bench_device, run_info):
    """A large device-to-device copy's bandwidth in this run (GB/s, read + write bytes)."""
    result = timing.measure_copy_bandwidth(bench_device)
    run_info["copy_bandwidth"] = result
    return result["gbps"]


@pytest.fixture(scope="session")
def refs():
    """Times measured so far in this session, for each row's ratios."""
    return metrics.References()


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
    """``measure(step, **kw) -> wall seconds per call``: warm-up, then wall-time rounds."""
    budget = pytestconfig.getoption("--sa-seconds")

    def run(step, **kwargs):
        kwargs.setdefault("budget_s", budget)
        return timing.run_benchmark(benchmark, step, bench_device, **kwargs)
    return run


@pytest.fixture
def skip_provider(run_info):
    """``skip_provider(provider, reason)``: skip this test, and keep the reason for the report."""
    def skip(provider, reason):
        run_info["skipped"].setdefault(provider, [])
        if reason not in run_info["skipped"][provider]:
            run_info["skipped"][provider].append(reason)
        pytest.skip(f"{provider}: {reason}")
    return skip
