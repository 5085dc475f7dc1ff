"""The forward for split planes (channels_last with few samples and channels): two launches.

When B * C / (2 * BLOCK_J) programs cannot fill the GPU (e.g. 32 for (8, 64, 256, 256)
float32), each plane's H*W is cut into ``splits`` slices of ``slice_len`` positions
and a *unit* (b, pair block, slice s) gets its own program:

1. ``..._partials_kernel``: the slice's statistics (mean and sum of squared
   deviations, Chan-merged chunk by chunk) into ``part`` (2, splits, B, C).
2. ``..._apply_kernel``: merges the plane's ``splits`` partials in slice order
   (every program of a plane does the same merge, so they agree bitwise), gates its
   slice and writes it to the shuffled output; slice 0 writes mean and rstd.

x is read twice. To find the second read in L2, launch 2 visits the units in the
reverse order of launch 1 (its first programs re-read what launch 1 read last),
and a plan may cut the units into ``waves`` (launch pairs over consecutive
units, ``first`` to ``first + count``), each small enough for L2 to hold.
"""
import triton
import triton.language as tl

from .forward import _pair_gates
from .plane_math import (as_acc, chunk_indices, gate, load_pair, merge_chunk_stats, merge_stats,
                         spatial_offsets, split_program, store_shuffled_pair)


@triton.jit
def shuffle_attention_forward_partials_kernel(
        x_ptr, part_ptr,
        C2, HW, W, num_jblocks, splits, slice_len, first, BC,
        x_sb, x_sc, x_sh, x_sw,
        BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr, X_FLAT: tl.constexpr, I64: tl.constexpr):
    b, j, jmask, q, qmask, s = split_program(first + tl.program_id(0), num_jblocks, splits, C2,
                                             BLOCK_J)
    x_base = b * x_sb
    zero = tl.zeros([BLOCK_J], part_ptr.dtype.element_ty)
    begin = s * slice_len
    end = tl.minimum(begin + slice_len, HW)
    mean0 = zero
    m20 = zero
    mean1 = zero
    m21 = zero
    for start in range(begin, end, BLOCK_HW):
        hw, hwmask, mask = chunk_indices(start, end, jmask, BLOCK_HW)
        x0, x1 = load_pair(x_ptr, x_base, j, C2, x_sc,
                           spatial_offsets(hw, W, x_sh, x_sw, X_FLAT, I64), mask, I64)
        n_a = as_acc(start - begin, zero)
        n_b = as_acc(tl.minimum(end - start, BLOCK_HW), zero)
        mean0, m20 = merge_chunk_stats(mean0, m20, n_a, x0.to(zero.dtype), mask, n_b)
        mean1, m21 = merge_chunk_stats(mean1, m21, n_a, x1.to(zero.dtype), mask, n_b)
    # part[k, s, b, c] (k = 0: slice mean, k = 1: its sum of squared deviations)
    at = part_ptr + s.to(tl.int64) * BC + b * (2 * C2) + j
    m2_at = at + splits.to(tl.int64) * BC
    tl.store(at, mean0, mask=jmask)
    tl.store(at + C2, mean1, mask=jmask)
    tl.store(m2_at, m20, mask=jmask)
    tl.store(m2_at + C2, m21, mask=jmask)


@triton.jit
def shuffle_attention_forward_apply_kernel(
        x_ptr, out_ptr, mean_ptr, rstd_ptr, part_ptr,
        cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr,
        C2, HW, W, HALF, eps_hi, eps_lo, num_jblocks, splits, slice_len, first, count, BC,
        x_sb, x_sc, x_sh, x_sw,
        o_sb, o_sc, o_sh, o_sw,
        BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr,
        X_FLAT: tl.constexpr, OUT_FLAT: tl.constexpr, OUT_INTERLEAVED: tl.constexpr,
        I64: tl.constexpr):
    # Reverse order: the first programs re-read the slices launch 1 read last.
    b, j, jmask, q, qmask, s = split_program(first + count - 1 - tl.program_id(0), num_jblocks,
                                             splits, C2, BLOCK_J)
    x_base = b * x_sb
    o_base = b * o_sb
    zero = tl.zeros([BLOCK_J], mean_ptr.dtype.element_ty)
    eps = as_acc(eps_hi, zero) + eps_lo
    plane = b * (2 * C2) + j
    mean0 = zero
    m20 = zero
    mean1 = zero
    m21 = zero
    for t in range(0, splits):  # slice order, the same in every program of the plane
        at = part_ptr + t * BC + plane
        m2_at = at + splits.to(tl.int64) * BC
        n_a = as_acc(t * slice_len, zero)
        n_b = as_acc(tl.minimum(slice_len, HW - t * slice_len), zero)
        mean0, m20 = merge_stats(mean0, m20, n_a, tl.load(at, mask=jmask, other=0.0),
                                 tl.load(m2_at, mask=jmask, other=0.0), n_b)
        mean1, m21 = merge_stats(mean1, m21, n_a, tl.load(at + C2, mask=jmask, other=0.0),
                                 tl.load(m2_at + C2, mask=jmask, other=0.0), n_b)
    rstd0, alpha0, beta0, rstd1, alpha1, beta1 = _pair_gates(
        j, jmask, C2, mean0, m20, mean1, m21, as_acc(HW, zero), eps,
        cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr, HALF)
    begin = s * slice_len
    end = tl.minimum(begin + slice_len, HW)
    for start in range(begin, end, BLOCK_HW):
        hw, hwmask, mask = chunk_indices(start, end, jmask, BLOCK_HW)
        x0, x1 = load_pair(x_ptr, x_base, j, C2, x_sc,
                           spatial_offsets(hw, W, x_sh, x_sw, X_FLAT, I64), mask, I64)
        y0 = gate(x0.to(zero.dtype), mean0, alpha0, beta0)
        y1 = gate(x1.to(zero.dtype), mean1, alpha1, beta1)
        store_shuffled_pair(out_ptr, o_base, j, q, o_sc,
                            spatial_offsets(hw, W, o_sh, o_sw, OUT_FLAT, I64),
                            mask, qmask, hwmask, y0, y1, OUT_INTERLEAVED, I64)
    if s == 0:
        tl.store(mean_ptr + plane, mean0, mask=jmask)
        tl.store(mean_ptr + plane + C2, mean1, mask=jmask)
        tl.store(rstd_ptr + plane, rstd0, mask=jmask)
        tl.store(rstd_ptr + plane + C2, rstd1, mask=jmask)
