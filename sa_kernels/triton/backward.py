"""The Shuffle Attention backward kernel: dx and the per-plane partial sums, one launch.

Same program-to-plane mapping as the forward (``plane_math``). Nothing but x,
grad_out and the saved (B, C) mean/rstd is read: the gate is recomputed. Per
plane, with s the gate, dt = dy * x * s * (1 - s), xhat = (x - mean) * rstd:

    S1 = sum(dt), S2 = sum(dt * xhat)
    dx = dy * s + alpha * dt + kc * S1 / N - alpha * xhat * S2 / N

(kc = cweight on channel planes, where alpha = 0; kc = -alpha on spatial ones).
The partials go to ``ws`` (2, B, C): ws[0] = S1, ws[1] = S2 on spatial planes and
S1 * mean on channel planes (what dcweight sums); ``param_grads`` reduces them.

VEC: HW and the sample and channel strides arrive divided by VEC (``times_vec``).

CHUNKED = False: x and dy of the whole plane stay in registers (read once, dx
written once). CHUNKED = True: sweep 1 accumulates S1, S2 chunk by chunk, sweep
2 re-reads x and dy and writes dx.
"""
import triton
import triton.language as tl

from .plane_math import (as_acc, chunk_indices, gate_coefficients, gate_grad, load_pair,
                         load_shuffled_pair, program_planes, spatial_offsets, store_pair,
                         times_vec)


@triton.jit
def _dx(dys, dt, xhat, alpha, k0, k1):
    return dys + alpha[:, None] * dt + k0[:, None] + k1[:, None] * xhat


@triton.jit
def _chunk_grads(start, HW, W, C2, j, jmask, q, qmask, x_ptr, x_base, x_sc, x_sh, x_sw,
                 dy_ptr, dy_base, dy_sc, dy_sh, dy_sw, mean0, rstd0, alpha0, beta0,
                 mean1, rstd1, alpha1, beta1, BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr,
                 X_FLAT: tl.constexpr, DY_FLAT: tl.constexpr, DY_INTERLEAVED: tl.constexpr,
                 I64: tl.constexpr):
    """x and grad_out of the pair's chunk at ``start``, through the gate: (hw, mask, and
    dy * s, dt, xhat for each of the two planes), in the statistics' dtype."""
    acc = mean0.dtype
    hw, hwmask, mask = chunk_indices(start, HW, jmask, BLOCK_HW)
    x0, x1 = load_pair(x_ptr, x_base, j, C2, x_sc,
                       spatial_offsets(hw, W, x_sh, x_sw, X_FLAT, I64), mask, I64)
    dy0, dy1 = load_shuffled_pair(dy_ptr, dy_base, j, q, dy_sc,
                                  spatial_offsets(hw, W, dy_sh, dy_sw, DY_FLAT, I64),
                                  mask, qmask, hwmask, BLOCK_J, BLOCK_HW, DY_INTERLEAVED, I64)
    dys0, dt0, xhat0 = gate_grad(x0.to(acc), dy0.to(acc), mean0, rstd0, alpha0, beta0)
    dys1, dt1, xhat1 = gate_grad(x1.to(acc), dy1.to(acc), mean1, rstd1, alpha1, beta1)
    return hw, mask, dys0, dt0, xhat0, dys1, dt1, xhat1


