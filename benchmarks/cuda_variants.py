"""Device time of each CUDA kernel variant, case by case, next to a copy of the same tensor.

    python3 benchmarks/cuda_variants.py --dry-run      # the plan: cases, modes, variants (no GPU)
    python3 benchmarks/cuda_variants.py --resources    # ptxas registers/spills, SASS vector accesses (nvcc)
    python3 benchmarks/cuda_variants.py                # measure (a GPU and the built extension)

A *variant* is one value of the extension's measurement hook, ``sa_kernels::cuda_set_variant``
(its fields are documented at ``Variant`` in csrc/shuffle_attention.h): it forces one kernel
family where several could run, and is ignored where that family cannot run, so every result
records the kernels that actually ran. Everything else goes through the public API:
``FusedShuffleAttention(channel, G=G, backend="cuda")``.

Timing follows ../shared/gpu-baseline-2026-11-28.md: device time is the sum of the durations
of every kernel, memset and copy a call ran (torch.profiler, CUDA activity), averaged over
``--calls`` calls on inputs rotated past the L2 cache, random data. Within one profiler session
per (case, mode) the variants run one after another, each between two marker kernels
(``torch.cuda._sleep``), so the device events split cleanly by variant. The copy is a
``copy_`` of the same tensor in the same session; % copy = bytes that must move (forward 2N,
step 5N) over device time, against the copy's 2N over its time.

Results go to ``--out`` (default $OUT, else ./gpu-out): ``cuda_variants.json`` and a table
(``cuda_variants.md``), also printed last. A case is skipped once ``--budget-s`` has passed.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = ("shuffle_attention_fwd.cu", "shuffle_attention_bwd.cu")

# ---- the variants (csrc/shuffle_attention.h, Variant) ----------------------------------------

PLANES_PER_PLANE, PLANES_STAGED, PLANES_CLUSTER = 1, 2, 3  # bits 0-3
REDUCE_WARP, REDUCE_BLOCK = 1 << 4, 2 << 4   # bits 4-7
CLUSTER_SHIFT = 8                            # bits 8-15: 1 no cluster, n >= 2 a cluster of n
STAGED_MAX_PLANE = 512                       # kStagedMaxPlane: larger planes never stage
CLUSTER_SIZES = (2, 4, 8, 16)
# Packs (16 bytes) of a plane one block holds: forward 256 threads x 16, backward x 8; larger
# planes take the plane-cluster kernels (sm_90) or two sweeps (variant per_plane).
HELD_PACKS = {"forward": 256 * 16, "step": 256 * 8}


def cluster(n):
    return n << CLUSTER_SHIFT


def decode(variant):
    """The hook's integer as its fields, as Variant::decode does."""
    return {"planes": variant & 0xF, "reduce": (variant >> 4) & 0xF, "cluster": (variant >> 8) & 0xFF}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    channels: int
    height: int
    width: int
    groups: int
    layout: str  # "nchw" or "nhwc" (channels_last)

    @property
    def dims(self):
        return (self.batch, self.channels, self.height, self.width)

    @property
    def elements(self):
        return self.batch * self.channels * self.height * self.width

    @property
    def rows(self):
        """B * G: the rows the parameter-gradient kernel reduces per parameter index."""
        return self.batch * self.groups


