"""Compile every Triton kernel variant the triton backend launches for a set of cases to a
CUDA cubin, without a GPU: the interpreter accepts programs the real compiler rejects
(types, layouts, fp64 lowering), so this is the check that the kernels build for sm_XX.

    python tests/triton_compile_check.py [arch]      # arch defaults to 90 (H100)
    python tests/triton_compile_check.py 90 --sweep --report   # also every variant the GPU
        # sweep (benchmarks/triton_sweep.py) times; one line per variant: registers, stack.
        # Spills in the sweep's variants are listed, not fatal: the sweep measures them.

It runs the backend's host code on CPU tensors with the launches captured, specialises
each launch's arguments exactly as Triton's JIT would on a GPU (ints equal to 1 become
constants, 16-divisible ints and pointers get divisibility hints) and compiles each
distinct variant with ptxas, then reads each cubin's register and stack use with the
cuobjdump Triton ships: a variant that spills registers to the stack fails too. Exits
non-zero on the first failure. tests/test_triton.py runs it in a subprocess
(TRITON_INTERPRET must be unset before Triton is imported).
"""
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import random_input, random_reference  # noqa: E402
from sa_kernels.backends import triton_kernels  # noqa: E402
from sa_kernels.triton import launch_config  # noqa: E402

_variants = {}


class _Capture:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the variant."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **constexprs):
            spec = tuple(native_specialize_impl(CUDABackend, a, False, True, True) for a in args)
            key = (self.fn.__name__, spec, tuple(sorted(constexprs.items())), num_warps)
            _variants.setdefault(key, (self.fn, spec, constexprs, num_warps))
        return launch


def _compile(fn, spec, kw_constexprs, num_warps, target):
    names = fn.arg_names
    signature, constexprs, attrs = {}, dict(kw_constexprs), {}
    for i, (ty, key) in enumerate(spec):
        if ty == "constexpr":
            constexprs[names[i]] = key
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
        signature[names[i]] = ty
    for name in constexprs:
        signature[name] = "constexpr"
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    options = CUDABackend(target).parse_options({"num_warps": num_warps})
    return triton.compile(src, target=target, options=options.__dict__)


def _run_cases():
    """Forward and backward host code for every path: the launches are captured, not run."""
    cases = [
        # (shape, G, dtype, memory format, limits overrides, x view)
        ((2, 8, 7, 5), 2, torch.float32, torch.contiguous_format, {}, None),
        ((2, 24, 7, 7), 3, torch.float32, torch.contiguous_format, {"min_programs": 1}, None),
        ((2, 16, 7, 5), 2, torch.float32, torch.contiguous_format, {"on_chip_values": 64}, None),
        ((2, 16, 7, 5), 2, torch.float16, torch.channels_last, {}, None),
        ((2, 16, 7, 5), 2, torch.float16, torch.channels_last, {"on_chip_values": 64}, None),
        ((2, 16, 9, 11), 2, torch.float32, torch.contiguous_format, {}, "sliced"),
        ((2, 8, 6, 5), 2, torch.float64, torch.contiguous_format, {}, None),
        ((2, 8, 6, 5), 2, torch.float64, torch.contiguous_format, {"on_chip_values": 32}, None),
        ((2, 8, 6, 5), 2, torch.bfloat16, torch.contiguous_format, {}, None),
        ((2, 4, 1, 1), 1, torch.float32, torch.contiguous_format, {}, None),
        ((2, 2, 7, 5), 1, torch.float32, torch.contiguous_format, {}, None),
        # realistic shapes, default limits: 16-divisible sizes, big tiles, many warps
        ((8, 256, 56, 56), 8, torch.float16, torch.contiguous_format, {}, None),
        ((8, 256, 56, 56), 8, torch.bfloat16, torch.channels_last, {}, None),
        ((64, 256, 8, 8), 8, torch.float32, torch.contiguous_format, {}, None),
        ((2, 64, 14, 14), 8, torch.float32, torch.contiguous_format, {}, None),   # VEC = 4
        ((2, 64, 14, 14), 8, torch.bfloat16, torch.contiguous_format, {}, None),
        ((64, 2048, 7, 7), 64, torch.bfloat16, torch.contiguous_format, {}, None),
        ((2, 64, 256, 256), 8, torch.float32, torch.contiguous_format, {}, None),
        # channels_last with few (sample, block) programs: split planes
        ((2, 64, 128, 128), 8, torch.float32, torch.channels_last, {}, None),
        ((1, 64, 256, 256), 8, torch.bfloat16, torch.channels_last, {}, None),
    ]
    for shape, G, dtype, fmt, limits, view in cases:
        launch_config.LIMITS = launch_config.Limits(**limits)
        pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        ref = random_reference(shape[1], G, "cpu", pdtype)
        params = [p.detach().reshape(-1) for p in (ref.cweight, ref.cbias, ref.sweight, ref.sbias,
                                                    ref.gn.weight, ref.gn.bias)]
        x = random_input(shape, dtype, "cpu", fmt)
        if view == "sliced":
            x = x[:, :, ::2, 1::2]
        out, mean, rstd = triton_kernels.forward(x, *params, G, 1e-5)
        for dy in (random_input(x.shape, dtype, "cpu", fmt), torch.ones((), dtype=dtype).expand(x.shape)):
            triton_kernels.backward(dy, x, *params, mean, rstd, G, 1e-5)
    launch_config.LIMITS = launch_config.Limits()
    # in-plane int64 offsets
    triton_kernels._needs_int64 = lambda *tensors: True
    triton_kernels.clear_caches()
    triton_kernels.forward(x, *params, G, 1e-5)
    triton_kernels.backward(dy, x, *params, mean, rstd, G, 1e-5)


