"""The CUDA kernels' own C++ (csrc/*.cu), run on CPU threads by tests/cuda_emulation.

No GPU is needed: the kernels and launchers are compiled as host C++ with a small
emulation of threads, blocks, barriers and warp shuffles. Each case checks which kernel
the launcher chose and compares out, mean, rstd, dx and the six parameter gradients with
the torch backend's closed form in float64. This checks the indexing, masks, reductions
and path choice of every kernel; it cannot check GPU-only behaviour (memory model,
vector instructions, speed): tests/test_cuda.py does that on a GPU.
"""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cuda_toolkit import cuda_include_dir
from helpers import PARAM_GRAD_RTOL, TOLERANCES, assert_rel_close, random_input
from sa_kernels.backends import torch_math

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMULATION = ROOT / "tests" / "cuda_emulation"

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
KERNEL_TYPE = {torch.float32: "float", torch.float64: "double", torch.float16: "__half",
               torch.bfloat16: "__nv_bfloat16"}
VEC = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}  # 16 bytes
EPS = 1e-5
# Variant fields (csrc/shuffle_attention.h, Variant): the measurement hook's integer.
PLANES_PER_PLANE, PLANES_STAGED, PLANES_CLUSTER = 1, 2, 3
REDUCE_WARP, REDUCE_BLOCK = 1 << 4, 2 << 4


