"""The backward for split planes (see ``forward_split``): two launches, then ``param_grads``.

1. ``..._partials_kernel``: per unit (b, pair block, slice s), the slice's sums
   S1 = sum(dt) and (S2 = sum(dt * xhat) on spatial planes, S1 * mean on channel
   planes) into ``ws`` (2, splits, B, C). Viewed as (2, splits * B * G, 2 * half)
   that is the parameter-gradient reduction's input as it is (its rows are now
   (slice, batch, group) triples): the sums are linear, so nothing else is needed.
2. ``..._apply_kernel``: sums the plane's ``splits`` partials in slice order (the
   same in every program of the plane) and writes dx for its slice; units in the
   reverse order of launch 1, so that the first re-reads find x and grad_out in L2.

x and grad_out are read twice (5N bytes against the single-sweep kernel's 3N)
unless the second read hits L2; ``waves`` bound the distance between the reads.
"""
import triton
import triton.language as tl

from .backward import _chunk_grads, _dx
from .plane_math import as_acc, gate_coefficients, spatial_offsets, split_program, store_pair


@triton.jit
def _unit_gates(b, j, jmask, C2, HALF, mean_ptr, rstd_ptr,
                cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr):
    """The saved statistics and gate coefficients of the unit's planes (j and C2 + j)."""
    stats = b * (2 * C2) + j
    mean0 = tl.load(mean_ptr + stats, mask=jmask, other=0.0)
    mean1 = tl.load(mean_ptr + stats + C2, mask=jmask, other=0.0)
    rstd0 = tl.load(rstd_ptr + stats, mask=jmask, other=0.0)
    rstd1 = tl.load(rstd_ptr + stats + C2, mask=jmask, other=0.0)
    alpha0, beta0, kc0, sp0 = gate_coefficients(j, jmask, mean0, rstd0, cw_ptr, cb_ptr, sw_ptr,
                                                sb_ptr, gw_ptr, gb_ptr, HALF)
    alpha1, beta1, kc1, sp1 = gate_coefficients(j + C2, jmask, mean1, rstd1, cw_ptr, cb_ptr,
                                                sw_ptr, sb_ptr, gw_ptr, gb_ptr, HALF)
    return (stats, mean0, rstd0, alpha0, beta0, kc0, sp0,
            mean1, rstd1, alpha1, beta1, kc1, sp1)


@triton.jit
def shuffle_attention_backward_partials_kernel(
        dy_ptr, x_ptr, mean_ptr, rstd_ptr, ws_ptr,
        cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr,
        C2, HW, W, HALF, num_jblocks, splits, slice_len, first, BC,
        x_sb, x_sc, x_sh, x_sw,
        dy_sb, dy_sc, dy_sh, dy_sw,
        BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr,
        X_FLAT: tl.constexpr, DY_FLAT: tl.constexpr, DY_INTERLEAVED: tl.constexpr,
        I64: tl.constexpr):
    b, j, jmask, q, qmask, s = split_program(first + tl.program_id(0), num_jblocks, splits, C2,
                                             BLOCK_J)
    (stats, mean0, rstd0, alpha0, beta0, kc0, sp0,
     mean1, rstd1, alpha1, beta1, kc1, sp1) = _unit_gates(
        b, j, jmask, C2, HALF, mean_ptr, rstd_ptr, cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr)
    acc = mean0.dtype
    s1_0 = tl.zeros([BLOCK_J], acc)
    s2_0 = tl.zeros([BLOCK_J], acc)
    s1_1 = tl.zeros([BLOCK_J], acc)
    s2_1 = tl.zeros([BLOCK_J], acc)
    begin = s * slice_len
    end = tl.minimum(begin + slice_len, HW)
    for start in range(begin, end, BLOCK_HW):
        hw, mask, _, dt0, xhat0, _, dt1, xhat1 = _chunk_grads(
            start, end, W, C2, j, jmask, q, qmask, x_ptr, b * x_sb, x_sc, x_sh, x_sw,
            dy_ptr, b * dy_sb, dy_sc, dy_sh, dy_sw, mean0, rstd0, alpha0, beta0,
            mean1, rstd1, alpha1, beta1, BLOCK_J, BLOCK_HW, X_FLAT, DY_FLAT, DY_INTERLEAVED, I64)
        s1_0 += tl.sum(dt0, axis=1)
        s2_0 += tl.sum(dt0 * xhat0, axis=1)
        s1_1 += tl.sum(dt1, axis=1)
        s2_1 += tl.sum(dt1 * xhat1, axis=1)
    # ws[k, s, b, c]: k = 0 S1, k = 1 S2 (spatial) or S1 * mean (channel), as the backward's ws
    at = ws_ptr + s.to(tl.int64) * BC + stats
    k1_at = at + splits.to(tl.int64) * BC
    tl.store(at, s1_0, mask=jmask)
    tl.store(at + C2, s1_1, mask=jmask)
    tl.store(k1_at, tl.where(sp0, s2_0, s1_0 * mean0), mask=jmask)
    tl.store(k1_at + C2, tl.where(sp1, s2_1, s1_1 * mean1), mask=jmask)


