"""Launch heuristic for the Triton kernels: a few integer rules, no autotuning.

Nothing here benchmarks or touches the GPU, so a launch never syncs the host
and works under CUDA-graph capture. The plan is a function of
(H*W, C, B, dtype, layout, forward/backward) only, so the reduction order and
hence every result is reproducible for a given shape.

A program owns ``block_j`` channel pairs (2 * block_j planes) of one sample.
Register budget is counted in *values*: elements held x tensors held per element
(1 in forward: x; 2 in backward: x and grad_out) x 2 for float64.

1. Orientation: if x's channel stride is 1 (channels_last), the tile's
   contiguous axis is the channel block, so block_j starts at one 32-byte sector
   of channels (8 float32, 16 half, 4 float64) and doubles up to
   ``cl_max_pairs`` while the grid keeps at least ``min_programs`` programs.
   Otherwise (NCHW and other strides) each plane row is its own contiguous run:
   block_j starts at 1 and small planes are packed by doubling block_j while the
   tile stays within ``pack_values`` and the grid within ``min_programs``.
2. Single sweep vs chunked: if the whole tile (2 * block_j planes x
   next_pow2(H*W)) fits in ``on_chip_values``, the program holds it in registers
   and reads x (and grad_out) once. Otherwise it loops over H*W in chunks of
   the largest power of two that fits ``chunk_values``: two sweeps (statistics,
   then gate/dx), the second one re-reading what the program read just before.
3. num_warps: one warp per ``values_per_warp`` tile values (8 per thread), a
   power of two in [1, 16]. Register counts of the sm_90 cubins were checked
   with cuobjdump (tests/triton_compile_check.py builds them); no GPU timing
   went into these numbers.
4. Channel and in-plane offsets are int32 unless a tensor's channels or one
   plane span 2**31 elements (then int64); per-sample offsets are always int64.

``LIMITS`` is module-level so tests can lower ``on_chip_values`` and reach the
chunked path with interpreter-sized shapes.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    on_chip_values: int = 16384  # per program: above this, the chunked two-sweep path
    chunk_values: int = 4096     # per program, chunked path: values per chunk tile
    pack_values: int = 4096      # per program: packing target for small NCHW planes
    values_per_warp: int = 256   # num_warps = tile values / this (8 per thread)
    min_programs: int = 512      # packing/widening stops before the grid drops below this
    cl_max_pairs: int = 32       # channels_last: widest channel-pair block


LIMITS = Limits()


@dataclass(frozen=True)
class PlanePlan:
    block_j: int       # channel pairs per program
    block_hw: int      # spatial positions per tile (>= H*W unless chunked)
    chunked: bool      # two sweeps over H*W instead of one
    num_jblocks: int   # pair blocks per sample
    grid: tuple
    num_warps: int


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n):
    return 1 << (max(1, int(n)).bit_length() - 1)


def _cdiv(a, b):
    return -(-a // b)


def plan_planes(batch, half_channels, hw, elem_size, fp64, channels_fast, tensors, limits=None):
    """The per-plane kernels' launch plan.

    half_channels: C / 2 (the number of channel pairs); elem_size: bytes per x
    element; fp64: float64 arithmetic; channels_fast: x's channel stride is 1;
    tensors: 1 (forward) or 2 (backward).
    """
    lim = LIMITS if limits is None else limits
    vpe = tensors * (2 if fp64 else 1)
    hw_block = next_pow2(hw)
    max_j = next_pow2(half_channels)

    def grid_after_doubling(bj):
        return batch * _cdiv(half_channels, 2 * bj)

    if channels_fast:
        block_j = min(max_j, max(1, 32 // elem_size))
        while (block_j < min(max_j, lim.cl_max_pairs)
               and grid_after_doubling(block_j) >= lim.min_programs):
            block_j *= 2
    else:
        block_j = 1
        while (block_j < max_j and 2 * (2 * block_j) * hw_block * vpe <= lim.pack_values
               and grid_after_doubling(block_j) >= lim.min_programs):
            block_j *= 2

    chunked = 2 * block_j * hw_block * vpe > lim.on_chip_values
    if chunked:
        budget = min(lim.chunk_values, lim.on_chip_values)
        block_hw = min(hw_block, prev_pow2(budget // (2 * block_j * vpe)))
    else:
        block_hw = hw_block
    tile_values = 2 * block_j * block_hw * vpe
    num_warps = min(16, prev_pow2(max(1, tile_values // lim.values_per_warp)))
    num_jblocks = _cdiv(half_channels, block_j)
    return PlanePlan(block_j, block_hw, chunked, num_jblocks, (batch * num_jblocks,), num_warps)


@dataclass(frozen=True)
class ReducePlan:
    block_r: int
    block_p: int
    grid: tuple
    num_warps: int


def plan_param_grads(rows, half):
    """The parameter-gradient reduction: ``rows`` = B * G partial rows, ``half`` parameters."""
    block_p = min(next_pow2(half), 64)
    block_r = min(next_pow2(rows), max(1, 1024 // block_p))
    return ReducePlan(block_r, block_p, (_cdiv(half, block_p),), 4)