def _run_sweep_cases():
    """Host code of every variant benchmarks/triton_sweep.py times, on uninitialised CPU
    tensors of the real shapes (nothing is touched: the launches are captured)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks",
                        "triton_sweep.py")
    spec = importlib.util.spec_from_file_location("triton_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    for _, (shape, dtype, cl), mode, variants in sweep.sweep_plan():
        fmt = torch.channels_last if cl else torch.contiguous_format
        dims = (shape.batch, shape.channels, shape.height, shape.width)
        x = torch.empty(dims, dtype=getattr(torch, dtype), memory_format=fmt)
        params = [torch.empty(shape.channels // (2 * shape.groups)) for _ in range(6)]
        mean = torch.empty(dims[:2])
        for _, fields, limits in variants:
            with launch_config.override(limits=limits or None, **fields):
                if mode == "forward":
                    triton_kernels.forward(x, *params, shape.groups, 1e-5)
                else:
                    triton_kernels.backward(torch.empty_like(x), x, *params, mean, mean,
                                            shape.groups, 1e-5)


def _access_widths(ptx):
    """Global loads and stores of a kernel's PTX by width, e.g. 'ld v4.b32 x2, b32 x12'."""
    parts = []
    for op in ("ld", "st"):
        kinds = re.findall(rf"\b{op}\.global((?:\.[a-z0-9]+)*)", ptx)
        counts = {}
        for k in kinds:
            k = re.sub(r"\.(L1::\w+|L2::\w+|nc|relaxed|gpu|sys|cta|weak|volatile)", "", k).lstrip(".")
            counts[k] = counts.get(k, 0) + 1
        parts.append(f"{op} " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())))
    return "; ".join(parts)


def _resource_usage(cubin):
    """(registers, stack bytes) of a cubin, or None without cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", text, re.S)
    return tuple(int(v) for v in found.groups()) if found else None


def main():
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    positional = [a for a in sys.argv[1:] if not a.startswith("--")]
    arch = int(positional[0]) if positional else 90
    target = GPUTarget("cuda", arch, 32)
    triton_kernels._kernels = tuple(_Capture(k) for k in triton_kernels._load_kernels())
    triton_kernels._split_kernels = tuple(_Capture(k) for k in triton_kernels._load_split_kernels())
    needs_int64 = triton_kernels._needs_int64
    _run_cases()
    if "--sweep" in flags:
        triton_kernels.clear_caches()
        triton_kernels._needs_int64 = needs_int64  # _run_cases forced the int64 variant last
        _run_sweep_cases()
    max_regs = 0
    spilled = []
    for fn, spec, constexprs, num_warps in _variants.values():
        what = f"{fn.__name__} {constexprs} num_warps={num_warps}"
        try:
            compiled = _compile(fn, spec, constexprs, num_warps, target)
        except Exception as e:
            print(f"FAILED {what}: {type(e).__name__}: {e}")
            raise SystemExit(1)
        assert compiled.asm.get("cubin"), "no cubin produced"
        usage = _resource_usage(compiled.asm["cubin"])
        if usage is not None:
            regs, stack = usage
            max_regs = max(max_regs, regs)
            if "--report" in flags:
                print(f"{regs:4d} registers {stack:5d} stack bytes  {what}  "
                      f"[{_access_widths(compiled.asm['ptx'])}]", flush=True)
            if stack:
                spilled.append(f"SPILLS {what}: {regs} registers, {stack} bytes of stack")
    if spilled:
        print("\n".join(spilled))
        if "--sweep" not in flags:  # the sweep times some spilling variants on purpose
            raise SystemExit(1)
    print(f"compiled {len(_variants)} kernel variants for sm_{arch}"
          f" (at most {max_regs} registers per thread, no spills)")


if __name__ == "__main__":
    main()
