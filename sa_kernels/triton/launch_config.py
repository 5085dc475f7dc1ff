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
2. Split planes (channels_last only): when B * (C/2) / block_j programs are
   fewer than ``split_below``, H*W is cut into ``splits`` slices (a power of two,
   doubled until the grid reaches ``min_programs`` while a slice keeps at least
   ``min_split_positions`` positions). The kernels then run in two launches:
   per-slice partial statistics, then a fixed-order merge of a plane's partials
   and the slice's gate (forward) or dx (backward). x (and grad_out) are read
   twice; with ``wave_bytes`` set, the launch pairs run over consecutive groups
   of samples and blocks reading about that many bytes each (``waves``), so the
   second read can find the first's data in L2.
3. Single sweep vs chunked: if the whole tile (2 * block_j planes x
   next_pow2(H*W)) fits in ``on_chip_values``, the program holds it in registers
   and reads x (and grad_out) once. Otherwise it loops over H*W in chunks of
   the largest power of two that fits ``chunk_values``: two sweeps (statistics,
   then gate/dx), the second one re-reading what the program read just before.
   Split plans always loop over their slice in such chunks.
4. num_warps: one warp per ``values_per_warp`` tile values (8 per thread), and
   no more warps than leave each thread one 16-byte vector of each plane tile
   (block_j x block_hw elements), a power of two in [1, 16]. Register counts and
   access widths of the sm_90 cubins were checked with Triton's compiler
   (tests/triton_compile_check.py --report); no GPU timing went into these numbers.
5. Channel and in-plane offsets are int32 unless a tensor's channels or one
   plane span 2**31 elements (then int64); per-sample offsets are always int64.
6. VEC (chosen by the backend from the strides, at most ``vec``): NCHW-like planes
   whose H*W and strides are multiples of VEC elements (up to 16 bytes) pass them
   divided by VEC, so the compiler can emit vector loads for e.g. 14x14 planes.

Overrides, in order of precedence (each only for the plan fields it names):
``override(...)`` (a context manager: what a sweep uses to force one variant),
``TUNED`` (measured best per benchmark case, pasted from
``benchmarks/triton_sweep.py``), then the rules above. ``LIMITS`` holds the
rules' thresholds: ``override(limits=...)``, the ``SA_KERNELS_TRITON_LIMITS``
environment variable (``"on_chip_values=8192,values_per_warp=128"``, read at
import) or, in tests, assigning the module attribute replace them. Plans depend
on ``settings()``, so callers that cache plans key them on it.
"""
import contextlib
import os
from typing import NamedTuple

LIMITS_ENV_VAR = "SA_KERNELS_TRITON_LIMITS"


class Limits(NamedTuple):  # a tuple, so hashing it (cache keys) costs one C call
    on_chip_values: int = 16384      # per program: above this, the chunked two-sweep path
    chunk_values: int = 4096         # per program, chunked path: values per chunk tile
    pack_values: int = 4096          # per program: packing target for small NCHW planes
    values_per_warp: int = 256       # num_warps = tile values / this (8 per thread)
    min_programs: int = 512          # packing/widening stops before the grid drops below this
    cl_max_pairs: int = 32           # channels_last: widest channel-pair block
    split_below: int = 256           # channels_last: split H*W when the grid is smaller than this
    min_split_positions: int = 256   # channels_last: fewest positions in a slice
    reduce_rows: int = 256           # parameter gradients: partial rows per first-stage program
    reduce_single_rows: int = 1024   # parameter gradients: up to this many rows, one stage
    wave_bytes: int = 0              # split planes: bytes read per launch pair (0: one pair)


def limits_from_env(text=None):
    """Limits with the fields named in ``SA_KERNELS_TRITON_LIMITS`` (``name=int,...``) replaced."""
    text = os.environ.get(LIMITS_ENV_VAR, "") if text is None else text
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in Limits._fields:
            raise ValueError(f"{LIMITS_ENV_VAR}: expected name=int with a name from "
                             f"{Limits._fields}, got {item!r}")
        fields[name] = int(value)
    return Limits(**fields)


LIMITS = limits_from_env()

# Plan fields an override or a TUNED entry may set.
PLAN_FIELDS = ("block_j", "block_hw", "chunked", "num_warps", "splits", "waves", "vec")
FORCED = None  # () or sorted (field, value) pairs, set by ``override``

# Measured best plans: tune_key(...) -> {plan field: value}. Filled from GPU sweeps
# (benchmarks/triton_sweep.py prints entries in this form); empty until one has run.
TUNED = {}


def settings():
    """What plans depend on besides the shape: a hashable token for cache keys."""
    return LIMITS, FORCED


@contextlib.contextmanager
def override(limits=None, **plan_fields):
    """Within the block, plans use ``limits`` (a Limits, or a dict of its fields to
    replace) and take ``plan_fields`` (any of PLAN_FIELDS) instead of the rules'."""
    global LIMITS, FORCED
    unknown = set(plan_fields) - set(PLAN_FIELDS)
    if unknown:
        raise ValueError(f"unknown plan fields {sorted(unknown)}; expected some of {PLAN_FIELDS}")
    saved = LIMITS, FORCED
    if isinstance(limits, dict):
        limits = LIMITS._replace(**limits)
    LIMITS = limits if limits is not None else LIMITS
    FORCED = tuple(sorted(plan_fields.items())) or None
    try:
        yield
    finally:
        LIMITS, FORCED = saved