@triton.jit
def shuffle_attention_backward_kernel(
        dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, ws_ptr,
        cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr,
        C2, HW, W, HALF, num_jblocks, ws_stride,
        x_sb, x_sc, x_sh, x_sw,
        dy_sb, dy_sc, dy_sh, dy_sw,
        dx_sb, dx_sc, dx_sh, dx_sw,
        BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr, CHUNKED: tl.constexpr,
        X_FLAT: tl.constexpr, DY_FLAT: tl.constexpr, DX_FLAT: tl.constexpr,
        DY_INTERLEAVED: tl.constexpr, I64: tl.constexpr, VEC: tl.constexpr):
    # HW and the sample and channel strides arrive divided by VEC (see times_vec).
    HW = times_vec(HW, VEC)
    x_sb = times_vec(x_sb, VEC)
    x_sc = times_vec(x_sc, VEC)
    dy_sb = times_vec(dy_sb, VEC)
    dy_sc = times_vec(dy_sc, VEC)
    dx_sb = times_vec(dx_sb, VEC)
    dx_sc = times_vec(dx_sc, VEC)
    b, j, jmask, q, qmask = program_planes(num_jblocks, C2, BLOCK_J)
    x_base = b * x_sb
    dy_base = b * dy_sb
    dx_base = b * dx_sb
    stats = b * (2 * C2) + j
    mean0 = tl.load(mean_ptr + stats, mask=jmask, other=0.0)
    mean1 = tl.load(mean_ptr + stats + C2, mask=jmask, other=0.0)
    rstd0 = tl.load(rstd_ptr + stats, mask=jmask, other=0.0)
    rstd1 = tl.load(rstd_ptr + stats + C2, mask=jmask, other=0.0)
    alpha0, beta0, kc0, sp0 = gate_coefficients(j, jmask, mean0, rstd0, cw_ptr, cb_ptr, sw_ptr,
                                                sb_ptr, gw_ptr, gb_ptr, HALF)
    alpha1, beta1, kc1, sp1 = gate_coefficients(j + C2, jmask, mean1, rstd1, cw_ptr, cb_ptr,
                                                sw_ptr, sb_ptr, gw_ptr, gb_ptr, HALF)
    acc = mean0.dtype
    inv_n = 1.0 / as_acc(HW, mean0)

    if CHUNKED:
        s1_0 = tl.zeros([BLOCK_J], acc)
        s2_0 = tl.zeros([BLOCK_J], acc)
        s1_1 = tl.zeros([BLOCK_J], acc)
        s2_1 = tl.zeros([BLOCK_J], acc)
        for start in range(0, HW, BLOCK_HW):
            hw, mask, _, dt0, xhat0, _, dt1, xhat1 = _chunk_grads(
                start, HW, W, C2, j, jmask, q, qmask, x_ptr, x_base, x_sc, x_sh, x_sw,
                dy_ptr, dy_base, dy_sc, dy_sh, dy_sw, mean0, rstd0, alpha0, beta0,
                mean1, rstd1, alpha1, beta1, BLOCK_J, BLOCK_HW, X_FLAT, DY_FLAT, DY_INTERLEAVED, I64)
            s1_0 += tl.sum(dt0, axis=1)
            s2_0 += tl.sum(dt0 * xhat0, axis=1)
            s1_1 += tl.sum(dt1, axis=1)
            s2_1 += tl.sum(dt1 * xhat1, axis=1)
        k0_0 = kc0 * s1_0 * inv_n
        k1_0 = -alpha0 * s2_0 * inv_n
        k0_1 = kc1 * s1_1 * inv_n
        k1_1 = -alpha1 * s2_1 * inv_n
        for start in range(0, HW, BLOCK_HW):
            hw, mask, dys0, dt0, xhat0, dys1, dt1, xhat1 = _chunk_grads(
                start, HW, W, C2, j, jmask, q, qmask, x_ptr, x_base, x_sc, x_sh, x_sw,
                dy_ptr, dy_base, dy_sc, dy_sh, dy_sw, mean0, rstd0, alpha0, beta0,
                mean1, rstd1, alpha1, beta1, BLOCK_J, BLOCK_HW, X_FLAT, DY_FLAT, DY_INTERLEAVED, I64)
            store_pair(dx_ptr, dx_base, j, C2, dx_sc,
                       spatial_offsets(hw, W, dx_sh, dx_sw, DX_FLAT, I64), mask,
                       _dx(dys0, dt0, xhat0, alpha0, k0_0, k1_0),
                       _dx(dys1, dt1, xhat1, alpha1, k0_1, k1_1), I64)
    else:
        hw, mask, dys0, dt0, xhat0, dys1, dt1, xhat1 = _chunk_grads(
            0, HW, W, C2, j, jmask, q, qmask, x_ptr, x_base, x_sc, x_sh, x_sw,
            dy_ptr, dy_base, dy_sc, dy_sh, dy_sw, mean0, rstd0, alpha0, beta0,
            mean1, rstd1, alpha1, beta1, BLOCK_J, BLOCK_HW, X_FLAT, DY_FLAT, DY_INTERLEAVED, I64)
        s1_0 = tl.sum(dt0, axis=1)
        s2_0 = tl.sum(dt0 * xhat0, axis=1)
        s1_1 = tl.sum(dt1, axis=1)
        s2_1 = tl.sum(dt1 * xhat1, axis=1)
        store_pair(dx_ptr, dx_base, j, C2, dx_sc,
                   spatial_offsets(hw, W, dx_sh, dx_sw, DX_FLAT, I64), mask,
                   _dx(dys0, dt0, xhat0, alpha0, kc0 * s1_0 * inv_n, -alpha0 * s2_0 * inv_n),
                   _dx(dys1, dt1, xhat1, alpha1, kc1 * s1_1 * inv_n, -alpha1 * s2_1 * inv_n), I64)

    # Masked-off columns were loaded as dy = 0, so they add exactly 0 to S1 and S2.
    tl.store(ws_ptr + stats, s1_0, mask=jmask)
    tl.store(ws_ptr + stats + C2, s1_1, mask=jmask)
    tl.store(ws_ptr + ws_stride + stats, tl.where(sp0, s2_0, s1_0 * mean0), mask=jmask)
    tl.store(ws_ptr + ws_stride + stats + C2, tl.where(sp1, s2_1, s1_1 * mean1), mask=jmask)