@triton.jit
def shuffle_attention_backward_apply_kernel(
        dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, ws_ptr,
        cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr,
        C2, HW, W, HALF, num_jblocks, splits, slice_len, first, count, BC,
        x_sb, x_sc, x_sh, x_sw,
        dy_sb, dy_sc, dy_sh, dy_sw,
        dx_sb, dx_sc, dx_sh, dx_sw,
        BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr,
        X_FLAT: tl.constexpr, DY_FLAT: tl.constexpr, DX_FLAT: tl.constexpr,
        DY_INTERLEAVED: tl.constexpr, I64: tl.constexpr):
    b, j, jmask, q, qmask, s = split_program(first + count - 1 - tl.program_id(0), num_jblocks,
                                             splits, C2, BLOCK_J)
    (stats, mean0, rstd0, alpha0, beta0, kc0, sp0,
     mean1, rstd1, alpha1, beta1, kc1, sp1) = _unit_gates(
        b, j, jmask, C2, HALF, mean_ptr, rstd_ptr, cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr)
    acc = mean0.dtype
    s1_0 = tl.zeros([BLOCK_J], acc)
    k1s_0 = tl.zeros([BLOCK_J], acc)
    s1_1 = tl.zeros([BLOCK_J], acc)
    k1s_1 = tl.zeros([BLOCK_J], acc)
    for t in range(0, splits):  # slice order, the same in every program of the plane
        at = ws_ptr + t * BC + stats
        k1_at = at + splits.to(tl.int64) * BC
        s1_0 += tl.load(at, mask=jmask, other=0.0)
        s1_1 += tl.load(at + C2, mask=jmask, other=0.0)
        k1s_0 += tl.load(k1_at, mask=jmask, other=0.0)
        k1s_1 += tl.load(k1_at + C2, mask=jmask, other=0.0)
    # Channel planes (alpha = 0) hold S1 * mean where spatial ones hold S2: only S2 is used.
    s2_0 = tl.where(sp0, k1s_0, 0.0)
    s2_1 = tl.where(sp1, k1s_1, 0.0)
    inv_n = 1.0 / as_acc(HW, mean0)
    k0_0 = kc0 * s1_0 * inv_n
    k1_0 = -alpha0 * s2_0 * inv_n
    k0_1 = kc1 * s1_1 * inv_n
    k1_1 = -alpha1 * s2_1 * inv_n
    begin = s * slice_len
    end = tl.minimum(begin + slice_len, HW)
    for start in range(begin, end, BLOCK_HW):
        hw, mask, dys0, dt0, xhat0, dys1, dt1, xhat1 = _chunk_grads(
            start, end, W, C2, j, jmask, q, qmask, x_ptr, b * x_sb, x_sc, x_sh, x_sw,
            dy_ptr, b * dy_sb, dy_sc, dy_sh, dy_sw, mean0, rstd0, alpha0, beta0,
            mean1, rstd1, alpha1, beta1, BLOCK_J, BLOCK_HW, X_FLAT, DY_FLAT, DY_INTERLEAVED, I64)
        store_pair(dx_ptr, b * dx_sb, j, C2, dx_sc,
                   spatial_offsets(hw, W, dx_sh, dx_sw, DX_FLAT, I64), mask,
                   _dx(dys0, dt0, xhat0, alpha0, k0_0, k1_0),
                   _dx(dys1, dt1, xhat1, alpha1, k0_1, k1_1), I64)