# The benchmark suite's shapes (sa_kernels/bench/cases.py), NCHW, and channels_last versions of
# the ones issue 11 names: small B * C (large planes, batch 8 and 1) and SA-ResNet-50 stage 1.
CASES = (
    Case("seed", 64, 256, 8, 8, 8, "nchw"),
    Case("s1", 64, 256, 56, 56, 64, "nchw"),
    Case("s2", 64, 512, 28, 28, 64, "nchw"),
    Case("s3", 64, 1024, 14, 14, 64, "nchw"),
    Case("s4", 64, 2048, 7, 7, 64, "nchw"),
    Case("yolo", 16, 256, 80, 80, 8, "nchw"),
    Case("large", 8, 64, 256, 256, 8, "nchw"),
    Case("s1-nhwc", 64, 256, 56, 56, 64, "nhwc"),
    Case("s4-nhwc", 64, 2048, 7, 7, 64, "nhwc"),
    Case("yolo-nhwc", 16, 256, 80, 80, 8, "nhwc"),
    Case("large-nhwc", 8, 64, 256, 256, 8, "nhwc"),
    Case("b1-nhwc", 1, 128, 256, 256, 8, "nhwc"),
)
DTYPES = ("float32", "bfloat16")
MODES = ("forward", "step")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}


def variants_for(case, mode, dtype="float32"):
    """[(name, hook value)] worth comparing on this case: the launchers' choice first."""
    out = [("auto", 0)]
    hw = case.height * case.width
    if case.layout == "nchw":
        if hw <= STAGED_MAX_PLANE:
            out += [("per_plane", PLANES_PER_PLANE), ("staged", PLANES_STAGED)]
        if hw * ELEMENT_BYTES[dtype] // 16 > HELD_PACKS[mode]:
            out += [("two_sweep", PLANES_PER_PLANE)] + [
                (f"plane_cluster{n}", PLANES_CLUSTER | cluster(n)) for n in (8, 16)]
    else:
        out += [("no_cluster", cluster(1))] + [(f"cluster{n}", cluster(n)) for n in CLUSTER_SIZES]
    if mode == "step":
        out += [("reduce_warp", REDUCE_WARP), ("reduce_block", REDUCE_BLOCK)]
    return out


def build_plan(selected=None, dtypes=DTYPES, modes=MODES):
    """Every (case, dtype, mode) to measure, with its variants; ``selected`` filters case names."""
    plan = []
    for case in CASES:
        if selected and not any(s == case.name for s in selected):
            continue
        for dtype in dtypes:
            for mode in modes:
                n_bytes = case.elements * ELEMENT_BYTES[dtype]
                plan.append({"case": case, "dtype": dtype, "mode": mode, "input_bytes": n_bytes,
                             "moved_bytes": (2 if mode == "forward" else 5) * n_bytes,
                             "variants": variants_for(case, mode, dtype)})
    return plan


def describe_plan(plan):
    lines = []
    for item in plan:
        c = item["case"]
        names = ", ".join(f"{n}={v}" for n, v in item["variants"])
        lines.append(f"{c.name:11s} {str(c.dims):22s} G={c.groups:<3d} {c.layout} {item['dtype']:8s} "
                     f"{item['mode']:7s} {item['input_bytes'] / 1e6:7.1f} MB  [{names}]")
    return "\n".join(lines)


# ---- splitting one profiler session's device events by variant --------------------------------

MARKER = "spin_kernel"  # torch.cuda._sleep's kernel


def split_by_markers(events, labels):
    """``events``: (name, start, duration) of every device activity of a session, any order.
    The session ran a marker, then each label's work followed by a marker. Returns
    {label: [(name, duration), ...]} in label order. Raises if the markers do not match."""
    ordered = sorted(events, key=lambda e: e[1])
    segments, current = [], None
    for name, _, duration in ordered:
        if MARKER in name:
            if current is not None:
                segments.append(current)
            current = []
        elif current is None:
            raise ValueError(f"device activity {name!r} before the first marker")
        else:
            current.append((name, duration))
    if len(segments) != len(labels):
        raise ValueError(f"{len(segments)} marked segments for {len(labels)} labels: {labels}")
    return dict(zip(labels, segments))


def short_kernel_name(name):
    """'void sa_kernels::detail::forward_held_kernel<float, 4, 8, 64>(...)' -> 'forward_held_kernel<float, 4, 8, 64>'."""
    name = re.sub(r"^void ", "", name)
    name = name.split("(")[0]
    return name.replace("sa_kernels::detail::", "")