class Emulator:
    def __init__(self, lib):
        self.lib = lib
        lib.sa_emu_forward.restype = ctypes.c_int
        lib.sa_emu_backward.restype = ctypes.c_int
        lib.sa_emu_take_launched.restype = ctypes.c_int

    @staticmethod
    def _ints(values):
        return (ctypes.c_int64 * len(values))(*values)

    @staticmethod
    def _ptrs(tensors):
        return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))

    def take_launched(self):
        buf = ctypes.create_string_buffer(1 << 16)
        self.lib.sa_emu_take_launched(buf, len(buf))
        return [line for line in buf.value.decode().split("\n") if line]

    def forward(self, x, params, limit=-1, max_blocks=3, variant=0):
        acc = torch_math.acc_dtype(x.dtype)
        out = torch.empty_like(x)
        mean = torch.empty(x.shape[:2], dtype=acc)
        rstd = torch.empty_like(mean)
        acc_params = [p.reshape(-1).to(acc).contiguous() for p in params]
        rc = self.lib.sa_emu_forward(
            DTYPE_CODE[x.dtype], ctypes.c_void_p(x.data_ptr()), self._ints(x.stride()),
            ctypes.c_void_p(out.data_ptr()), self._ints(out.stride()), self._ptrs(acc_params),
            ctypes.c_int64(acc_params[0].numel()), ctypes.c_void_p(mean.data_ptr()),
            ctypes.c_void_p(rstd.data_ptr()), self._ints(x.shape), ctypes.c_double(EPS),
            ctypes.c_int64(limit), ctypes.c_int64(variant), ctypes.c_uint(max_blocks))
        assert rc == 0, f"forward launcher returned cudaError {rc}"
        return out, mean, rstd, self.take_launched()

    def backward(self, dy, x, params, mean, rstd, limit=-1, max_blocks=3, variant=0):
        acc = mean.dtype
        dx = torch.empty_like(x)
        # Poisoned: a slot the first kernel fails to write turns a gradient into NaN.
        partials = torch.full((*x.shape[:2], 2), float("nan"), dtype=acc)
        acc_params = [p.reshape(-1).to(acc).contiguous() for p in params]
        grads = [torch.empty_like(p) for p in acc_params]
        rc = self.lib.sa_emu_backward(
            DTYPE_CODE[x.dtype], ctypes.c_void_p(dy.data_ptr()), self._ints(dy.stride()),
            ctypes.c_void_p(x.data_ptr()), self._ints(x.stride()), ctypes.c_void_p(dx.data_ptr()),
            self._ints(dx.stride()), self._ptrs(acc_params), ctypes.c_int64(acc_params[0].numel()),
            ctypes.c_void_p(mean.data_ptr()), ctypes.c_void_p(rstd.data_ptr()),
            ctypes.c_void_p(partials.data_ptr()), self._ptrs(grads), self._ints(x.shape),
            ctypes.c_int64(limit), ctypes.c_int64(variant), ctypes.c_uint(max_blocks))
        assert rc == 0, f"backward launcher returned cudaError {rc}"
        return dx, grads, self.take_launched()


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    compiler = shutil.which("g++")
    include = cuda_include_dir()
    if compiler is None or include is None:
        pytest.skip("the CPU emulation needs g++ and the CUDA headers (cuda_fp16.h)")
    lib = tmp_path_factory.mktemp("cuda_emulation") / "sa_kernels_emulated.so"
    # Extra flags: "-fsanitize=thread -g" has ThreadSanitizer look for shared-memory races
    # between barriers; run pytest with LD_PRELOAD=$(g++ -print-file-name=libtsan.so) and
    # OMP_NUM_THREADS=1 (torch's OpenMP threads are not instrumented: false reports).
    extra = os.environ.get("SA_KERNELS_EMULATION_CXXFLAGS", "").split()
    cmd = [compiler, "-std=c++20", "-O1", *extra, "-shared", "-fPIC", "-pthread", f"-I{CSRC}",
           f"-I{EMULATION}", "-isystem", include, str(EMULATION / "emulated_kernels.cpp"),
           "-o", str(lib), "-ldl"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"emulation build failed:\n{' '.join(cmd)}\n{result.stderr}"
    return Emulator(ctypes.CDLL(str(lib)))


def random_params(half):
    return [torch.randn(half, dtype=torch.float64) * 0.8 + 0.2 for _ in range(6)]


def check_case(emu, x, groups, dy=None, limit=-1, max_blocks=3, variant=0):
    """Forward and backward through the emulated kernels against the float64 closed form."""
    half = x.shape[1] // (2 * groups)
    params = random_params(half)
    out, mean, rstd, fwd_kernels = emu.forward(x, params, limit, max_blocks, variant)
    x64, p64 = x.to(torch.float64), [p.to(torch.float64) for p in params]
    ref_out, ref_mean, ref_rstd = torch_math.forward(x64, *p64, groups, EPS)
    tol = TOLERANCES[x.dtype]
    stats_tol = dict(atol=1e-10, rtol=1e-9) if x.dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.to(torch.float64), ref_out, **tol, msg=lambda m: f"forward: {m}")
    torch.testing.assert_close(mean.to(torch.float64), ref_mean, **stats_tol, msg=lambda m: f"mean: {m}")
    torch.testing.assert_close(rstd.to(torch.float64), ref_rstd, **stats_tol, msg=lambda m: f"rstd: {m}")

    if dy is None:
        dy = random_input(x.shape, x.dtype, "cpu")
    dx, grads, bwd_kernels = emu.backward(dy, x, params, mean, rstd, limit, max_blocks, variant)
    ref = torch_math.backward(dy.to(torch.float64), x64, *p64, ref_mean, ref_rstd, groups, EPS)
    torch.testing.assert_close(dx.to(torch.float64), ref[0], **tol, msg=lambda m: f"dx: {m}")
    names = ("cweight", "cbias", "sweight", "sbias", "gn_weight", "gn_bias")
    for name, g, r in zip(names, grads, ref[1:]):
        assert_rel_close(g, r, PARAM_GRAD_RTOL[x.dtype], name)
    return fwd_kernels, bwd_kernels, (out, mean, rstd, dx, grads)


def kernel(name, dtype, *args):
    """The demangled name the emulation records, e.g. forward_held_kernel<float, 1, 2, 32>."""
    targs = ", ".join([KERNEL_TYPE[dtype]] + [str(a).lower() for a in args])
    return f"sa_kernels::detail::{name}<{targs}>"


def assert_path(launched, expected):
    assert len(launched) == len(expected), launched
    for got, want in zip(launched, expected):
        assert got.startswith(f"void {want}("), f"launched {got}, expected {want}"


