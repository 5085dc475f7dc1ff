"""The benchmark suite as a whole, on CPU: the model step builders, the compile prewarm, the run
written as it goes (and what a stopped run leaves), the rows' fields, and the GPU session script."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sa_kernels
from sa_kernels import FusedShuffleAttention, ShuffleAttention
from sa_kernels.bench import cases, metrics, models, prewarm, report, runlog
from sa_kernels.models import SAResNet

REPO = Path(sa_kernels.__file__).resolve().parents[1]
NUM_CLASSES = 10
# Added to every row by the benchmark files (the run's environment); the session test below
# checks them on real rows.
ENVIRONMENT_FIELDS = {"device_name", "torch", "triton"}


@pytest.fixture
def one_thread():
    """One intra-op thread: a step of many tiny ops is quick and steady on a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_arch(**kwargs):
    """SA-ResNet with one bottleneck per stage: the model benchmarks' code at a CPU test's size."""
    return SAResNet([1, 1, 1, 1], NUM_CLASSES, **kwargs)


def suite_env(**extra):
    """The environment for a benchmark subprocess: this checkout first, Dynamo alone for compile
    (Inductor's code generation takes minutes here), no Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               SA_KERNELS_BENCH_COMPILE_BACKEND="eager", PYTHONUNBUFFERED="1", **extra)
    return env


# --- model cases and step builders ------------------------------------------------------------

def test_model_sets_cover_training_and_inference_in_both_layouts_and_precisions():
    full = models.select_model_cases("cuda")
    assert {(c.mode, c.batch, c.image) for c in full} == {
        ("train", 64, 224), ("inference", 64, 224), ("inference", 1, 224)}
    assert {(c.layout, c.precision) for c in full} == {
        (layout, precision) for layout in cases.LAYOUTS for precision in models.PRECISIONS}
    assert models.select_model_cases("cuda", shape_set="quick") == list(models.MODEL_CASES["quick"])
    assert models.select_model_cases("cpu") == list(models.MODEL_CASES["cpu"])
    assert models.select_model_cases("cuda", "none") == []
    with pytest.raises(ValueError, match="model set"):
        models.select_model_cases("cuda", "huge")


def test_whole_model_compile_runs_only_on_flagged_cases_with_compile_all():
    providers = models.DEFAULT_MODEL_PROVIDERS["cuda"]
    full = models.select_model_cases("cuda")
    auto = models.model_parametrization(full, providers, "auto")
    assert not [p for _, p in auto if p.startswith("compile")]
    every = models.model_parametrization(full, providers, "all")
    compiled = {(c, p) for c, p in every if p.startswith("compile")}
    assert compiled and all(c.compile for c, _ in compiled)
    assert {p for _, p in compiled} == {"compile", "compile-fused"}
    for case in full:  # the floor first, then the reference, then the fused providers
        order = models.model_providers_for(case, providers, "all")
        assert order[:2] == ["no-sa", "eager"]
    assert models.parse_model_providers("eager,no-sa", "cpu") == ("no-sa", "eager")
    with pytest.raises(ValueError):
        models.parse_model_providers("jax", "cpu")


def test_model_skip_reasons(monkeypatch):
    cpu = torch.device("cpu")
    assert models.model_skip_reason("no-sa", cpu) is None and models.model_skip_reason("eager", cpu) is None
    assert models.model_skip_reason("torch", cpu) is None
    assert "CPU path" in models.model_skip_reason("torch", torch.device("cuda"))
    monkeypatch.setattr(sa_kernels.backends, "BACKENDS", ("cuda", "triton", "torch"))
    assert "no 'cpu' backend" in models.model_skip_reason("cpu", cpu)
    assert models.fused_backend_for(cpu) == "torch"
    with pytest.raises(ValueError):
        models.model_skip_reason("numpy", cpu)


def _sa_layers(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return [m for m in model.modules() if isinstance(m, (ShuffleAttention, FusedShuffleAttention))]


@pytest.mark.parametrize("layout", cases.LAYOUTS)
@pytest.mark.parametrize("provider", ["no-sa", "eager", "torch", "compile", "compile-fused"])
def test_training_step_builder_runs_one_optimiser_step(provider, layout, monkeypatch, one_thread):
    monkeypatch.setenv("SA_KERNELS_BENCH_COMPILE_BACKEND", "eager")
    case = models.ModelCase("train", 2, 64, layout, "float32")
    step = models.model_step(case, provider, "cpu", arch=tiny_arch, num_classes=NUM_CLASSES)
    weight = getattr(step.model, "_orig_mod", step.model).conv1.weight
    before = weight.detach().clone()
    loss = step()
    assert torch.isfinite(loss) and loss.item() > 0
    assert not torch.equal(weight, before)  # the SGD step moved the weights
    assert weight.is_contiguous(memory_format=case.memory_format)
    layers = _sa_layers(step.model)
    if provider == "no-sa":
        assert layers == []
    else:
        assert len(layers) == 4
        fused = provider in ("torch", "compile-fused")
        assert all(isinstance(m, FusedShuffleAttention) == fused for m in layers)
        if fused:
            expected = models.fused_backend_for("cpu") if provider == "compile-fused" else provider
            assert {m.backend for m in layers} == {expected}
    assert hasattr(step.model, "_orig_mod") == provider.startswith("compile")


@pytest.mark.parametrize("precision", list(models.PRECISIONS))
def test_inference_step_builder_runs_eval_forwards_without_grad(precision, one_thread):
    case = models.ModelCase("inference", 2, 64, "channels_last", precision)
    step = models.model_step(case, "eager", "cpu", arch=tiny_arch, num_classes=NUM_CLASSES)
    logits = step()
    assert logits.shape == (2, NUM_CLASSES) and not logits.requires_grad
    assert not step.model.training
    assert logits.dtype == (torch.bfloat16 if precision == "bf16-autocast" else torch.float32)
    with pytest.raises(ValueError, match="model mode"):
        models.model_step(models.ModelCase("backward", 2, 64, "nchw", "float32"), "eager", "cpu",
                          arch=tiny_arch)


def test_model_record_holds_every_row_field_and_the_cost_over_no_sa():
    case = models.ModelCase("train", 64, 224, "channels_last", "bf16-autocast")
    record = models.model_record(case, "cuda", 25e-3, {"device_us": 21e3, "launches": 900.0},
                                 {"no-sa": (20e-3, 18e-3), "eager": (50e-3, 40e-3)}, 3 << 30, "cuda")
    assert set(metrics.ROW_FIELDS) - ENVIRONMENT_FIELDS <= set(record)
    assert record["sa_cost_us_wall"] == pytest.approx(5000.0)
    assert record["speedup_vs_eager_device"] == pytest.approx(40 / 21)
    assert record["images_per_s"] == pytest.approx(64 / 25e-3)
    assert record["shape"] == [64, 3, 224, 224] and record["dtype"] == "bfloat16"


def test_kernel_record_holds_every_row_field():
    case = cases.Case(cases.SEED, torch.float32, "forward")
    record = metrics.case_record(case, "cuda", 100e-6, {"device_us": 8.0, "launches": 1.0},
                                 {"copy": (10e-6, 4e-6)}, 4000.0)
    assert set(metrics.ROW_FIELDS) - ENVIRONMENT_FIELDS <= set(record)
    assert record["pct_copy_device"] == pytest.approx(50.0)
    assert record["x_copy_wall"] == pytest.approx(10.0)


# --- prewarm ----------------------------------------------------------------------------------

def test_prewarm_spreads_the_work_and_needs_cores():
    specs = ([{"kind": "model", "case": {"mode": "train"}}] * 2
             + [{"kind": "kernel", "case": {"mode": "forward"}}] * 10
             + [{"kind": "kernel", "case": {"mode": "forward+backward"}}] * 10)
    shares = prewarm.spread(specs, 4)
    assert len(shares) == 4 and sorted(map(len, shares)) != [0, 0, 0, 22]
    assert sum(map(len, shares)) == len(specs)
    loads = sorted(sum(map(prewarm.spec_cost, share)) for share in shares)
    assert loads[-1] - loads[0] <= 20  # at most one large compile apart
    assert len(prewarm.spread(specs[:2], 8)) == 2  # never an idle worker
    assert prewarm.default_jobs(2) == 0 and prewarm.default_jobs(4) == 2
    assert prewarm.default_jobs(16) == 8 and prewarm.default_jobs(64) == 8
    assert prewarm.prewarm([], 4, "cpu")["jobs"] == 0


def test_prewarm_compiles_its_cases_in_worker_processes(monkeypatch):
    monkeypatch.setenv("SA_KERNELS_BENCH_COMPILE_BACKEND", "eager")
    case = cases.Case(cases.TINY, torch.float32, "forward+backward")
    spec = {"kind": "kernel", "provider": "compile", "case": case.to_dict()}
    prewarm.run_spec(spec, "cpu")  # in this process: builds and runs one compiled step
    bad = dict(spec, case=dict(spec["case"], mode="sideways"))
    lines = []
    # one worker (spread() shares the work among several; each costs a Python start here)
    summary = prewarm.prewarm([spec, bad], 1, "cpu", threads=1, timeout_s=240, log=lines.append)
    assert summary["jobs"] == 1 and summary["killed_workers"] == 0
    assert summary["failed_workers"] == 1  # the bad spec fails and says why; the good one is fine
    assert lines[0].startswith("prewarm: compiling 2") and "done" in lines[-1]
    assert [line for line in lines if ": failed: " in line and "sideways" in line]


# --- the run written as it goes ---------------------------------------------------------------

def test_run_log_rewrites_a_valid_json_after_every_row(tmp_path):
    log = runlog.RunLog(tmp_path / "sub" / "run.json", {"options": {"shapes": "quick"}})
    log.write()
    assert json.loads(log.path.read_text())["benchmarks"] == []
    for i in range(3):
        log.add(runlog.benchmark_row(f"t{i}", f"f::t{i}", "g", {"provider": "copy", "wall_us": 1.0,
                                                                 "ratio": float("nan")},
                                     {"median": 1e-6, "rounds": 5}))
        data = json.loads(log.path.read_text())  # strict JSON: NaN written as null
        assert len(data["benchmarks"]) == i + 1 and data["sa_kernels"]["complete"] is False
    assert data["benchmarks"][0]["extra_info"]["ratio"] is None
    log.write(complete=True)
    assert json.loads(log.path.read_text())["sa_kernels"]["complete"] is True
    assert [p.name for p in log.path.parent.iterdir()] == ["run.json"]  # no temporary left


def test_progress_lines_name_the_case_and_both_times():
    info = {"case": "seed 64x256x8x8 G8", "dtype": "float32", "layout": "nchw",
            "mode": "forward", "provider": "cuda", "wall_us": 101.0, "device_us": 8.0,
            "pct_copy_device": 40.0, "launches": 1.0}
    line = runlog.progress_line(3, 200, 12.0, info)
    assert line.startswith("[   3/200      12 s] seed 64x256x8x8 G8 float32 nchw forward | cuda")
    assert "wall 101 us" in line and "device 8.0 us" in line and "40% copy (device)" in line
    model = {"kind": "model", "case": "sa_resnet50 train b64 224x224", "layout": "channels_last",
             "precision": "bf16-autocast", "provider": "eager", "wall_us": 55800.0,
             "device_us": None, "images_per_s": 1147.0}
    assert "wall 55.80 ms | device - | 1147 images/s" in runlog.progress_line(1, 2, 1.0, model)


def _suite_command(json_path, *args):
    return [sys.executable, "-m", "pytest", "benchmarks/test_bench_shuffle_attention.py",
            "--benchmark-only", "-p", "no:cacheprovider", f"--sa-json={json_path}",
            "--sa-shapes", "quick", "--sa-seconds", "0.01", "--sa-threads", "1", "--sa-prewarm",
            "0", *args]


def test_a_stopped_run_leaves_a_valid_json_of_the_cases_it_finished(tmp_path):
    path = tmp_path / "run.json"
    proc = subprocess.Popen(_suite_command(path, "-k", "tiny"), cwd=REPO, env=suite_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        rows = 0
        while rows < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if path.exists():
                rows = len(json.loads(path.read_text())["benchmarks"])  # valid at every moment
        assert rows >= 2, proc.communicate()[0] if proc.poll() is not None else "no rows in time"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # no clean-up at all: the harshest stop
        output = proc.communicate()[0]
    data = json.loads(path.read_text())
    assert data["sa_kernels"]["complete"] is False, output
    assert len(data["benchmarks"]) >= 2
    assert "- **incomplete run**" in report.format_report(data)
    assert len(report.rows_from_json(data)) == len(data["benchmarks"])


@pytest.mark.parametrize("option,value,message", [
    ("--sa-seconds", "0", "--sa-seconds must be more than 0, got 0.0"),
    ("--sa-seconds", "-1", "--sa-seconds must be more than 0, got -1.0"),
    ("--sa-prewarm", "-3", "--sa-prewarm must be 0 or more, got -3"),
    ("--sa-threads", "0", "--sa-threads must be at least 1, got 0"),
])
def test_nonsensical_options_are_refused(tmp_path, option, value, message):
    command = [c for c in _suite_command(tmp_path / "run.json", "-k", "tiny") if c != option]
    result = subprocess.run(command + [option, value], cwd=REPO, env=suite_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 4 and message in result.stderr + result.stdout


def test_the_wrapper_reports_its_run_without_a_hint_at_a_file_it_renames(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "sa_kernels.bench", "--out", str(out), "--no-plot",
                             "--", "-k", "tiny and forward-copy", "-p", "no:cacheprovider",
                             "--sa-seconds", "0.01", "--sa-prewarm", "0"],
                            cwd=REPO, env=suite_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sa-kernels: 1 cases in" in result.stdout and "report it with" not in result.stdout
    assert [p.suffix for p in sorted(out.iterdir())] == [".json", ".md"]


# --- the GPU session script -------------------------------------------------------------------

def _session(tmp_path, *stages, **env):
    return subprocess.run(["bash", "benchmarks/gpu_session.sh", *stages], cwd=REPO,
                          env=suite_env(OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=600)


def test_gpu_session_dry_run_plans_every_stage_within_the_session(tmp_path):
    result = _session(tmp_path, SESSION_DRY_RUN="1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    stages = [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("== ")]
    assert stages == ["info", "build", "test", "bench-kernels", "bench-models", "sanitize",
                      "bench-model-compile", "report"]
    limits = [int(line.split("limit ")[1].split("s")[0]) for line in out.splitlines()
              if line.startswith("  would run")]
    # The dry run plays every stage to its limit: even then the whole fits the session, each
    # required stage still runs, and only the optional one (whole-model compile) may drop out.
    assert sum(limits) <= 510
    assert [line for line in out.splitlines() if "not run" in line] in (
        [], ["== bench-model-compile: not run (no time left)"])
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"compute-sanitizer --tool {tool}" in out
    assert "pytest tests/test_cuda.py tests/test_triton.py" in out and "-n 12" in out
    # Chosen stages run in the order given, each with its whole budget when time allows
    some = _session(tmp_path, "bench-model-compile", "report", SESSION_DRY_RUN="1")
    assert some.returncode == 0
    assert "== bench-model-compile (limit 200s)" in some.stdout
    assert "--sa-compile all -k compile" in some.stdout
    # Issue 10's CPU targets on the lent machine's idle CPU, only when asked for, with its own report
    assert "bench-cpu" not in result.stdout
    cpu = _session(tmp_path, "bench-cpu", SESSION_DRY_RUN="1")
    assert "env CUDA_VISIBLE_DEVICES= " in cpu.stdout and "--sa-shapes cpu --sa-threads 1" in cpu.stdout
    assert "sa_kernels.bench --json" in cpu.stdout and cpu.returncode == 0
    # A session too short for a required stage says so and fails
    short = _session(tmp_path, SESSION_DRY_RUN="1", SESSION_SECONDS="200")
    assert "not run (no time left)" in short.stdout and short.returncode == 1
    assert _session(tmp_path, "bogus", SESSION_DRY_RUN="1").returncode == 2


def test_gpu_session_runs_benchmark_stages_and_returns_few_files(tmp_path):
    """The real stages that run on a CPU, at a smoke-test size: what comes back from a device call."""
    result = _session(
        tmp_path, "bench-kernels", "bench-models", "report", SESSION_SECONDS="400",
        BENCH_KERNEL_ARGS="--sa-shapes quick -k tiny-float32-nchw-forward- --sa-seconds 0.01 "
                          "--sa-threads 1 --sa-prewarm 0",
        BENCH_MODEL_ARGS="-k channels_last-float32-no-sa --sa-seconds 0.01 --sa-threads 1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(f.count("/") <= 2 for f in files)
    stems = {f.rsplit(".", 1)[0] for f in files if f.endswith((".json", ".md", ".png"))}
    assert len(stems) == 1 and {"summary.txt", "logs.tgz"} <= set(files)
    stem = stems.pop()
    data = json.loads((out / f"{stem}.json").read_text())
    kinds = {b["extra_info"]["kind"] for b in data["benchmarks"]}
    assert kinds == {"kernel", "model"}
    for bench in data["benchmarks"]:
        missing = set(metrics.ROW_FIELDS) - set(bench["extra_info"])
        assert not missing, (bench["name"], missing)
    summary = (out / "summary.txt").read_text()
    assert "== bench-kernels: exit 0" in summary and "## End to end: SA-ResNet-50" in summary