# ---- compiler resources: ptxas -v and SASS ---------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text, arch="sm_90"):
    """ptxas -v output -> {mangled kernel: {registers, stack, spill_stores, spill_loads, smem}}."""
    out, current = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1) if m.group(2) == arch else None
            if current:
                out[current] = {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            out[current]["registers"] = int(m.group(1))
            m = _SMEM.search(line)
            out[current]["smem"] = int(m.group(1)) if m else 0
    return out


# Opcodes counted per kernel: 16-byte global loads/stores, 16-byte global-to-shared copies
# (cp.async), 16-byte shared accesses, local memory.
SASS_OPCODES = {"ldg128": r"\bLDG\.E\.128\b", "stg128": r"\bSTG\.E\.128\b", "ldg": r"\bLDG\.",
                "stg": r"\bSTG\.", "ldgsts128": r"\bLDGSTS\.E\.(BYPASS\.)?128\b",
                "lds128": r"\bLDS\.128\b", "sts128": r"\bSTS\.128\b",
                "ldl": r"\bLDL\b", "stl": r"\bSTL\b"}
_FUNCTION = re.compile(r"Function : (\S+)")
_ARCH = re.compile(r"arch = (sm_\d+a?)")


def parse_sass(text, arch="sm_90"):
    """cuobjdump --dump-sass output -> {mangled kernel: {opcode class: count}} for ``arch``."""
    out, current, section_arch = {}, None, None
    for line in text.splitlines():
        m = _ARCH.search(line)
        if m:
            section_arch = m.group(1)
            continue
        m = _FUNCTION.search(line)
        if m:
            current = m.group(1) if section_arch in (None, arch) else None
            if current:
                out[current] = {k: 0 for k in SASS_OPCODES}
            continue
        if current and "/*" in line:
            for key, pattern in SASS_OPCODES.items():
                if re.search(pattern, line):
                    out[current][key] += 1
    return out


def find_cuobjdump():
    """cuobjdump on PATH, else the one Triton's wheel carries, else None."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton  # noqa: PLC0415 -- optional
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, result.stdout.splitlines())) if result.returncode == 0 else {n: n for n in names}


def compile_resources(arch="sm_90", sources=KERNEL_SOURCES, extra_flags=()):
    """Compile the kernel sources with ptxas -v (and disassemble, where cuobjdump is found):
    {short kernel name: {registers, stack, spill_stores, spill_loads, smem, [SASS counts]}}."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    cuobjdump = find_cuobjdump()
    sm = arch.replace("sm_", "")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            obj = Path(tmp) / (Path(source).stem + ".o")
            cmd = [nvcc, "-std=c++17", "-gencode", f"arch=compute_{sm},code={arch}", "-Xptxas", "-v",
                   *extra_flags, "-c", str(CSRC / source), "-o", str(obj)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
            found = parse_ptxas(result.stdout + result.stderr, arch)
            if cuobjdump:
                sass = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True)
                for name, counts in parse_sass(sass.stdout, arch).items():
                    found.setdefault(name, {}).update(counts)
            names = demangle(list(found))
            for mangled, info in found.items():
                rows[short_kernel_name(names[mangled])] = info
    return rows


def resources_table(rows):
    has_sass = any("ldg128" in r for r in rows.values())
    head = "| kernel | registers | spill st/ld | stack | smem |"
    rule = "|---|---|---|---|---|"
    if has_sass:
        head += " LDG.128 | LDGSTS.128 | STG.128 | LDG all | STG all | LDS/STS.128 | LDL/STL |"
        rule += "---|---|---|---|---|---|---|"
    lines = [head, rule]
    for name in sorted(rows):
        r = rows[name]
        line = (f"| `{name}` | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} "
                f"| {r['smem']} |")
        if has_sass:
            line += (f" {r.get('ldg128', '')} | {r.get('ldgsts128', '')} | {r.get('stg128', '')} "
                     f"| {r.get('ldg', '')} | {r.get('stg', '')} "
                     f"| {r.get('lds128', '')}/{r.get('sts128', '')} | {r.get('ldl', '')}/{r.get('stl', '')} |")
        lines.append(line)
    return "\n".join(lines)


# ---- measurement (GPU) ------------------------------------------------------------------------

def _set_variant(value):
    import torch  # noqa: PLC0415

    return torch.ops.sa_kernels.cuda_set_variant(int(value))


def _rotation(input_bytes, l2_bytes, free_bytes, tensors_per_set):
    """Input sets to rotate over: their bytes exceed the L2 three times, within a quarter of free memory."""
    wanted = max(2, math.ceil(3 * l2_bytes / input_bytes))
    affordable = max(1, int(free_bytes / 4 // (tensors_per_set * input_bytes)))
    return max(1, min(wanted, affordable))


def measure_item(item, calls, seed=0):
    """One (case, dtype, mode): device µs per call of the copy and of every variant."""
    import torch  # noqa: PLC0415
    from torch.autograd import DeviceType  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    from sa_kernels import FusedShuffleAttention  # noqa: PLC0415

    case, mode = item["case"], item["mode"]
    dtype = getattr(torch, item["dtype"])
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    gen = torch.Generator(device="cuda").manual_seed(seed)
    module = FusedShuffleAttention(case.channels, G=case.groups, backend="cuda").cuda()
    with torch.no_grad():  # float32 parameters, random (the defaults zero two gates' slopes)
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, device="cuda", generator=gen) * 0.8 + 0.2)

    props = torch.cuda.get_device_properties(0)
    free, _ = torch.cuda.mem_get_info()
    sets = _rotation(item["input_bytes"], props.L2_cache_size, free, 3 if mode == "step" else 2)

    def random_tensor():
        t = torch.randn(case.dims, device="cuda", generator=gen, dtype=torch.float32) * 1.7 + 0.6
        return t.to(dtype).contiguous(memory_format=fmt)

    xs = [random_tensor().requires_grad_(mode == "step") for _ in range(sets)]
    dys = [random_tensor() for _ in range(sets)] if mode == "step" else []
    dst = torch.empty_like(xs[0])

    def run_copy(i):
        with torch.no_grad():
            dst.copy_(xs[i])

    def run_forward(i):
        with torch.no_grad():
            module(xs[i])

    def run_step(i):
        module.zero_grad(set_to_none=True)
        xs[i].grad = None
        module(xs[i]).backward(dys[i])

    run = run_forward if mode == "forward" else run_step
    labels = ["copy"] + [name for name, _ in item["variants"]]
    values = dict(item["variants"])
    previous = _set_variant(0)
    try:
        for name in labels:  # warm-up: first launches, allocator, autograd graph
            _set_variant(values.get(name, 0))
            (run_copy if name == "copy" else run)(0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for name in labels:
                torch.cuda._sleep(1000)
                torch.cuda.synchronize()
                _set_variant(values.get(name, 0))
                for c in range(calls):
                    (run_copy if name == "copy" else run)(c % sets)
                torch.cuda.synchronize()
            torch.cuda._sleep(1000)
            torch.cuda.synchronize()
    finally:
        _set_variant(previous)

    events = [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
              if e.device_type == DeviceType.CUDA]
    segments = split_by_markers(events, labels)
    result = {"sets": sets, "calls": calls, "variants": {}}
    copy_us = sum(d for _, d in segments["copy"]) / calls
    result["copy_us"] = copy_us
    copy_rate = 2 * item["input_bytes"] / copy_us  # bytes per µs
    for name in labels[1:]:
        device_us = sum(d for _, d in segments[name]) / calls
        kernels = {}
        for k, _ in segments[name]:
            short = short_kernel_name(k)
            kernels[short] = kernels.get(short, 0) + 1
        result["variants"][name] = {
            "value": values[name], "device_us": device_us,
            "pct_copy": 100 * (item["moved_bytes"] / device_us) / copy_rate,
            "kernels_per_call": {k: v / calls for k, v in kernels.items()}}
    return result


def environment():
    import torch  # noqa: PLC0415

    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "l2_bytes": props.L2_cache_size, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def results_table(records):
    lines = ["| case | dtype | mode | copy µs | variant | device µs | % copy | kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['case']} | {r['dtype']} | {r['mode']} | | "
                         f"{r.get('skipped') or r.get('error')} | | | |")
            continue
        for name, v in r["variants"].items():
            kernels = ", ".join(f"{k} x{n:g}" for k, n in v["kernels_per_call"].items())
            lines.append(f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['copy_us']:.1f} | {name} "
                         f"| {v['device_us']:.1f} | {v['pct_copy']:.0f} | {kernels} |")
    return "\n".join(lines)


def measure(plan, calls, budget_s, out_dir):
    import torch  # noqa: PLC0415

    import sa_kernels.backends as backends  # noqa: PLC0415

    reason = backends.unavailable_reason("cuda", "cuda")
    if reason is not None:
        raise SystemExit(f"the cuda backend cannot run: {reason}")
    if not hasattr(torch.ops.sa_kernels, "cuda_set_variant"):
        raise SystemExit("this build of the extension has no sa_kernels::cuda_set_variant hook")
    start = time.monotonic()
    records = []
    report = {"environment": environment(), "calls": calls, "records": records}
    for item in plan:
        case = item["case"]
        record = {"case": case.name, "dims": case.dims, "groups": case.groups, "layout": case.layout,
                  "dtype": item["dtype"], "mode": item["mode"], "input_bytes": item["input_bytes"],
                  "moved_bytes": item["moved_bytes"]}
        if time.monotonic() - start > budget_s:
            record["skipped"] = f"over the {budget_s:.0f} s budget"
        else:
            try:
                record.update(measure_item(item, calls))
            except Exception as e:  # noqa: BLE001 -- one failing case must not lose the others
                record["error"] = f"{type(e).__name__}: {e}"
            torch.cuda.empty_cache()
        records.append(record)
        print(f"[{time.monotonic() - start:6.1f} s] {case.name} {item['dtype']} {item['mode']}: "
              + (record.get("skipped") or record.get("error") or
                 " ".join(f"{n}={v['device_us']:.1f}us/{v['pct_copy']:.0f}%"
                          for n, v in record["variants"].items())
                 + f" (copy {record['copy_us']:.1f} us)"), flush=True)
        (out_dir / "cuda_variants.json").write_text(json.dumps(report, indent=1))  # after every case
    table = results_table(records)
    (out_dir / "cuda_variants.md").write_text(table + "\n")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--resources", action="store_true",
                        help="ptxas -v and SASS counts of every kernel (nvcc; no GPU needed)")
    parser.add_argument("--arch", default="sm_90", help="target of --resources (default sm_90)")
    parser.add_argument("--cases", nargs="*", help="case names to run (default: all)")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--calls", type=int, default=10, help="calls per variant (default 10)")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="start no new case after this many seconds (default 170)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    args = parser.parse_args(argv)

    plan = build_plan(args.cases, tuple(args.dtypes), tuple(args.modes))
    if args.dry_run:
        print(describe_plan(plan))
        print(f"{len(plan)} case-modes, {sum(len(i['variants']) + 1 for i in plan)} measurements "
              f"(copy included) of {args.calls} calls each")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.resources:
        rows = compile_resources(args.arch)
        table = resources_table(rows)
        (args.out / f"cuda_resources_{args.arch}.json").write_text(json.dumps(rows, indent=1))
        (args.out / f"cuda_resources_{args.arch}.md").write_text(table + "\n")
        print(table)
        return 0
    print(measure(plan, args.calls, args.budget_s, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