def assert_cluster(launched, name, blocks):
    """A launch of ``blocks`` blocks a cluster (1: an ordinary launch)."""
    suffix = f" [cluster {blocks}]" if blocks > 1 else ""
    assert launched.startswith(f"void {name}(") and launched.endswith(")" + suffix), launched


def param_kernel(dtype, team=32):
    """The parameter-gradient kernel with a team of ``team`` threads per parameter index."""
    return kernel("param_grad_kernel", dtype, team)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups, items", [
    ((3, 8, 7, 7), 2, 2),      # 49 elements: a warp, 2 per lane
    ((2, 8, 8, 8), 4, 2),      # 64: exactly full
    ((4, 8, 1, 1), 2, 2),      # 1x1 planes: variance 0
    ((2, 12, 14, 14), 3, 8),   # 196: a warp, 8 per lane
    ((1, 2, 1, 250), 1, 8),    # one row
])
def test_warp_per_plane(emu, dtype, shape, groups, items):
    """Small planes, the staged path turned off: a warp per plane."""
    x = random_input(shape, dtype, "cpu")
    fwd, bwd, _ = check_case(emu, x, groups, variant=PLANES_PER_PLANE)
    assert_path(fwd, [kernel("forward_held_kernel", dtype, 1, items, 32)])
    assert_path(bwd, [kernel("backward_held_kernel", dtype, 1, items, 32), param_kernel(dtype)])


