"""The Shuffle Attention forward kernel: one launch, x read once (single sweep), out written once.

Program ``pid`` owns sample ``b = pid // num_jblocks`` and the channel pairs
``j in [j0, j0 + BLOCK_J)`` (input channels j and C/2 + j, see ``plane_math``).
It computes each plane's mean and rstd, writes them to the (B, C) statistics,
and writes ``x * gate`` to the shuffled output channels 2j and 2j + 1.

VEC: HW and the sample and channel strides arrive divided by VEC (``times_vec``).

CHUNKED = False: the whole plane is one [BLOCK_J, BLOCK_HW >= H*W] tile held in
registers; x is read once. CHUNKED = True (planes too large for that): sweep 1
merges per-chunk statistics (Chan et al.), sweep 2 re-reads x, gates and writes.
"""
import triton
import triton.language as tl

from .plane_math import (as_acc, chunk_indices, gate, gate_coefficients, load_pair,
                         merge_chunk_stats, program_planes, reciprocal_sqrt, spatial_offsets,
                         store_shuffled_pair, times_vec)


@triton.jit
def _pair_gates(j, jmask, C2, mean0, m20, mean1, m21, n, eps,
                cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr, HALF):
    """rstd and gate coefficients of the pair's planes (channels j and C2 + j) from their statistics."""
    rstd0 = reciprocal_sqrt(m20 / n + eps)
    rstd1 = reciprocal_sqrt(m21 / n + eps)
    alpha0, beta0, _, _ = gate_coefficients(j, jmask, mean0, rstd0, cw_ptr, cb_ptr, sw_ptr,
                                            sb_ptr, gw_ptr, gb_ptr, HALF)
    alpha1, beta1, _, _ = gate_coefficients(j + C2, jmask, mean1, rstd1, cw_ptr, cb_ptr, sw_ptr,
                                            sb_ptr, gw_ptr, gb_ptr, HALF)
    return rstd0, alpha0, beta0, rstd1, alpha1, beta1


@triton.jit
def shuffle_attention_forward_kernel(
        x_ptr, out_ptr, mean_ptr, rstd_ptr,
        cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr,
        C2, HW, W, HALF, eps_hi, eps_lo, num_jblocks,
        x_sb, x_sc, x_sh, x_sw,
        o_sb, o_sc, o_sh, o_sw,
        BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr, CHUNKED: tl.constexpr,
        X_FLAT: tl.constexpr, OUT_FLAT: tl.constexpr, OUT_INTERLEAVED: tl.constexpr,
        I64: tl.constexpr, VEC: tl.constexpr):
    # HW and the sample and channel strides arrive divided by VEC (see times_vec).
    HW = times_vec(HW, VEC)
    x_sb = times_vec(x_sb, VEC)
    x_sc = times_vec(x_sc, VEC)
    o_sb = times_vec(o_sb, VEC)
    o_sc = times_vec(o_sc, VEC)
    b, j, jmask, q, qmask = program_planes(num_jblocks, C2, BLOCK_J)
    x_base = b * x_sb
    o_base = b * o_sb
    zero = tl.zeros([BLOCK_J], mean_ptr.dtype.element_ty)
    n = as_acc(HW, zero)
    eps = as_acc(eps_hi, zero) + eps_lo  # eps split in two float32 halves: exact enough for float64

    if CHUNKED:
        mean0 = zero
        m20 = zero
        mean1 = zero
        m21 = zero
        for start in range(0, HW, BLOCK_HW):
            hw, hwmask, mask = chunk_indices(start, HW, jmask, BLOCK_HW)
            x0, x1 = load_pair(x_ptr, x_base, j, C2, x_sc,
                               spatial_offsets(hw, W, x_sh, x_sw, X_FLAT, I64), mask, I64)
            n_a = as_acc(start, zero)
            n_b = as_acc(tl.minimum(HW - start, BLOCK_HW), zero)
            mean0, m20 = merge_chunk_stats(mean0, m20, n_a, x0.to(zero.dtype), mask, n_b)
            mean1, m21 = merge_chunk_stats(mean1, m21, n_a, x1.to(zero.dtype), mask, n_b)
        rstd0, alpha0, beta0, rstd1, alpha1, beta1 = _pair_gates(
            j, jmask, C2, mean0, m20, mean1, m21, n, eps,
            cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr, HALF)
        for start in range(0, HW, BLOCK_HW):
            hw, hwmask, mask = chunk_indices(start, HW, jmask, BLOCK_HW)
            x0, x1 = load_pair(x_ptr, x_base, j, C2, x_sc,
                               spatial_offsets(hw, W, x_sh, x_sw, X_FLAT, I64), mask, I64)
            y0 = gate(x0.to(zero.dtype), mean0, alpha0, beta0)
            y1 = gate(x1.to(zero.dtype), mean1, alpha1, beta1)
            store_shuffled_pair(out_ptr, o_base, j, q, o_sc,
                                spatial_offsets(hw, W, o_sh, o_sw, OUT_FLAT, I64),
                                mask, qmask, hwmask, y0, y1, OUT_INTERLEAVED, I64)
    else:
        hw, hwmask, mask = chunk_indices(0, HW, jmask, BLOCK_HW)
        x0, x1 = load_pair(x_ptr, x_base, j, C2, x_sc,
                           spatial_offsets(hw, W, x_sh, x_sw, X_FLAT, I64), mask, I64)
        x0 = x0.to(zero.dtype)
        x1 = x1.to(zero.dtype)
        mean0, m20 = merge_chunk_stats(zero, zero, 0.0, x0, mask, n)
        mean1, m21 = merge_chunk_stats(zero, zero, 0.0, x1, mask, n)
        rstd0, alpha0, beta0, rstd1, alpha1, beta1 = _pair_gates(
            j, jmask, C2, mean0, m20, mean1, m21, n, eps,
            cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr, HALF)
        y0 = gate(x0, mean0, alpha0, beta0)
        y1 = gate(x1, mean1, alpha1, beta1)
        store_shuffled_pair(out_ptr, o_base, j, q, o_sc,
                            spatial_offsets(hw, W, o_sh, o_sw, OUT_FLAT, I64),
                            mask, qmask, hwmask, y0, y1, OUT_INTERLEAVED, I64)

    stats = b * (2 * C2) + j
    tl.store(mean_ptr + stats, mean0, mask=jmask)
    tl.store(mean_ptr + stats + C2, mean1, mask=jmask)
    tl.store(rstd_ptr + stats, rstd0, mask=jmask)
    tl.store(rstd_ptr + stats + C2, rstd1, mask=jmask)
