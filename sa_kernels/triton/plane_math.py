"""Device helpers shared by the Shuffle Attention Triton kernels.

Every kernel program owns a block of channel *pairs* of one sample: input
channels ``j`` and ``C/2 + j`` for ``j`` in the block. Their outputs are the
adjacent channels ``2j`` and ``2j + 1``, so a pair's output is one contiguous
run in channels_last memory. Tiles are ``[BLOCK_J, BLOCK_HW]``: one row per
plane, one column per spatial position; the ``*0`` / ``*1`` names are the
first / second channel of each pair.

All arithmetic is in the accumulation dtype: the dtype of the saved statistics
(float64 for float64 input, float32 otherwise).
"""
import triton
import triton.language as tl


@triton.jit
def program_planes(num_jblocks, C2, BLOCK_J: tl.constexpr):
    """This program's sample ``b`` (int64, so per-sample offsets never overflow) and
    pairs ``j`` (int32 [BLOCK_J]) with their mask; ``q``: the pairs' output channels
    2j, 2j + 1 in memory order ([2 * BLOCK_J]) with their mask."""
    pid = tl.program_id(0)
    b = (pid // num_jblocks).to(tl.int64)
    j0 = (pid % num_jblocks) * BLOCK_J
    j = j0 + tl.arange(0, BLOCK_J)
    q = 2 * j0 + tl.arange(0, 2 * BLOCK_J)
    return b, j, j < C2, q, q < 2 * C2


@triton.jit
def split_program(index, num_jblocks, splits, C2, BLOCK_J: tl.constexpr):
    """``program_planes`` for split planes: unit ``index`` = (b * num_jblocks + jblock) * splits
    + s owns slice ``s`` of the pairs' planes; returns (b, j, jmask, q, qmask, s)."""
    s = index % splits
    group = index // splits
    b = (group // num_jblocks).to(tl.int64)
    j0 = (group % num_jblocks) * BLOCK_J
    j = j0 + tl.arange(0, BLOCK_J)
    q = 2 * j0 + tl.arange(0, 2 * BLOCK_J)
    return b, j, j < C2, q, q < 2 * C2, s


@triton.jit
def chunk_indices(start, HW, jmask, BLOCK_HW: tl.constexpr):
    """Spatial indices ``hw`` of the chunk starting at ``start``, their mask, and the
    [BLOCK_J, BLOCK_HW] tile mask."""
    hw = start + tl.arange(0, BLOCK_HW)
    hwmask = hw < HW
    return hw, hwmask, jmask[:, None] & hwmask[None, :]


@triton.jit
def offset_index(i, I64: tl.constexpr):
    """Channel or spatial indices as offset operands: int64 when channels or a plane span 2**31 elements."""
    if I64:
        return i.to(tl.int64)
    else:
        return i


@triton.jit
def spatial_offsets(hw, W, s_h, s_w, FLAT: tl.constexpr, I64: tl.constexpr):
    """Memory offsets of flat spatial indices ``hw`` (h * W + w) in a plane with strides (s_h, s_w).

    FLAT: the plane is a single run of step ``s_w`` (NCHW, NHWC, H == 1 or W == 1;
    the host passes that step as ``s_w``), which avoids an integer division per
    element. Otherwise (e.g. ``x[:, :, ::2]``) h and w are split out.
    """
    hw = offset_index(hw, I64)
    if FLAT:
        return hw * s_w
    else:
        return (hw // W) * s_h + (hw % W) * s_w


@triton.jit
def load_pair(ptr, base, j, C2, s_c, hw_off, mask, I64: tl.constexpr):
    """Tiles of input-ordered channels j and C2 + j (x order)."""
    rows0 = ptr + base + offset_index(j, I64) * s_c
    rows1 = ptr + base + offset_index(j + C2, I64) * s_c
    t0 = tl.load(rows0[:, None] + hw_off[None, :], mask=mask, other=0.0)
    t1 = tl.load(rows1[:, None] + hw_off[None, :], mask=mask, other=0.0)
    return t0, t1


@triton.jit
def store_pair(ptr, base, j, C2, s_c, hw_off, mask, t0, t1, I64: tl.constexpr):
    """Stores tiles at input-ordered channels j and C2 + j (dx), cast to the tensor's dtype."""
    rows0 = ptr + base + offset_index(j, I64) * s_c
    rows1 = ptr + base + offset_index(j + C2, I64) * s_c
    tl.store(rows0[:, None] + hw_off[None, :], t0.to(ptr.dtype.element_ty), mask=mask)
    tl.store(rows1[:, None] + hw_off[None, :], t1.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_shuffled_pair(ptr, base, j, q, s_c, hw_off, mask, qmask, hwmask,
                       BLOCK_J: tl.constexpr, BLOCK_HW: tl.constexpr, INTERLEAVED: tl.constexpr,
                       I64: tl.constexpr):
    """Tiles at output channels 2j and 2j + 1 (grad_out), as [BLOCK_J, BLOCK_HW] each.

    INTERLEAVED (channels-fast memory): one load of the [BLOCK_HW, 2 * BLOCK_J]
    tile whose columns ``q`` are contiguous output channels, then split, so a
    warp reads one contiguous run instead of two stride-2 ones.
    """
    if INTERLEAVED:
        t = tl.load(ptr + base + offset_index(q, I64)[None, :] * s_c + hw_off[:, None],
                    mask=hwmask[:, None] & qmask[None, :], other=0.0)
        t0, t1 = tl.split(tl.reshape(t, [BLOCK_HW, BLOCK_J, 2]))
        return tl.trans(t0), tl.trans(t1)
    else:
        rows0 = ptr + base + offset_index(2 * j, I64) * s_c
        t0 = tl.load(rows0[:, None] + hw_off[None, :], mask=mask, other=0.0)
        t1 = tl.load((rows0 + s_c)[:, None] + hw_off[None, :], mask=mask, other=0.0)
        return t0, t1


@triton.jit
def store_shuffled_pair(ptr, base, j, q, s_c, hw_off, mask, qmask, hwmask, y0, y1,
                        INTERLEAVED: tl.constexpr, I64: tl.constexpr):
    """Stores the pair's tiles at output channels 2j and 2j + 1 (the channel shuffle)."""
    if INTERLEAVED:
        y = tl.interleave(tl.trans(y0), tl.trans(y1))  # [BLOCK_HW, 2 * BLOCK_J], columns = q
        tl.store(ptr + base + offset_index(q, I64)[None, :] * s_c + hw_off[:, None], y.to(ptr.dtype.element_ty),
                 mask=hwmask[:, None] & qmask[None, :])
    else:
        rows0 = ptr + base + offset_index(2 * j, I64) * s_c
        tl.store(rows0[:, None] + hw_off[None, :], y0.to(ptr.dtype.element_ty), mask=mask)
        tl.store((rows0 + s_c)[:, None] + hw_off[None, :], y1.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def times_vec(v, VEC: tl.constexpr):
    """A size or stride the host passed divided by VEC, restored: the compiler then knows
    it is a multiple of VEC, so plane rows start on VEC-element (16-byte) boundaries and
    their loads and stores can be vectors (14x14 planes: 196 elements, not a multiple of
    16, which is all Triton's own specialisation recognises)."""
    return v * VEC


@triton.jit
def as_acc(v, like):
    """A kernel scalar argument (int or float) as a scalar of ``like``'s dtype.

    Written as an addition rather than ``.to`` because scalar arguments equal to 1
    are specialised into constants (and stay Python numbers in the interpreter).
    """
    return tl.zeros([], like.dtype) + v


@triton.jit
def reciprocal_sqrt(v):
    # IEEE-rounded square root: sqrt_rn for float32, the float64 sqrt is already exact.
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return 1.0 / tl.sqrt_rn(v)


@triton.jit
def sigmoid(z):
    # exp of -|z| only: never overflows, and keeps the small tail's relative accuracy.
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0, r, e * r)


@triton.jit
def merge_stats(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s pairwise merge of (count, mean, sum of squared deviations) statistics.
    With n_a = 0 the result is exactly (mean_b, m2_b)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return mean, m2


@triton.jit
def merge_chunk_stats(mean_a, m2_a, n_a, x, mask, n_b):
    """Running per-row statistics (n_a, mean_a, m2_a) merged with one chunk (``merge_stats``).

    ``x`` a [rows, BLOCK_HW] chunk with ``n_b`` valid columns (masked ones hold 0).
    The chunk's own M2 is taken around the chunk mean (two passes over registers),
    never as E[x^2] - E[x]^2. With n_a = 0 the result is exactly the chunk's.
    """
    mean_b = tl.sum(x, axis=1) / n_b
    d = tl.where(mask, x - mean_b[:, None], 0.0)
    m2_b = tl.sum(d * d, axis=1)
    return merge_stats(mean_a, m2_a, n_a, mean_b, m2_b, n_b)


@triton.jit
def gate_coefficients(c, cmask, mean, rstd, cw_ptr, cb_ptr, sw_ptr, sb_ptr, gw_ptr, gb_ptr, HALF):
    """Per-plane gate coefficients for input channels ``c`` ([BLOCK_J]).

    Returns (alpha, beta, kc, spatial): gate = sigmoid(alpha * (x - mean) + beta);
    channel planes alpha = 0, beta = cweight * mean + cbias; spatial planes
    alpha = sweight * gn_weight * rstd, beta = sweight * gn_bias + sbias.
    kc multiplies S1 / N in dx: cweight on channel planes, -alpha on spatial ones.
    """
    k = c % (2 * HALF)
    spatial = k >= HALF
    p = tl.where(spatial, k - HALF, k)
    cm = cmask & (k < HALF)
    sm = cmask & spatial
    cw = tl.load(cw_ptr + p, mask=cm, other=0.0).to(mean.dtype)
    cb = tl.load(cb_ptr + p, mask=cm, other=0.0).to(mean.dtype)
    sw = tl.load(sw_ptr + p, mask=sm, other=0.0).to(mean.dtype)
    sb = tl.load(sb_ptr + p, mask=sm, other=0.0).to(mean.dtype)
    gw = tl.load(gw_ptr + p, mask=sm, other=0.0).to(mean.dtype)
    gb = tl.load(gb_ptr + p, mask=sm, other=0.0).to(mean.dtype)
    alpha = tl.where(spatial, sw * gw * rstd, 0.0)
    beta = tl.where(spatial, sw * gb + sb, cw * mean + cb)
    kc = tl.where(spatial, -alpha, cw)
    return alpha, beta, kc, spatial


@triton.jit
def gate(x, mean, alpha, beta):
    """x * sigmoid(alpha * (x - mean) + beta) on a tile, per-row coefficients."""
    return x * sigmoid(alpha[:, None] * (x - mean[:, None]) + beta[:, None])


@triton.jit
def gate_grad(x, dy, mean, rstd, alpha, beta):
    """(dy * s, dt, xhat) on a tile: s the gate, dt = dy * x * s * (1 - s), xhat = (x - mean) * rstd."""
    xc = x - mean[:, None]
    s = sigmoid(alpha[:, None] * xc + beta[:, None])
    dys = dy * s
    dt = dys * x * (1.0 - s)
    return dys, dt, xc * rstd[:, None]