STAGED_F, STAGED_B = "forward_staged_kernel", "backward_staged_kernel"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups", [
    ((3, 16, 7, 7), 2),     # 49 elements: packs run across plane boundaries; one tile an image
    ((2, 48, 14, 14), 4),   # several tiles an image, the last one shorter (every dtype)
    ((4, 16, 1, 1), 2),     # 1x1 planes: a pack holds several planes; variance 0
    ((2, 16, 1, 3), 2),     # planes shorter than a pack, not dividing it
    ((1, 4, 16, 32), 1),    # 512 elements: the largest staged plane, 32 lanes a plane
    ((2, 80, 5, 7), 5),     # 35 elements, 16 lanes a plane
    ((2, 16, 3, 3), 2),     # 9 elements, 4 lanes a plane
])
def test_staged_small_planes(emu, dtype, shape, groups):
    x = random_input(shape, dtype, "cpu")
    fwd, bwd, _ = check_case(emu, x, groups)
    assert_path(fwd, [kernel(STAGED_F, dtype)])
    assert_path(bwd, [kernel(STAGED_B, dtype), param_kernel(dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, make_dy, staged_bwd", [
    ((1, 2, 1, 250), None, False),    # C/2 * H * W = 250: runs would not start on 16 bytes
    ((2, 8, 8, 8), "expanded", False),  # grad_out's channel stride 0: the backward cannot stage it
    ((2, 8, 8, 8), "offset", False),  # x one element past a 16-byte boundary
    ((2, 8, 4, 4), "channels_last_dy", False),
    ((1, 4, 32, 32), None, False),    # 1024 elements: larger than a staged plane
])
def test_staged_not_taken(emu, dtype, shape, make_dy, staged_bwd):
    """Where the staged kernels cannot read or write in 16-byte vectors, the per-plane kernels run."""
    if make_dy == "offset":
        x = random_input((torch.Size(shape).numel() + 1,), dtype, "cpu")[1:].view(shape)
    else:
        x = random_input(shape, dtype, "cpu")
    dy = {"expanded": lambda: random_input((1, 1) + shape[2:], dtype, "cpu").expand(shape),
          "channels_last_dy": lambda: random_input(shape, dtype, "cpu", torch.channels_last)}.get(
              make_dy, lambda: None)()
    fwd, bwd, _ = check_case(emu, x, 1 if shape[1] <= 4 else 2, dy=dy)
    staged_fwd = make_dy in ("expanded", "channels_last_dy")
    assert (fwd[0].startswith(f"void {kernel(STAGED_F, dtype)}(")) == staged_fwd, fwd
    assert (bwd[0].startswith(f"void {kernel(STAGED_B, dtype)}(")) == staged_bwd, bwd


EMULATED_MAX_CLUSTER = 4  # emu::g_max_cluster
PLANE_CLUSTER_PACKS = 256 * 4  # packs a block of the plane-cluster kernels holds


def held_vector_config(packs, max_items):
    """(ITEMS, TEAM) of the held kernel the launchers pick for planes of ``packs`` 16-byte
    packs: the smallest team holding the plane in 8 packs a thread, then 16 (forward
    only); ("cluster", blocks) past that, where a cluster of the emulated device holds the
    plane; None: the two-sweep kernel."""
    for team in (32, 64, 128, 256):
        if packs <= team * 8:
            return 8, team
    if max_items >= 16 and packs <= 256 * 16:
        return 16, 256
    blocks = -(-packs // PLANE_CLUSTER_PACKS)
    return ("cluster", blocks) if blocks <= EMULATED_MAX_CLUSTER else None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", [896, 1800, 3136, 6400, 12544])
def test_held_vectorised(emu, dtype, hw):
    """16-byte packs held in registers by a warp, two or four warps, the block, or a cluster of
    blocks; past what a cluster of the emulated device holds, the two-sweep kernels."""
    v = VEC[dtype]
    x = random_input((1, 6, 1, hw), dtype, "cpu")  # 6 planes: some teams idle in the last round
    fwd, bwd, _ = check_case(emu, x, 1)
    for launched, direction, max_items in ((fwd[0], "forward", 16), (bwd[0], "backward", 8)):
        config = held_vector_config(hw // v, max_items)
        if config is None:
            assert_path([launched], [kernel(f"{direction}_two_sweep_kernel", dtype, v, False)])
        elif config[0] == "cluster":
            assert_cluster(launched, kernel(f"{direction}_plane_cluster_kernel", dtype), config[1])
        else:
            assert_path([launched], [kernel(f"{direction}_held_kernel", dtype, v, *config)])
    assert bwd[1].startswith(f"void {param_kernel(dtype)}(")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, fwd_items, bwd_items", [
    ((2, 4, 31, 33), 4, 4),      # 1023: no vector width divides it
    ((1, 2, 43, 47), 16, 8),     # 2021
])
def test_block_per_plane_scalar(emu, dtype, shape, fwd_items, bwd_items):
    x = random_input(shape, dtype, "cpu")
    fwd, bwd, _ = check_case(emu, x, 1)
    assert_path(fwd, [kernel("forward_held_kernel", dtype, 1, fwd_items, 256)])
    assert_path(bwd, [kernel("backward_held_kernel", dtype, 1, bwd_items, 256), param_kernel(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_pointer_falls_back_to_scalar(emu, dtype):
    """Contiguous planes whose pointer is not 16-byte aligned: the scalar configuration."""
    shape = (2, 4, 32, 32)
    x = random_input((torch.Size(shape).numel() + 1,), dtype, "cpu")[1:].view(shape)
    fwd, bwd, _ = check_case(emu, x, 2)
    assert_path(fwd, [kernel("forward_held_kernel", dtype, 1, 4, 256)])
    assert_path(bwd, [kernel("backward_held_kernel", dtype, 1, 4, 256), param_kernel(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, vec", [((2, 4, 24, 24), True), ((2, 4, 9, 11), False), ((3, 4, 1, 1), False)])
def test_two_sweep_forced(emu, dtype, shape, vec):
    """register_plane_limit = 0 sends every plane down the two-sweep path."""
    x = random_input(shape, dtype, "cpu")
    fwd, bwd, _ = check_case(emu, x, 2, limit=0)
    v = VEC[dtype] if vec else 1
    assert_path(fwd, [kernel("forward_two_sweep_kernel", dtype, v, False)])
    assert_path(bwd, [kernel("backward_two_sweep_kernel", dtype, v, False), param_kernel(dtype)])


PLANE_CLUSTER_F, PLANE_CLUSTER_B = "forward_plane_cluster_kernel", "backward_plane_cluster_kernel"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocks", [
    ((2, 4, 32, 32), 0),   # 1024 elements: about a pack a thread -> 4 (fp16: 2) blocks
    ((1, 2, 24, 40), 3),   # 3 blocks of 320 elements
    ((1, 2, 8, 8), 4),     # 64 elements over 4 blocks: some hold nothing
])
def test_plane_cluster_forced(emu, dtype, shape, blocks):
    """variant planes = 3: each plane held by a cluster of blocks, parts merged in rank order."""
    x = random_input(shape, dtype, "cpu")
    variant = PLANES_CLUSTER | (blocks << 8)
    fwd, bwd, _ = check_case(emu, x, 1, variant=variant)
    want = blocks or min(4, max(2, -(-shape[2] * shape[3] // VEC[dtype] // 256)))
    assert_cluster(fwd[0], kernel(PLANE_CLUSTER_F, dtype), want)
    assert_cluster(bwd[0], kernel(PLANE_CLUSTER_B, dtype), want)


def test_plane_cluster_does_not_depend_on_the_grid(emu):
    x = random_input((2, 4, 16, 24), torch.float32, "cpu")
    dy = random_input(x.shape, torch.float32, "cpu")
    params = random_params(1)
    variant = PLANES_CLUSTER | (3 << 8)
    runs = []
    for max_blocks in (1, 2, 5):
        out, mean, rstd, _ = emu.forward(x, params, max_blocks=max_blocks, variant=variant)
        dx, grads, _ = emu.backward(dy, x, params, mean, rstd, max_blocks=max_blocks, variant=variant)
        runs.append([out, mean, rstd, dx, *grads])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_two_sweep_plane_too_large_to_hold(emu, dtype):
    v = VEC[dtype]
    hw = 256 * 16 * v + 4 * v  # past the largest held configuration
    x = random_input((1, 2, 1, hw), dtype, "cpu")
    fwd, bwd, _ = check_case(emu, x, 1)
    assert_path(fwd, [kernel("forward_two_sweep_kernel", dtype, v, False)])
    assert_path(bwd, [kernel("backward_two_sweep_kernel", dtype, v, False), param_kernel(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups", [
    ((2, 12, 5, 7), 3),    # C/2 = 6 pairs: one partly idle tile
    ((2, 40, 3, 5), 2),    # C/2 = 20: several tiles, the last partly idle
    ((1, 4, 11, 13), 1),   # 143 positions: rows do unequal work
])
def test_channels_last(emu, dtype, shape, groups):
    """The split kernels where C/2 is a multiple of 16 bytes of elements, else the scalar ones."""
    x = random_input(shape, dtype, "cpu", memory_format=torch.channels_last)
    dy = random_input(shape, dtype, "cpu", memory_format=torch.channels_last)
    fwd, bwd, (out, *_rest) = check_case(emu, x, groups, dy=dy)
    assert out.is_contiguous(memory_format=torch.channels_last)
    split = (shape[1] // 2) % VEC[dtype] == 0
    name = "channels_last_split_kernel" if split else "channels_last_kernel"
    assert_path(fwd, [kernel(f"forward_{name}", dtype)])
    assert_path(bwd, [kernel(f"backward_{name}", dtype), param_kernel(dtype)])


SPLIT_F, SPLIT_B = "forward_channels_last_split_kernel", "backward_channels_last_split_kernel"


def cluster_variant(blocks):
    return blocks << 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)  # 4, 2, 8 a pack
@pytest.mark.parametrize("shape, groups", [
    ((2, 16, 5, 7), 2),    # C/2 = 8: one tile (bfloat16: half of it idle)
    ((1, 48, 4, 6), 3),    # C/2 = 24: several tiles, the last partly idle for bfloat16
    ((1, 16, 1, 5), 2),    # 5 positions over up to 4 blocks: some blocks get none
])
@pytest.mark.parametrize("blocks", [1, 3, 4])
def test_channels_last_split_clusters(emu, dtype, shape, groups, blocks):
    """Positions split over a cluster of 1 to 4 blocks, partials merged through (emulated)
    distributed shared memory."""
    x = random_input(shape, dtype, "cpu", memory_format=torch.channels_last)
    dy = random_input(shape, dtype, "cpu", memory_format=torch.channels_last)
    fwd, bwd, _ = check_case(emu, x, groups, dy=dy, variant=cluster_variant(blocks))
    assert_cluster(fwd[0], kernel(SPLIT_F, dtype), blocks)
    assert_cluster(bwd[0], kernel(SPLIT_B, dtype), blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_split_automatic_cluster(emu, dtype):
    """One work item and 512 positions on the emulated device (2 multiprocessors, clusters
    of up to 4): the launcher picks 4 blocks, each keeping at least 128 positions."""
    x = random_input((1, 16, 16, 32), dtype, "cpu", memory_format=torch.channels_last)
    dy = random_input(x.shape, dtype, "cpu", memory_format=torch.channels_last)
    fwd, bwd, _ = check_case(emu, x, 2, dy=dy)
    assert_cluster(fwd[0], kernel(SPLIT_F, dtype), 4)
    assert_cluster(bwd[0], kernel(SPLIT_B, dtype), 4)
    x = random_input((1, 16, 16, 16), dtype, "cpu", memory_format=torch.channels_last)  # 256 positions
    fwd, _, _ = check_case(emu, x, 2, dy=random_input(x.shape, dtype, "cpu", memory_format=torch.channels_last))
    assert_cluster(fwd[0], kernel(SPLIT_F, dtype), 2)


@pytest.mark.parametrize("blocks", [1, 3])
def test_channels_last_split_does_not_depend_on_the_grid(emu, blocks):
    """Bitwise equal over grids of 1, 2 or 5 clusters (each cluster loops over items)."""
    x = random_input((3, 32, 3, 5), torch.float32, "cpu", memory_format=torch.channels_last)
    dy = random_input(x.shape, torch.float32, "cpu", memory_format=torch.channels_last)
    params = random_params(4)
    runs = []
    for max_blocks in (1, 2, 5):
        out, mean, rstd, _ = emu.forward(x, params, max_blocks=max_blocks, variant=cluster_variant(blocks))
        dx, grads, _ = emu.backward(dy, x, params, mean, rstd, max_blocks=max_blocks,
                                    variant=cluster_variant(blocks))
        runs.append([out, mean, rstd, dx, *grads])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _permuted(shape, dtype):
    """Dense but neither NCHW nor NHWC: stored as (B, H, C, W); empty_like keeps that."""
    b, c, h, w = shape
    return random_input((b, h, c, w), dtype, "cpu").permute(0, 2, 1, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make_x", [
    _permuted,
    lambda shape, dtype: random_input(shape[:3] + (2 * shape[3],), dtype, "cpu")[..., ::2],
], ids=["permuted", "sliced_w"])
def test_generic_strided(emu, dtype, make_x):
    x = make_x((2, 8, 5, 6), dtype)
    fwd, bwd, _ = check_case(emu, x, 2)
    assert_path(fwd, [kernel("forward_two_sweep_kernel", dtype, 1, True)])
    assert_path(bwd, [kernel("backward_two_sweep_kernel", dtype, 1, True), param_kernel(dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_slice_keeps_plane_path(emu, dtype):
    """A slice along C leaves the planes contiguous and packed: staged (forward) and per-plane
    kernels read it in place (the backward's dx is contiguous, its grad_out too)."""
    x = random_input((2, 12, 8, 8), dtype, "cpu")[:, 2:10]
    fwd, bwd, _ = check_case(emu, x, 2)
    assert_path(fwd, [kernel(STAGED_F, dtype)])
    assert_path(bwd, [kernel(STAGED_B, dtype), param_kernel(dtype)])
    fwd, bwd, _ = check_case(emu, x, 2, variant=PLANES_PER_PLANE)
    assert_path(fwd, [kernel("forward_held_kernel", dtype, 1, 2, 32)])
    assert_path(bwd, [kernel("backward_held_kernel", dtype, 1, 2, 32), param_kernel(dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("x_format, make_dy", [
    (torch.contiguous_format, lambda x: torch.ones((), dtype=x.dtype).expand(x.shape)),  # .sum().backward()
    (torch.contiguous_format, lambda x: random_input(x.shape, x.dtype, "cpu", torch.channels_last)),
    (torch.channels_last, lambda x: random_input(x.shape, x.dtype, "cpu")),
    (torch.contiguous_format, lambda x: random_input(x.shape[:3] + (2 * x.shape[3],), x.dtype, "cpu")[..., 1::2]),
], ids=["expanded", "dy_channels_last", "x_channels_last", "dy_sliced"])
def test_grad_out_with_other_strides(emu, dtype, x_format, make_dy):
    x = random_input((2, 8, 6, 7), dtype, "cpu", memory_format=x_format)
    _, bwd, _ = check_case(emu, x, 2, dy=make_dy(x))
    assert_path(bwd, [kernel("backward_two_sweep_kernel", dtype, 1, True), param_kernel(dtype)])


def test_grad_out_expanded_over_batch_keeps_plane_path(emu):
    """Zero batch/channel strides with contiguous planes: read in place by the plane kernels."""
    x = random_input((3, 8, 8, 8), torch.float32, "cpu")
    dy = random_input((1, 1, 8, 8), torch.float32, "cpu").expand(x.shape)
    _, bwd, _ = check_case(emu, x, 2, dy=dy)
    assert_path(bwd, [kernel("backward_held_kernel", torch.float32, 1, 2, 32), param_kernel(torch.float32)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups, variant, team", [
    ((9, 64, 2, 3), 32, 0, 256),             # B * G = 288 rows: a block per parameter index
    ((9, 64, 2, 3), 32, REDUCE_WARP, 32),    # the same, forced to a warp
    ((5, 160, 3, 3), 8, REDUCE_BLOCK, 256),  # 40 rows, half = 10, forced to a block
    ((1, 1024, 1, 1), 8, 0, 32),             # G = 8, half = 64: more indices than warps
], ids=["block", "forced_warp", "forced_block", "half64"])
def test_parameter_gradient_reduction(emu, dtype, shape, groups, variant, team):
    x = random_input(shape, dtype, "cpu")
    _, bwd, _ = check_case(emu, x, groups, variant=variant)
    assert bwd[-1].startswith(f"void {param_kernel(dtype, team)}("), bwd


@pytest.mark.parametrize("variant", [0, REDUCE_WARP, REDUCE_BLOCK], ids=["auto", "warp", "block"])
def test_parameter_gradients_do_not_depend_on_the_grid(emu, variant):
    """Bitwise equal over grids, both team sizes; 288 rows (two rounds of loads for a warp)."""
    x = random_input((9, 128, 1, 1), torch.float32, "cpu")  # G = 32, half = 2, 288 rows
    dy = random_input(x.shape, torch.float32, "cpu")
    params = random_params(2)
    _, mean, rstd, _ = emu.forward(x, params)
    runs = [emu.backward(dy, x, params, mean, rstd, max_blocks=m, variant=variant)[1] for m in (1, 2, 5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_many_groups_and_parameters(emu):
    """The parameter-gradient kernel: more (batch, group) terms than lanes, more indices than warps."""
    x = random_input((5, 160, 3, 3), torch.float32, "cpu")  # G = 8, half = 10, 40 terms
    check_case(emu, x, 8)
    x = random_input((3, 2 * 2 * 20, 2, 2), torch.float64, "cpu")  # G = 2, half = 20 > 8 warps
    check_case(emu, x, 2, max_blocks=1)


@pytest.mark.parametrize("limit, shape, memory_format, variant", [
    (-1, (3, 8, 7, 7), torch.contiguous_format, PLANES_PER_PLANE),
    (-1, (2, 48, 7, 7), torch.contiguous_format, 0),  # staged: 3 tiles an image
    (-1, (2, 4, 28, 32), torch.contiguous_format, 0),
    (-1, (1, 6, 30, 60), torch.contiguous_format, 0),  # teams of two warps, one idle
    (0, (2, 4, 24, 24), torch.contiguous_format, 0),
    (-1, (2, 40, 3, 5), torch.channels_last, 0),
])
def test_results_do_not_depend_on_the_grid(emu, limit, shape, memory_format, variant):
    """Bitwise equal whether one block loops over every plane or several share them."""
    x = random_input(shape, torch.float32, "cpu", memory_format=memory_format)
    dy = random_input(shape, torch.float32, "cpu", memory_format=memory_format)
    params = random_params(shape[1] // 4)
    runs = []
    for max_blocks in (1, 2, 5):
        out, mean, rstd, _ = emu.forward(x, params, limit, max_blocks, variant)
        dx, grads, _ = emu.backward(dy, x, params, mean, rstd, limit, max_blocks, variant)
        runs.append([out, mean, rstd, dx, *grads])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4), (2, 0, 3, 3)])
def test_empty_launches_nothing(emu, shape):
    x = torch.empty(shape)
    half = max(shape[1] // 4, 1)
    params = random_params(half)
    _, _, _, launched = emu.forward(x, params)
    assert launched == []
    _, _, launched = emu.backward(torch.empty(shape), x, params, torch.empty(shape[:2]), torch.empty(shape[:2]))
    assert launched == []


# One case per way the forward kernels take a plane's statistics: (shape, groups, memory format,
# the forward kernel that case launches).
STATISTICS_PATHS = [
    ((2, 96, 5, 7), 8, torch.contiguous_format, "forward_staged_kernel"),
    ((2, 16, 64, 64), 2, torch.contiguous_format, "forward_held_kernel"),
    ((1, 8, 256, 256), 2, torch.contiguous_format, "forward_two_sweep_kernel"),
    ((2, 96, 14, 14), 8, torch.channels_last, "forward_channels_last_split_kernel"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, groups, memory_format, path", STATISTICS_PATHS)
def test_an_infinity_makes_its_spatial_plane_nan_as_groupnorm_does(emu, dtype, shape, groups, memory_format, path):
    # GroupNorm of a plane holding an infinity is NaN throughout; the kernels' statistics must
    # carry that NaN into the plane's gate, not gate the plane to zeros.
    C, half = shape[1], shape[1] // (2 * groups)
    x = random_input(shape, dtype, "cpu", memory_format)
    x[0, half + 1, 1, 2] = float("inf")           # a spatial-branch plane
    x[-1, C // 2 + half, 0, 0] = float("-inf")    # another, at its first value
    params = random_params(half)
    out, _, _, launched = emu.forward(x, params)
    assert launched[0].startswith(f"void sa_kernels::detail::{path}<"), launched
    expected, _, _ = torch_math.forward(x.to(torch.float64), *params, groups, EPS)
    assert int(torch.isnan(expected).sum()) == 2 * shape[2] * shape[3]
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(out.to(torch.float64)[finite], expected[finite], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, groups, memory_format, path", STATISTICS_PATHS)
def test_a_plane_whose_first_value_is_an_outlier_keeps_exact_statistics(emu, dtype, shape, groups, memory_format,
                                                                         path):
    # One-pass sums about each plane's first value lost such a plane's variance to cancellation
    # in the cpu kernels; the CUDA kernels' Welford / Chan merges must keep it.
    x = random_input(shape, dtype, "cpu", memory_format)
    x[:, :, 0, 0] = 1e3
    fwd_kernels, _, _ = check_case(emu, x, groups)
    assert fwd_kernels[0].startswith(f"void sa_kernels::detail::{path}<"), fwd_kernels

