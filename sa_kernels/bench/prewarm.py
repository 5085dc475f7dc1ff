"""Compile every ``torch.compile`` case of a run ahead of it, in parallel processes.

torch.compile's first call per shape costs seconds (Dynamo, AOTAutograd, Inductor's code
generation, Triton's compiler), almost all of it single-threaded Python, and a run has dozens
of such cases. Inductor keeps what it generates in on-disk caches (FX graph, AOTAutograd and
Triton caches, shared by every process of the same user), so compiling each case once in one of
several worker processes before the run lets the run's own first call read the result back in
a fraction of a second. The run then measures the same compiled code; only its warm-up is
shorter. A case a worker could not compile (or did not reach before the time limit) is simply
compiled by the run itself.

    python -m sa_kernels.bench.prewarm --device cuda --specs specs.json   # one worker

The benchmarks' conftest calls ``prewarm`` with the run's collected compile cases.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Relative cost of one compile, to spread the work evenly: a whole model's training graph is
# far larger than the SA layer's.
_COST = {("model", "train"): 20, ("model", "inference"): 8,
         ("kernel", "forward+backward"): 2, ("kernel", "forward"): 1}


def spec_cost(spec):
    return _COST.get((spec["kind"], spec["case"]["mode"]), 1)


def spread(specs, jobs):
    """Specs shared among ``jobs`` workers, largest first to the least loaded (no empty lists)."""
    loads = [[0, []] for _ in range(max(1, min(jobs, len(specs))))]
    for spec in sorted(specs, key=spec_cost, reverse=True):
        least = min(loads, key=lambda load: load[0])
        least[0] += spec_cost(spec)
        least[1].append(spec)
    return [load[1] for load in loads if load[1]]


def default_jobs(cpu_count=None):
    """Workers when not told: half the cores, at most 8; 0 (no prewarm) below 4 cores."""
    cpus = cpu_count or os.cpu_count() or 1
    return min(8, cpus // 2) if cpus >= 4 else 0


def run_spec(spec, device):
    """Build the spec's compiled module and run one step (which compiles it, filling the caches)."""
    from . import cases, models, timing, workload
    device = torch.device(device)
    if spec["kind"] == "kernel":
        case = cases.case_from_dict(spec["case"])
        rotation = workload.make_inputs(case, device, 1, workload.case_seed(case.id))
        module = workload.build_module(spec.get("provider", "compile"), case.shape, case.dtype,
                                       device, workload.case_seed(case.id))
        step = workload.make_step(module, case.mode, rotation)
    elif spec["kind"] == "model":
        torch.backends.cudnn.benchmark = True  # as the model benchmarks run: the same compile
        case = models.model_case_from_dict(spec["case"])
        step = models.model_step(case, spec["provider"], device)
    else:
        raise ValueError(f"unknown prewarm spec kind {spec['kind']!r}")
    step()
    timing.synchronize(device)


def worker_main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sa_kernels.bench.prewarm")
    parser.add_argument("--device", required=True)
    parser.add_argument("--specs", required=True, help="a JSON list of specs to compile")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.specs) as f:
        specs = json.load(f)
    failed = 0
    for spec in specs:
        start = time.perf_counter()
        try:
            run_spec(spec, args.device)
            status = "ok"
        except Exception as e:  # noqa: BLE001 - the run compiles this case itself; say why here
            failed += 1
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"prewarm {spec['kind']} {spec.get('provider', 'compile')} "
              f"{json.dumps(spec['case'], sort_keys=True)}: {status} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return 1 if failed else 0


def prewarm(specs, jobs, device, threads=None, timeout_s=300.0, log=print):
    """Compile ``specs`` in ``jobs`` worker processes; returns a summary for the run's JSON.

    Each worker gets ``TORCHINDUCTOR_COMPILE_THREADS`` = its share of the cores, so the
    workers' own Triton compile pools do not oversubscribe the machine. Workers still running
    at ``timeout_s`` are killed (the run compiles their remaining cases itself).
    """
    if not specs or jobs < 1:
        return {"specs": len(specs), "jobs": 0, "seconds": 0.0, "failed_workers": 0}
    start = time.monotonic()
    shares = spread(specs, jobs)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS",
                   str(max(1, (os.cpu_count() or 1) // len(shares))))
    log(f"prewarm: compiling {len(specs)} torch.compile cases in {len(shares)} processes")
    procs = []
    with tempfile.TemporaryDirectory(prefix="sa-prewarm-") as tmp:
        for i, share in enumerate(shares):
            path = Path(tmp) / f"specs-{i}.json"
            path.write_text(json.dumps(share))
            command = [sys.executable, "-m", "sa_kernels.bench.prewarm", "--device", str(device),
                       "--specs", str(path)]
            if threads:
                command += ["--threads", str(threads)]
            out = open(Path(tmp) / f"log-{i}.txt", "w+")
            procs.append((subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT),
                          out))
        failed = killed = 0
        for proc, out in procs:
            remaining = max(0.0, timeout_s - (time.monotonic() - start))
            try:
                code = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                proc.kill()  # only the worker this function started
                proc.wait()
                code, killed = None, killed + 1
            failed += code not in (0, None)
            out.seek(0)
            lines = out.read().splitlines()
            out.close()
            for line in lines:
                if line.startswith("prewarm ") and ": failed: " in line:
                    log(line)
            if code not in (0, 1, None):  # the worker itself crashed: show how
                for line in lines[-20:]:
                    log(f"prewarm worker (exit {code}): {line}")
    seconds = time.monotonic() - start
    log(f"prewarm: done in {seconds:.0f} s ({failed} workers with failures, {killed} stopped "
        f"at the {timeout_s:.0f} s limit)")
    return {"specs": len(specs), "jobs": len(shares), "seconds": round(seconds, 1),
            "failed_workers": failed, "killed_workers": killed, "timeout_s": timeout_s}


if __name__ == "__main__":
    sys.exit(worker_main())