class PlanePlan(NamedTuple):
    block_j: int       # channel pairs per program
    block_hw: int      # spatial positions per tile (>= H*W unless chunked or split)
    chunked: bool      # two sweeps over H*W instead of one
    num_jblocks: int   # pair blocks per sample
    grid: tuple
    num_warps: int
    splits: int = 1    # H*W slices per plane (> 1: two launches, partials then merge)
    slice_len: int = 0  # positions per slice (a multiple of block_hw) when split
    waves: int = 1     # split planes: launch pairs, each over consecutive (sample, block) groups
    vec: int = 16      # cap on the stride-divisibility hint (the host picks VEC <= this)


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n):
    return 1 << (max(1, int(n)).bit_length() - 1)


def _cdiv(a, b):
    return -(-a // b)


def tune_key(batch, half_channels, hw, elem_size, fp64, channels_fast, tensors):
    """The TUNED table's key: the exact case a measured plan was found for."""
    return (tensors, bool(channels_fast), elem_size, bool(fp64), batch, half_channels, hw)


def _forced(key):
    fields = dict(TUNED.get(key, ()))
    fields.update(FORCED or ())
    return fields


def _check_pow2(name, value, low, high):
    if not (low <= value <= high and value & (value - 1) == 0):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")


def plan_planes(batch, half_channels, hw, elem_size, fp64, channels_fast, tensors, limits=None):
    """The per-plane kernels' launch plan.

    half_channels: C / 2 (the number of channel pairs); elem_size: bytes per x
    element; fp64: float64 arithmetic; channels_fast: x's channel stride is 1;
    tensors: 1 (forward) or 2 (backward).
    """
    lim = LIMITS if limits is None else limits
    forced = _forced(tune_key(batch, half_channels, hw, elem_size, fp64, channels_fast, tensors))
    vpe = tensors * (2 if fp64 else 1)
    hw_block = next_pow2(hw)
    max_j = next_pow2(half_channels)

    def grid_after_doubling(bj):
        return batch * _cdiv(half_channels, 2 * bj)

    if "block_j" in forced:
        block_j = forced["block_j"]
        _check_pow2("block_j", block_j, 1, max_j)
    elif channels_fast:
        block_j = min(max_j, max(1, 32 // elem_size))
        while (block_j < min(max_j, lim.cl_max_pairs)
               and grid_after_doubling(block_j) >= lim.min_programs):
            block_j *= 2
    else:
        block_j = 1
        while (block_j < max_j and 2 * (2 * block_j) * hw_block * vpe <= lim.pack_values
               and grid_after_doubling(block_j) >= lim.min_programs):
            block_j *= 2
    num_jblocks = _cdiv(half_channels, block_j)

    if "splits" in forced:
        splits = forced["splits"]
        _check_pow2("splits", splits, 1, hw_block)
        if splits > 1 and not channels_fast:
            raise ValueError("split planes are a channels_last path")
    else:
        splits = 1
        if channels_fast and batch * num_jblocks < lim.split_below:
            while (batch * num_jblocks * splits < lim.min_programs
                   and hw // (2 * splits) >= lim.min_split_positions):
                splits *= 2

    budget = min(lim.chunk_values, lim.on_chip_values)
    chunk_hw = prev_pow2(max(1, budget // (2 * block_j * vpe)))
    if splits > 1:
        chunked = True
        block_hw = forced.get("block_hw", min(chunk_hw, next_pow2(_cdiv(hw, splits))))
        _check_pow2("block_hw", block_hw, 1, hw_block)
        slice_len = _cdiv(_cdiv(hw, splits), block_hw) * block_hw
        splits = _cdiv(hw, slice_len)  # every slice holds positions
        groups = batch * num_jblocks
        read_bytes = batch * 2 * half_channels * hw * elem_size * tensors
        waves = forced.get("waves", _cdiv(read_bytes, lim.wave_bytes) if lim.wave_bytes else 1)
        waves = _cdiv(groups, _cdiv(groups, max(1, waves)))  # no empty wave
    else:
        if forced.get("waves", 1) != 1:
            raise ValueError("waves apply to split planes only")
        slice_len = 0
        waves = 1
        chunked = forced.get("chunked", 2 * block_j * hw_block * vpe > lim.on_chip_values)
        if chunked:
            block_hw = forced.get("block_hw", min(hw_block, chunk_hw))
            _check_pow2("block_hw", block_hw, 1, hw_block)
        else:
            block_hw = hw_block
    tile_values = 2 * block_j * block_hw * vpe
    # At most one warp per values_per_warp tile values, and few enough threads that each
    # holds a 16-byte vector of every [block_j, block_hw] tile it loads or stores (more
    # threads split the tile into narrower accesses: sm_90 PTX showed 4- and 8-byte ones).
    # Only where 16-byte accesses are possible (channels contiguous, or H*W a multiple of
    # a vector: not 7x7) and not for split planes (fewer warps made ptxas spill there).
    by_values = tile_values // lim.values_per_warp
    vectors = splits == 1 and (channels_fast or hw % max(1, 16 // elem_size) == 0)
    by_vectors = block_j * block_hw * elem_size // (16 * 32) if vectors else by_values
    num_warps = forced.get("num_warps", min(16, prev_pow2(max(1, min(by_values, by_vectors)))))
    _check_pow2("num_warps", num_warps, 1, 32)
    vec = forced.get("vec", 16)
    _check_pow2("vec", vec, 1, 16)
    return PlanePlan(block_j, block_hw, bool(chunked), num_jblocks,
                     (batch * num_jblocks * splits,), num_warps, splits, slice_len, waves, vec)


class ReducePlan(NamedTuple):
    block_r: int         # rows per tile
    block_p: int         # parameters per program
    grid: tuple          # (parameter blocks, row chunks)
    num_warps: int
    rows_per_chunk: int  # rows each first-stage program sums (a multiple of block_r)
    final: object        # the second stage's ReducePlan over the chunks' partials, or None


def plan_param_grads(rows, half, limits=None):
    """The parameter-gradient reduction: ``rows`` = B * G (times the splits) partial rows,
    ``half`` parameters. More than ``reduce_single_rows`` rows (and more than ``reduce_rows``):
    a first stage sums chunks of ``reduce_rows`` rows in parallel into partials, a second
    sums those in order (two launches). Otherwise one program per parameter block."""
    lim = LIMITS if limits is None else limits
    block_p = min(next_pow2(half), 64)
    single = rows <= max(lim.reduce_rows, lim.reduce_single_rows)
    block_r = min(next_pow2(rows), max(1, 1024 // block_p),
                  1 << 30 if single else prev_pow2(lim.reduce_rows))
    pblocks = _cdiv(half, block_p)
    rows_per_chunk = _cdiv(max(lim.reduce_rows, block_r), block_r) * block_r
    chunks = 1 if single else _cdiv(rows, rows_per_chunk)
    if chunks <= 1:
        return ReducePlan(block_r, block_p, (pblocks, 1), 4, _cdiv(rows, block_r) * block_r, None)
    final = plan_param_grads(chunks, half, lim._replace(reduce_single_rows=chunks))
    return ReducePlan(block_r, block_p, (pblocks, chunks), 4, rows_per_chunk, final)
