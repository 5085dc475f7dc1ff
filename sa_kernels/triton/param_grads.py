"""Second backward kernel: the six parameter gradients from the per-plane partials.

``ws`` (2, B, C) holds, per plane, S1 and (S2 on spatial planes, S1 * mean on
channel planes); viewed as (2, ROWS = B * G, 2 * half) matrices its rows are the
(batch, group) pairs and column k < half (k >= half) the channel (spatial)
branch's parameter k (k - half). Program (pid, chunk) owns parameters
``p in [pid * BLOCK_P, (pid + 1) * BLOCK_P)`` and rows
``[chunk * rows_per_chunk, (chunk + 1) * rows_per_chunk)``, summed in a fixed
order (row tiles in sequence, then one tree reduction), with no atomics, so the
gradients are bitwise identical run to run:

    dcweight = sum S1 * mean, dcbias = sum S1           (channel columns)
    dsbias = sum S1, dsweight = gn_weight * sum S2 + gn_bias * sum S1,
    dgn_weight = sweight * sum S2, dgn_bias = sweight * sum S1   (spatial columns)

FINAL = True: one chunk holds every row; the program writes the gradients.
FINAL = False (many rows, e.g. B * G = 4096 at G = 64): each chunk's four sums
go to row ``chunk`` of ``part`` (2, chunks, 2 * half), the same layout as
``ws``, and a second launch (FINAL, ROWS = chunks) reduces those in order.
"""
import triton
import triton.language as tl


@triton.jit
def shuffle_attention_param_grads_kernel(
        ws_ptr, part_ptr, sw_ptr, gw_ptr, gb_ptr,
        dcw_ptr, dcb_ptr, dsw_ptr, dsb_ptr, dgw_ptr, dgb_ptr,
        ROWS, HALF, ws_stride, rows_per_chunk, part_stride,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, FINAL: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HALF
    chunk = tl.program_id(1)
    r_begin = chunk * rows_per_chunk
    r_end = tl.minimum(r_begin + rows_per_chunk, ROWS)
    acc = ws_ptr.dtype.element_ty
    c_s1 = tl.zeros([BLOCK_R, BLOCK_P], acc)
    c_sm = tl.zeros([BLOCK_R, BLOCK_P], acc)
    s_s1 = tl.zeros([BLOCK_R, BLOCK_P], acc)
    s_s2 = tl.zeros([BLOCK_R, BLOCK_P], acc)
    for r0 in range(r_begin, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (r < r_end)[:, None] & pmask[None, :]
        at = ws_ptr + r[:, None] * (2 * HALF) + p[None, :]
        c_s1 += tl.load(at, mask=mask, other=0.0)
        c_sm += tl.load(at + ws_stride, mask=mask, other=0.0)
        s_s1 += tl.load(at + HALF, mask=mask, other=0.0)
        s_s2 += tl.load(at + ws_stride + HALF, mask=mask, other=0.0)
    c_s1_sum = tl.sum(c_s1, axis=0)
    c_sm_sum = tl.sum(c_sm, axis=0)
    s_s1_sum = tl.sum(s_s1, axis=0)
    s_s2_sum = tl.sum(s_s2, axis=0)
    if FINAL:
        sw = tl.load(sw_ptr + p, mask=pmask, other=0.0).to(acc)
        gw = tl.load(gw_ptr + p, mask=pmask, other=0.0).to(acc)
        gb = tl.load(gb_ptr + p, mask=pmask, other=0.0).to(acc)
        tl.store(dcw_ptr + p, c_sm_sum.to(dcw_ptr.dtype.element_ty), mask=pmask)
        tl.store(dcb_ptr + p, c_s1_sum.to(dcb_ptr.dtype.element_ty), mask=pmask)
        tl.store(dsw_ptr + p, (gw * s_s2_sum + gb * s_s1_sum).to(dsw_ptr.dtype.element_ty),
                 mask=pmask)
        tl.store(dsb_ptr + p, s_s1_sum.to(dsb_ptr.dtype.element_ty), mask=pmask)
        tl.store(dgw_ptr + p, (sw * s_s2_sum).to(dgw_ptr.dtype.element_ty), mask=pmask)
        tl.store(dgb_ptr + p, (sw * s_s1_sum).to(dgb_ptr.dtype.element_ty), mask=pmask)
    else:
        row = part_ptr + chunk.to(tl.int64) * (2 * HALF) + p
        tl.store(row, c_s1_sum, mask=pmask)
        tl.store(row + part_stride, c_sm_sum, mask=pmask)
        tl.store(row + HALF, s_s1_sum, mask=pmask)
        tl.store(row + part_stride + HALF, s_s2_sum, mask=pmask)
