"""The CUDA sources build without a GPU: kernels with plain nvcc, the binding against torch's headers.

The kernel files (csrc/*.cu, *.cuh, *.h) must not include torch, so they compile with
nvcc alone; the compiles run in parallel. The torch binding is checked with
``g++ -fsyntax-only`` against the installed torch's headers (a CPU wheel ships the
ATen and c10/cuda headers it needs).
"""
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cuda_toolkit import cuda_include_dir, find_nvcc

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BINDING = CSRC / "torch_binding.cpp"
KERNEL_SOURCES = sorted(CSRC.glob("*.cu"))
TORCH_FREE_FILES = sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)


def test_sources_are_where_the_build_expects_them():
    assert [p.name for p in KERNEL_SOURCES] == ["shuffle_attention_bwd.cu", "shuffle_attention_fwd.cu"]
    assert BINDING.is_file()


def test_kernel_files_include_no_torch_headers():
    assert TORCH_INCLUDE.search(BINDING.read_text()), "the pattern must match the binding's includes"
    for path in TORCH_FREE_FILES:
        match = TORCH_INCLUDE.search(path.read_text())
        assert match is None, f"{path.name} includes a torch header: {match.group(0).strip()}"


def _nvcc_command(nvcc, source, out_dir):
    # -Xptxas -v: the resource report test_sm90_resources reads (registers, spills, stack).
    return [nvcc, "-std=c++17", *GENCODE, "-Xptxas", "-v", "-c", str(source), "-o",
            str(Path(out_dir) / f"{source.stem}.o")]


def _binding_command():
    """g++ -fsyntax-only of the binding against the installed torch's headers, or None."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++")
    cuda_include = cuda_include_dir()
    if compiler is None or cuda_include is None:
        return None
    cmd = [compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra",
           # The CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated at torch's
           # build); c10's own switch skips it. It only defines export macros.
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    for path in include_paths():
        cmd += ["-isystem", path]
    return cmd + ["-isystem", cuda_include, "-isystem", sysconfig.get_paths()["include"],
                  f"-I{CSRC}", str(BINDING)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every compile of this module, run concurrently: {name: (command, CompletedProcess)}."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    nvcc = find_nvcc()
    commands = {}
    if nvcc is not None:
        commands.update({src.name: _nvcc_command(nvcc, src, out_dir) for src in KERNEL_SOURCES})
    binding = _binding_command()
    if binding is not None:
        commands[BINDING.name] = binding
    with ThreadPoolExecutor(max_workers=max(len(commands), 1)) as pool:
        futures = {name: pool.submit(subprocess.run, cmd, capture_output=True, text=True)
                   for name, cmd in commands.items()}
        return {name: (commands[name], f.result()) for name, f in futures.items()}, out_dir


def _cuda_variants():
    """benchmarks/cuda_variants.py, whose parsers read ptxas and cuobjdump output."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_variants", ROOT / "benchmarks" / "cuda_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_clean(name, cmd, result):
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output}"
    assert "warning" not in output.lower(), f"{name} compiles with warnings:\n{output}"


@pytest.mark.parametrize("source", [p.name for p in KERNEL_SOURCES])
def test_kernels_compile_with_plain_nvcc(builds, source):
    results, out_dir = builds
    if source not in results:
        pytest.skip("nvcc not found")
    _assert_clean(source, *results[source])
    assert (out_dir / source.replace(".cu", ".o")).stat().st_size > 0


def test_binding_parses_against_torch_headers(builds):
    results, _ = builds
    if BINDING.name not in results:
        pytest.skip("needs g++ and the CUDA headers")
    _assert_clean(BINDING.name, *results[BINDING.name])


VEC16 = {"float": 4, "double": 2, "__half": 8, "__nv_bfloat16": 8}  # elements per 16 bytes


def _is_vectorised(kernel):
    """Kernels that move 16-byte packs: staged, channels_last split, parameter-gradient (4-value
    rows), and held or two-sweep kernels whose VEC template argument is 16 bytes of elements."""
    name, args = kernel.split("<", 1)
    args = [a.strip() for a in args.rstrip(">").split(",")]
    if name in ("forward_staged_kernel", "backward_staged_kernel", "param_grad_kernel",
                "forward_channels_last_split_kernel", "backward_channels_last_split_kernel",
                "forward_plane_cluster_kernel", "backward_plane_cluster_kernel"):
        return True
    return name.endswith(("held_kernel", "two_sweep_kernel")) and args[1] == str(VEC16[args[0]])


# Register saves around a slow-path subroutine call (64-bit integer division, IEEE division
# or square root of doubles) show as a few bytes of spill; a register array that went to
# local memory (a run-time index) shows as tens of bytes or more, and as LDL/STL in loops.
MAX_CALL_SAVE_BYTES = 8
MAX_LOCAL_ACCESSES = 4
# float64 (the correctness dtype) divides and takes square roots in subroutines; where many
# registers are live across such a call (a plane's held packs), its saves take more.
MAX_CALL_SAVE_BYTES_DOUBLE = 64
MAX_LOCAL_ACCESSES_DOUBLE = 16


def test_sm90_resources(builds):
    """Per kernel on sm_90: no local-memory arrays (at most a call's register saves); 16-byte
    global loads or global-to-shared copies (and 16-byte stores, for the kernels that write
    packs) where 16-byte packs move."""
    results, out_dir = builds
    if not all(src.name in results for src in KERNEL_SOURCES):
        pytest.skip("nvcc not found")
    cv = _cuda_variants()
    rows = {}
    for src in KERNEL_SOURCES:
        _, result = results[src.name]
        rows.update(cv.parse_ptxas(result.stdout + result.stderr, "sm_90"))
    assert len(rows) > 50, "ptxas -v reported too few kernels"
    cuobjdump = cv.find_cuobjdump()
    if cuobjdump is not None:
        for src in KERNEL_SOURCES:
            sass = subprocess.run([cuobjdump, "--dump-sass", str(out_dir / f"{src.stem}.o")],
                                  capture_output=True, text=True, check=True).stdout
            for name, counts in cv.parse_sass(sass, "sm_90").items():
                rows[name].update(counts)
    names = cv.demangle(list(rows))
    if not all("<" in name for name in names.values()):
        pytest.skip("c++filt is needed to name the kernels")
    for mangled, r in rows.items():
        kernel = cv.short_kernel_name(names[mangled])
        double = "<double" in kernel
        max_bytes = MAX_CALL_SAVE_BYTES_DOUBLE if double else MAX_CALL_SAVE_BYTES
        assert r["spill_stores"] <= max_bytes and r["stack"] <= max_bytes, f"{kernel}: {r}"
        if cuobjdump is None:
            continue
        max_local = MAX_LOCAL_ACCESSES_DOUBLE if double else MAX_LOCAL_ACCESSES
        assert r["ldl"] + r["stl"] <= max_local, f"{kernel} uses local memory: {r}"
        if _is_vectorised(kernel):
            assert r["ldg128"] + r["ldgsts128"] > 0, f"{kernel} has no 16-byte global load: {r}"
            if not kernel.startswith("param_grad"):
                assert r["stg128"] > 0, f"{kernel} has no 16-byte global store: {r}"
