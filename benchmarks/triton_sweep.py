"""Sweep the Triton kernels' launch choices on a GPU and print the best per case as a
``launch_config.TUNED`` table (issue 12, lead 2).

    python benchmarks/triton_sweep.py --dry-run          # the plan: cases, variants (any machine)
    python benchmarks/triton_sweep.py [--out DIR]        # on a GPU: about 2-3 minutes

For every case (the benchmark suite's shapes, NCHW and channels_last, float32 and
bfloat16) and mode (forward; backward, i.e. what a training step adds), each variant
is a set of forced plan fields (``launch_config.override``): the heuristic's plan,
then one change at a time (block_j, num_warps, one sweep vs two, chunk size, slices
and waves of split planes, the stride-divisibility hint, the parameter-gradient
reduction's rows per program).
Device time is the sum of the durations of every kernel a call ran (torch.profiler,
CUDA activity), averaged over ``--calls`` calls, with inputs rotated past the L2; a
device-to-device ``copy_`` of the same tensor is timed in the same profile. A fill
kernel between variants separates them in the profile.

Before timing, ``--jobs`` worker processes compile every variant into Triton's disk
cache (each runs the variants of its shard once). ``--host`` (on by default) adds the
host cost per call (back-to-back calls, no synchronisation, wall time) of the triton
and, when built, cuda backends on the seed case.

Each variant's outputs (on one input set) are compared with the heuristic plan's: one
that differs by more than rounding is reported and kept out of the TUNED entries.
Writes ``$OUT/triton_sweep.json`` (or ``--out``) after every case, so a run cut short
keeps what it measured, and starts no case ``--max-seconds`` after compiling; prints
one line per case and, last, the TUNED entries whose best variant beat the heuristic's
plan by more than ``--min-gain``.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sa_kernels.bench.cases import LARGE, NECK, SEED, STAGES, Shape  # noqa: E402
from sa_kernels.bench.timing import cache_bytes, rotation_count  # noqa: E402
from sa_kernels.triton import launch_config  # noqa: E402

MODES = ("forward", "backward")
FULL_SHAPES = (SEED, *STAGES, NECK, LARGE)  # the benchmark suite's GPU shapes
_BY_NAME = {s.name: s for s in FULL_SHAPES}
# (shape, dtype, channels_last): the benchmark suite's cases, plus channels_last at batch 8
# and 1 (few programs: split planes) and the SA-ResNet-50 stages a channels_last model runs.
CASES = (
    [(s, dt, False) for s in FULL_SHAPES for dt in ("float32", "bfloat16")]
    + [(_BY_NAME["large-plane"], dt, True) for dt in ("float32", "bfloat16")]
    + [(Shape("large-plane-b1", 1, 64, 256, 256, 8), "float32", True),
       (_BY_NAME["yolo-neck"], "float32", True),
       (_BY_NAME["resnet50-s1"], "bfloat16", True),
       (_BY_NAME["resnet50-s4"], "bfloat16", True)])


def case_id(shape, dtype, channels_last):
    return f"{shape.name}-{dtype}-{'cl' if channels_last else 'nchw'}"


def _elem_size(dtype):
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def plan_args(shape, dtype, channels_last, mode):
    """launch_config.plan_planes's arguments for a case and mode."""
    b, c, h, w = shape.batch, shape.channels, shape.height, shape.width
    return (b, c // 2, h * w, _elem_size(dtype), False, channels_last, 1 if mode == "forward" else 2)


def _plan(args, fields, limits=None):
    with launch_config.override(limits=limits, **fields):
        return launch_config.plan_planes(*args)


def variants(shape, dtype, channels_last, mode):
    """[(name, plan fields, limits fields)] to time for a case and mode; the first is the
    heuristic's plan. Each variant differs from it in one choice; invalid ones are dropped."""
    args = plan_args(shape, dtype, channels_last, mode)
    base = _plan(args, {})
    max_j = launch_config.next_pow2(args[1])
    hw_block = launch_config.next_pow2(args[2])
    vpe = args[6]
    out = [("default", {}, {})]

    def add(fields, limits=None):
        name = ",".join(f"{k}={v}" for k, v in sorted({**fields, **(limits or {})}.items()))
        try:
            _plan(args, fields, limits)
        except ValueError:
            return
        if name not in [n for n, _, _ in out]:
            out.append((name, fields, limits or {}))

    keep = {"block_j": base.block_j}
    if base.splits > 1:
        keep["splits"] = base.splits
        add({"splits": 1, "block_j": base.block_j})  # the unsplit path, for comparison
        for splits in (base.splits // 2, base.splits * 2):
            if splits > 1:
                add({"block_j": base.block_j, "splits": splits})
        read_bytes = args[0] * 2 * args[1] * args[2] * args[3] * vpe
        for waves in sorted({2} | {-(-read_bytes // (mb << 20)) for mb in (16, 32)}):
            if 1 < waves <= base.grid[0] // base.splits:  # launch pairs of about 16 / 32 MB
                add({**keep, "waves": waves})
        add({**keep, "block_hw": base.block_hw * 2})
        add({**keep, "block_hw": base.block_hw // 2})
    elif base.chunked:
        add({**keep, "chunked": True, "block_hw": base.block_hw * 2})
        add({**keep, "chunked": True, "block_hw": base.block_hw // 2})
        if 2 * base.block_j * hw_block * vpe <= 65536:
            add({**keep, "chunked": False})
    else:
        for bj in (base.block_j // 2, base.block_j * 2):
            if 1 <= bj <= max_j:
                add({"block_j": bj})
        if hw_block >= 2048:  # two sweeps in smaller chunks instead of the whole plane held
            add({**keep, "chunked": True, "block_hw": hw_block // 4})
    for nw in (base.num_warps // 4, base.num_warps // 2, base.num_warps * 2):
        if 1 <= nw <= 16:
            add({**keep, **({"splits": base.splits} if base.splits > 1 else {}),
                 **({"chunked": base.chunked, "block_hw": base.block_hw} if base.chunked else {}),
                 "num_warps": nw})
    if not channels_last and args[2] % 16 and args[2] % 2 == 0:
        add({"vec": 1})  # without the stride-divisibility hint (14x14: scalar accesses)
    rows = shape.batch * shape.groups
    if mode == "backward" and rows > 1:  # the parameter-gradient reduction (split rows aside)
        default = launch_config.plan_param_grads(rows, shape.channels // (2 * shape.groups))
        for chunk in sorted({max(1, rows // 64), max(1, rows // 16), max(1, rows // 4)}):
            if default.final is None or chunk != default.rows_per_chunk:
                add({}, {"reduce_rows": chunk, "reduce_single_rows": 0})  # two stages
        if default.final is not None:
            add({}, {"reduce_single_rows": 1 << 30})  # one program per parameter block
    return out


def sweep_plan(case_filter=None):
    """Every (case id, case, mode, variants) the sweep times."""
    plan = []
    for shape, dtype, cl in CASES:
        cid = case_id(shape, dtype, cl)
        if case_filter and not any(f in cid for f in case_filter):
            continue
        for mode in MODES:
            plan.append((cid, (shape, dtype, cl), mode, variants(shape, dtype, cl, mode)))
    return plan


def tuned_entries(results, min_gain):
    """TUNED lines: the best variant of each (case, mode) that beat the default by min_gain."""
    lines = []
    for r in results:
        timed = [v for v in r["variants"] if v.get("device_us")]
        default = next((v for v in timed if v["name"] == "default"), None)
        if default is None or not timed:
            continue
        best = min(timed, key=lambda v: v["device_us"])
        if not best["fields"] or best["device_us"] > default["device_us"] * (1 - min_gain):
            continue
        key = launch_config.tune_key(*r["plan_args"])
        fields = {k: v for k, v in sorted(best["fields"].items())}
        lines.append(f"    {key!r}: {fields!r},  # {r['case']} {r['mode']}: {best['device_us']:.1f} us"
                     f" against the heuristic's {default['device_us']:.1f} us")
    return lines


# ---------------------------------------------------------------------------------------------
# On the GPU

def _inputs(shape, dtype, cl, device, seed=0, count=None):
    """Rotated inputs past the L2 (or ``count`` sets): [(x, dy, mean, rstd)], the parameters.
    The statistics come from the torch backend (same format), so no Triton kernel compiles here."""
    from sa_kernels.backends import torch_math
    g = torch.Generator(device=device).manual_seed(seed)
    dims = (shape.batch, shape.channels, shape.height, shape.width)
    half = shape.channels // (2 * shape.groups)
    params = [torch.randn(half, device=device, generator=g) * 0.8 + 0.2 for _ in range(6)]
    fmt = torch.channels_last if cl else torch.contiguous_format
    nbytes = shape.batch * shape.channels * shape.height * shape.width * _elem_size(dtype)
    sets = []
    for _ in range(count or rotation_count(4 * nbytes, cache_bytes(device))):  # x, dy, out, dx
        x = torch.randn(dims, device=device, generator=g).to(getattr(torch, dtype), memory_format=fmt)
        dy = torch.randn(dims, device=device, generator=g).to(getattr(torch, dtype), memory_format=fmt)
        _, mean, rstd = torch_math.forward(x, *params, shape.groups, 1e-5)
        sets.append((x, dy, mean, rstd))
    return sets, params, nbytes


def _call(mode, sets, params, groups):
    from sa_kernels.backends import triton_kernels
    state = {"i": 0}

    def run():
        x, dy, mean, rstd = sets[state["i"] % len(sets)]
        state["i"] += 1
        if mode == "forward":
            triton_kernels.forward(x, *params, groups, 1e-5)
        else:
            triton_kernels.backward(dy, x, *params, mean, rstd, groups, 1e-5)
    return run


def _device_kernels(functions):
    """The CUDA kernel events, in device order, of running each function once."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for fn in functions:
            fn()
        torch.cuda.synchronize()
    return sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                  key=lambda e: e.time_range.start)


def split_at_markers(events, count, marker="FillFunctor"):
    """The kernel events between consecutive marker kernels: ``count`` lists, or None."""
    parts, current = [], None
    for e in events:
        if marker in e.name:
            if current is not None:
                parts.append(current)
            current = []
        elif current is not None:
            current.append(e)
    return parts if len(parts) == count else None


def _profile(segments, calls):
    """{name: (device µs, kernels) per call} for [(name, fn making ``calls`` calls)]: one
    profile, the segments separated by fill kernels; one profile per segment if that split
    does not come out."""
    marker = torch.zeros(1, device="cuda")
    fill = lambda: marker.fill_(1.0)  # noqa: E731
    runs = [f for _, fn in segments for f in (fill, fn)] + [fill]
    parts = split_at_markers(_device_kernels(runs), len(segments))
    if parts is None:
        print("the fill markers did not split the profile: profiling each segment on its own",
              flush=True)
        parts = [_device_kernels([fn]) for _, fn in segments]
    return {name: (sum(e.time_range.elapsed_us() for e in part) / calls, len(part) / calls)
            for (name, _), part in zip(segments, parts)}


def _time_case(shape, dtype, cl, mode, vs, calls):
    """({segment: (device µs, kernels) per call}, {variant: largest difference from the
    heuristic's outputs, relative to their largest magnitude}, input bytes)."""
    sets, params, nbytes = _inputs(shape, dtype, cl, "cuda")
    copy_dst = torch.empty_like(sets[0][0])
    state = {"i": 0}

    def copy():
        copy_dst.copy_(sets[state["i"] % len(sets)][0])
        state["i"] += 1
    checks = check_variants(mode, sets[0], params, shape.groups, vs)  # also loads the kernels
    segments = [("copy", copy)] + [
        (name, _with_variant(_call(mode, sets, params, shape.groups), fields, limits))
        for name, fields, limits in vs]
    repeated = [(name, _repeat(fn, calls)) for name, fn in segments]
    torch.cuda.synchronize()
    return _profile(repeated, calls), checks, nbytes


def _repeat(fn, calls):
    def run():
        for _ in range(calls):
            fn()
    return run


def check_variants(mode, inputs, params, groups, vs):
    """{variant: largest difference of its outputs from the first variant's (the heuristic's),
    relative to their largest magnitude}, on one input set."""
    checks, reference = {}, None
    for name, fields, limits in vs:
        with launch_config.override(limits=limits or None, **fields):
            outputs = _outputs(mode, inputs, params, groups)
        reference = reference or outputs
        checks[name] = max((a.double() - b.double()).abs().max().item()
                           / max(1e-30, b.double().abs().max().item())
                           for a, b in zip(outputs, reference))
    return checks


def _outputs(mode, inputs, params, groups):
    """A call's outputs (forward: out, mean, rstd; backward: dx and the six gradients)."""
    from sa_kernels.backends import triton_kernels
    x, dy, mean, rstd = inputs
    if mode == "forward":
        return triton_kernels.forward(x, *params, groups, 1e-5)
    return triton_kernels.backward(dy, x, *params, mean, rstd, groups, 1e-5)


def _with_variant(fn, fields, limits):
    def run():
        with launch_config.override(limits=limits or None, **fields):
            fn()
    return run


def warm(plan, shard, shards, device="cuda"):
    """Compile (into Triton's disk cache) the variants of one shard: each runs once."""
    numbered = [(i, item) for i, item in enumerate(
        (case, mode, fields, limits) for _, case, mode, vs in plan for _, fields, limits in vs)]
    mine = [item for i, item in numbered if i % shards == shard]
    for case in dict.fromkeys(item[0] for item in mine):
        shape, dtype, cl = case
        sets, params, _ = _inputs(shape, dtype, cl, device, count=1)
        for _, mode, fields, limits in (item for item in mine if item[0] == case):
            _with_variant(_call(mode, sets, params, shape.groups), fields, limits)()
        if device == "cuda":
            torch.cuda.synchronize()
        del sets


def host_cost(calls=200):
    """Wall µs per call, back to back without synchronising (the host's cost when it
    exceeds the device's): forward and forward + backward on the seed case; the triton
    backend with and without its direct launches, the cuda backend if built."""
    import sa_kernels
    from sa_kernels import FusedShuffleAttention
    from sa_kernels.backends import triton_kernels
    from sa_kernels.triton import launcher
    shape = _BY_NAME["seed"]
    x = torch.randn(shape.batch, shape.channels, shape.height, shape.width, device="cuda")
    out = {}
    for label, backend, direct in (("triton", "triton", True),
                                   ("triton (Triton's JIT launch)", "triton", False),
                                   ("cuda", "cuda", True)):
        if sa_kernels.backends.unavailable_reason(backend, "cuda", build=False) is not None:
            continue
        launcher.DIRECT = direct
        triton_kernels.clear_caches()
        module = FusedShuffleAttention(shape.channels, G=shape.groups, backend=backend).cuda()
        xg = x.clone().requires_grad_()
        dy = torch.randn_like(x)

        def forward():
            with torch.no_grad():
                module(x)
        for mode, step in (("forward", forward),
                           ("forward+backward", lambda: module(xg).backward(dy))):
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            host = (time.perf_counter() - t0) / calls * 1e6
            torch.cuda.synchronize()
            out[f"{label} {mode}"] = host
    launcher.DIRECT = True
    triton_kernels.clear_caches()
    return out


def run(args):
    plan = sweep_plan(args.cases)
    out_dir = args.out or os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "triton_sweep.json")
    t_start = time.perf_counter()
    if args.jobs > 1:
        cmd = [sys.executable, os.path.abspath(__file__), "--warm-shard"]
        extra = ["--cases", ",".join(args.cases)] if args.cases else []
        workers = [subprocess.Popen(cmd + [f"{i}/{args.jobs}"] + extra) for i in range(args.jobs)]
        for w in workers:
            w.wait()
        print(f"compiled in {args.jobs} processes: {time.perf_counter() - t_start:.0f} s", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "calls": args.calls, "method": "sum of CUDA kernel durations per call (torch.profiler)",
              "results": []}
    import triton
    report["triton"] = triton.__version__
    t_timing = time.perf_counter()
    if args.host:
        report["host_us_per_call"] = host_cost()
        print("host µs per call:", {k: round(v, 1) for k, v in report["host_us_per_call"].items()})
    for cid, (shape, dtype, cl), mode, vs in plan:
        if time.perf_counter() - t_timing > args.max_seconds:
            print(f"time limit reached before {cid} {mode}")
            break
        try:
            timed, checks, nbytes = _time_case(shape, dtype, cl, mode, vs, args.calls)
        except Exception as e:  # keep the rest of the sweep
            print(f"{cid} {mode}: FAILED {type(e).__name__}: {e}", flush=True)
            report["results"].append({"case": cid, "mode": mode, "error": f"{type(e).__name__}: {e}",
                                      "variants": []})
            continue
        copy_us = timed["copy"][0]
        moved = (2 if mode == "forward" else 3) * nbytes
        result = {"case": cid, "mode": mode, "plan_args": list(plan_args(shape, dtype, cl, mode)),
                  "input_bytes": nbytes, "copy_us": copy_us, "variants": []}
        for name, fields, limits in vs:
            us, launches = timed[name]
            # Variants differ only in summation order: float32-rounding-sized differences.
            agrees = checks[name] <= (5e-2 if dtype == "bfloat16" else 1e-4)
            if not agrees:
                print(f"{cid} {mode} {name}: differs from the heuristic's outputs by "
                      f"{checks[name]:.2e} (relative): excluded from TUNED", flush=True)
            result["variants"].append({
                "name": name, "fields": fields, "limits": limits, "device_us": us if agrees else None,
                "measured_us": us, "relative_difference": checks[name],
                "kernels_per_call": launches, "pct_copy": 100 * moved / us * copy_us / (2 * nbytes),
                "plan": _plan(plan_args(shape, dtype, cl, mode), fields, limits or None)._asdict()})
        report["results"].append(result)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        best = min(result["variants"], key=lambda v: v["measured_us"])
        default = result["variants"][0]
        print(f"{cid:32s} {mode:8s} copy {copy_us:7.1f} us | default {default['measured_us']:7.1f} us "
              f"({default['pct_copy']:3.0f}% copy) | best {best['name']}: {best['measured_us']:7.1f} us "
              f"({best['pct_copy']:3.0f}%)", flush=True)
    lines = tuned_entries(report["results"], args.min_gain)
    print(f"\n# {len(lines)} TUNED entries for sa_kernels/triton/launch_config.py "
          f"({report['device']}, {time.perf_counter() - t_start:.0f} s):")
    print("TUNED = {\n" + "\n".join(lines) + "\n}")
    print(f"results: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list the cases and variants, run nothing")
    p.add_argument("--cases", type=lambda s: [c for c in s.split(",") if c], default=None,
                   help="comma-separated substrings of case ids to keep")
    p.add_argument("--calls", type=int, default=5, help="profiled calls per variant")
    p.add_argument("--jobs", type=int, default=12, help="processes compiling the variants first")
    p.add_argument("--max-seconds", type=float, default=170,
                   help="start no case this long after the compilation phase")
    p.add_argument("--min-gain", type=float, default=0.05,
                   help="a TUNED entry needs the best variant this much faster than the default")
    p.add_argument("--host", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure host µs per call (seed case; default on)")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else .)")
    p.add_argument("--warm-shard", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        plan = sweep_plan(args.cases)
        for cid, case, mode, vs in plan:
            base = _plan(plan_args(*case, mode), {})
            print(f"{cid:32s} {mode:8s} heuristic block_j={base.block_j} block_hw={base.block_hw} "
                  f"chunked={base.chunked} num_warps={base.num_warps} splits={base.splits}: "
                  f"{len(vs)} variants: {', '.join(n for n, _, _ in vs)}")
        print(f"{sum(len(vs) for *_, vs in plan)} variants in {len(plan)} (case, mode) pairs")
        return plan
    if not torch.cuda.is_available():
        raise SystemExit("the sweep needs a CUDA GPU; --dry-run lists what it would time")
    os.environ.pop("TRITON_INTERPRET", None)
    if args.warm_shard:
        shard, shards = (int(v) for v in args.warm_shard.split("/"))
        warm(sweep_plan(args.cases), shard, shards)
        return None
    run(args)
    return None


if __name__ == "__main__":
    main()
