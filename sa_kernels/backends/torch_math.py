"""The torch backend: Shuffle Attention as per-plane fused math in plain PyTorch.

Runs on every device PyTorch supports: the fallback where no native kernel is built, and
the path of devices that have none. Every output plane is one input plane times a gate,

    out[b, shuffled(c)] = x[b, c] * sigmoid(alpha[b, c] * (x[b, c] - mean[b, c]) + beta[b, c])

where channel-branch planes have alpha = 0, beta = cweight * mean + cbias (one gate per
plane) and spatial-branch planes have alpha = sweight * gn_weight * rstd,
beta = sweight * gn_bias + sbias.

Each eager op is a pass over memory, so the passes are what is kept few:
* On a CPU the batch is taken a chunk of images at a time (``CHUNK_ELEMENTS``): a chunk's
  accumulation-dtype temporaries stay in cache from one op to the next, where whole-tensor
  temporaries of half-precision input were twice its size in memory, op after op.
* Where each plane is a contiguous run (NCHW, and 1x1 planes in any layout), the branches
  are computed on their own views: a channel-branch plane is one multiply by its gate, and
  only spatial-branch planes pay for the sigmoid. In channels-last memory a branch's
  channels are runs of ``half`` values (4 at G = 64, C = 512): too short for an op's inner
  loop, so there every plane takes the spatial form (alpha = 0 on channel planes).
* The channel shuffle is folded into the final store. On a CPU, channels_last output pairs
  (channels 2j and 2j + 1 side by side) are written as complex numbers (``torch.complex``),
  whose loop runs along j: a strided copy there iterates over pairs of two elements.

Only x and the (B, C) statistics are saved for backward; the backward is the closed form
in ``backward``, not autograd of the reference graph.
"""
import torch

from .._checks import acc_dtype

# Elements of x per chunk of images on a CPU (at least one image). A chunk is about a dozen
# ops, so per-op overhead stays small against its work; its float32 temporaries (3 to 4 times
# its size in bytes) stay within a core's L2 or the L3 of today's CPUs. Other devices take the
# batch whole: a chunk there costs a dozen kernel launches.
CHUNK_ELEMENTS = 1 << 19


def unavailable_reason(device, build=True):
    return None


def _input_order(t):
    """(B, C, H, W) -> (B, 2, C/2, H, W): channel c = i * C/2 + j sits at [:, i, j]."""
    return t.view(t.shape[0], 2, -1, *t.shape[2:])


def _shuffled_order(t):
    """An output-ordered tensor viewed in input order: output channel 2j + i holds input i * C/2 + j."""
    return t.view(t.shape[0], -1, 2, *t.shape[2:]).transpose(1, 2)


def _plane(v):
    """Per-plane values (..., C) -> (..., C, 1, 1), broadcastable against planes."""
    return v[..., None, None]


def _branches(t, groups):
    """(B, C, ...) -> (channel branch, spatial branch), each (B, G, half, ...)."""
    return t.view(t.shape[0], groups, 2, -1, *t.shape[2:]).unbind(2)


def _planes_contiguous(t):
    H, W = t.shape[2:]
    return (W == 1 or t.stride(3) == 1) and (H == 1 or t.stride(2) == W)


def _pixel_rows(t):
    """A channels-last (B, C, H, W) tensor as its (B * H * W, C) rows, or None if it is not one."""
    rows = t.permute(0, 2, 3, 1)
    return rows.view(-1, t.shape[1]) if rows.is_contiguous() else None


def _in_chunks(chunk, tensors, *args):
    """chunk(*tensors, *args) on chunks of images (slices of the batch) of about CHUNK_ELEMENTS."""
    x = tensors[0]
    per = max(1, CHUNK_ELEMENTS // x[0].numel())
    if per >= x.shape[0] or x.device.type != "cpu":
        chunk(*tensors, *args)
        return
    for b in range(0, x.shape[0], per):
        chunk(*(t[b:b + per] for t in tensors), *args)


class _Constants:
    """The parameters in the accumulation dtype, and the spatial gate's per-channel factors."""

    def __init__(self, params, acc):
        # Flat: the ops take parameters of any shape with half elements ((1, half, 1, 1) too).
        self.cweight, self.cbias, self.sweight, self.sbias, self.gn_weight, self.gn_bias = (
            (p if p.dtype == acc else p.to(acc)).reshape(-1) for p in params)
        self.scale = self.sweight * self.gn_weight                  # alpha = scale * rstd
        self.shift = torch.addcmul(self.sbias, self.sweight, self.gn_bias)  # beta of spatial planes


def _store_shuffled(out, y):
    """out[:, 2j + i] = y[:, i * C/2 + j] (y in the accumulation dtype, out in x's)."""
    # Measured on CPUs only; elsewhere the strided copy.
    rows_out, rows_y = (_pixel_rows(out), _pixel_rows(y)) if out.device.type == "cpu" else (None, None)
    if rows_out is None or rows_y is None:
        _shuffled_order(out).copy_(_input_order(y))
        return
    pairs = rows_y.chunk(2, 1)
    if out.dtype == y.dtype and rows_out.storage_offset() % 2 == 0:
        torch.complex(*pairs, out=torch.view_as_complex(rows_out.unflatten(1, (-1, 2))))
    else:  # no complex type of bfloat16: pairs in y's dtype, then one converting copy
        rows_out.copy_(torch.view_as_real(torch.complex(*pairs)).flatten(1))


def _load_shuffled(dy, grad_out):
    """dy[:, i * C/2 + j] = grad_out[:, 2j + i]: the upstream gradient in input channel order."""
    _input_order(dy).copy_(_shuffled_order(grad_out))


def forward(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps):
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x)
    mean = x.new_empty(x.shape[:2], dtype=acc)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return out, mean.zero_(), rstd.zero_()
    _in_chunks(_forward_path(x), (x, out, mean, rstd), _Constants(params, acc), groups, eps)
    return out, mean, rstd


# On a CPU, GroupNorm's kernel (_forward_groupnorm) costs more per plane than the ops of
# _forward_branches, and takes fewer ops: it is the faster path where planes are large or few.
# Measured, one thread of a 2-core AMD EPYC, calls of about 2^20 elements: 1.8 times as slow
# on 2x2 planes, 1.16 on 8x8, 1.03 to 1.05 on 14x14 and 16x16, even on 20x20; calls of 64
# planes 24 to 34% faster; the benchmark shapes of 28x28 and 56x56 planes 7 to 68% faster.
GROUPNORM_MIN_PLANE_ELEMENTS = 400
GROUPNORM_MAX_PLANES = 1024


def _forward_path(x):
    if not _planes_contiguous(x):
        return _forward_planes
    B, C, H, W = x.shape
    if x.device.type != "cpu" or H * W >= GROUPNORM_MIN_PLANE_ELEMENTS or B * C <= GROUPNORM_MAX_PLANES:
        return _forward_groupnorm  # elsewhere by op count: each op is a kernel launch
    return _forward_branches


def _gates(mean, rstd, k, groups):
    """(alpha, beta) per plane, the gate being sigmoid(alpha * (x - mean) + beta)."""
    alpha, beta = torch.zeros_like(mean), torch.empty_like(mean)
    (mc, _), (_, rs) = _branches(mean, groups), _branches(rstd, groups)
    (_, a_s), (b_c, b_s) = _branches(alpha, groups), _branches(beta, groups)
    torch.mul(k.scale, rs, out=a_s)
    torch.addcmul(k.cbias, k.cweight, mc, out=b_c)
    b_s.copy_(k.shift)
    return alpha, beta


# As the CPU kernels' kRecentre (csrc/torch_ops/cpu_kernels.h): planes whose first value lies
# more than 4 standard deviations from their mean take a second pass for their statistics.
RECENTRE = 16.0


def _shifted_moments(xa, mean, rstd, eps, sum_of_squares):
    """x less a value of its plane: t, and d = mean(t), the mean's offset from that value.

    Sets ``mean`` and ``rstd``, as the CPU kernels take them: t = x - first (the plane's first
    value, 0 where that is not finite), which keeps a constant plane's t exactly 0 (a plain
    mean in floating point need not equal the value it averages, and alpha = 316 x scale
    there); var = sum_of_squares(t) / N - d^2. Where the first value lies far from the mean (a
    ReLU map with one hot corner pixel) that var is lost to cancellation: those planes (on a
    CPU; elsewhere all) take a second pass about first + d (``_about``), its sum of squares as
    sum(u^2): vector_norm's float32 sums of squares, within 3e-7 of float64 on normal data,
    were 27 times less accurate than sum(u^2) on 96x96 planes holding one outlier."""
    n = xa.shape[2] * xa.shape[3]
    first = torch.nan_to_num(xa[:, :, 0, 0], nan=0.0, posinf=0.0, neginf=0.0)
    t = xa - _plane(first)
    d = t.mean((2, 3))
    torch.add(first, d, out=mean)
    var = sum_of_squares(t).div_(n).addcmul_(d, d, value=-1)
    if xa.device.type != "cpu":  # no test on the host there (a device synchronisation)
        e, var = _about(xa, mean, n)
        mean.add_(e)
        d = d + e
    else:
        far = d * d > RECENTRE * var
        if far.any():  # a CPU tensor: no synchronisation
            b, c = far.nonzero(as_tuple=True)
            e, var[b, c] = _about(xa[b, c], mean[b, c], n)
            mean[b, c] += e
            d[b, c] += e
    torch.rsqrt(var.clamp_min_(0).add_(eps), out=rstd)  # rounding may take var below 0; NaN stays
    return t, d


def _about(planes, m, n):
    """e = mean(x - m) and var = mean((x - m)^2) - e^2 over planes (..., H, W) about m (...):
    a second pass about an estimate m of the mean."""
    u = planes - _plane(m)
    # An infinite m (an infinity in the plane) makes e NaN (inf - inf): the mean stays m.
    e = torch.where(torch.isfinite(m), u.mean((-2, -1)), 0.0)
    return e, u.square().sum((-2, -1)).div_(n).addcmul_(e, e, value=-1)


def _forward_planes(x, out, mean, rstd, k, groups, eps):
    """Any layout: every plane gated as a spatial one (alpha = 0 on channel planes)."""
    xa = x if x.dtype == mean.dtype else x.to(mean.dtype)  # a copy for half-precision x only
    t, d = _shifted_moments(xa, mean, rstd, eps, lambda t: t.square().sum((2, 3)))
    alpha, beta = _gates(mean, rstd, k, groups)
    # alpha * (x - mean) + beta = alpha * t + (beta - alpha * d); channel planes (alpha = 0)
    # keep beta as it is (an infinite d would make 0 * d NaN).
    _, b_s = _branches(beta, groups)
    torch.addcmul(b_s, _branches(alpha, groups)[1], _branches(d, groups)[1], value=-1, out=b_s)
    gate = torch.addcmul(_plane(beta), t, _plane(alpha), out=t).sigmoid_()
    _store_shuffled(out, gate.mul_(xa))


def _forward_branches(x, out, mean, rstd, k, groups, eps):
    """Contiguous planes: channel-branch planes one multiply each, the sigmoid on spatial ones only."""
    xa = x if x.dtype == mean.dtype else x.to(mean.dtype)
    t, d = _shifted_moments(xa, mean, rstd, eps,
                            lambda t: torch.linalg.vector_norm(t, dim=(2, 3)).square_())
    (mc, _), (_, rs), (_, ds) = _branches(mean, groups), _branches(rstd, groups), _branches(d, groups)
    (xc, xs), (tc, ts) = _branches(xa, groups), _branches(t, groups)
    # Spatial planes: alpha * (x - mean) + beta = alpha * t + (beta - alpha * d), in place in t.
    alpha = k.scale * rs
    offset = torch.addcmul(k.shift, alpha, ds, value=-1)
    torch.addcmul(_plane(offset), ts, _plane(alpha), out=ts).sigmoid_().mul_(xs)
    constant = _constant_gates(k, mc)
    torch.mul(xc, _plane(constant), out=tc)
    _store_shuffled(out, t)


def _forward_groupnorm(x, out, mean, rstd, k, groups, eps):
    """Contiguous planes: statistics and normalised planes from one GroupNorm op (a group per
    plane), spatial gates from those; channel planes one multiply each."""
    B, C, H, W = x.shape
    # GroupNorm takes contiguous input: one copy of this chunk where the planes are contiguous
    # runs but the channels or images are not (sliced, permuted), as for half-precision x.
    # (x.to(memory_format=...) would return such an x itself.)
    xa = x if x.dtype == mean.dtype and x.is_contiguous() else \
        torch.empty_like(x, dtype=mean.dtype, memory_format=torch.contiguous_format).copy_(x)
    # Without weight and bias: GroupNorm's affine form x * a + (b - a * mean) rounds at the
    # size of a * x, where a constant plane must give exactly b (alpha = 316 x scale there).
    xhat, m, r = torch.native_group_norm(xa, None, None, B, C, H * W, C, eps)
    mean.copy_(m.view(B, C))
    rstd.copy_(r.view(B, C))
    (xc, xs), (zc, zs), (mc, _) = _branches(xa, groups), _branches(xhat, groups), _branches(mean, groups)
    # The channel planes' means pooled again: GroupNorm's Welford merges turn an infinite
    # mean into NaN (inf - inf), where the reference's average pooling keeps it.
    torch.mean(xc, (-2, -1), out=mc)
    torch.addcmul(_plane(k.shift), zs, _plane(k.scale), out=zs).sigmoid_().mul_(xs)
    torch.mul(xc, _plane(_constant_gates(k, mc)), out=zc)
    _store_shuffled(out, xhat)


def backward(grad_out, x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, mean, rstd, groups, eps):
    """Closed-form gradients.

    With s the gate and dt = dy * x * s * (1 - s) (the gradient at the gate's
    pre-activation), per plane S1 = sum(dt) and S2 = sum(dt * xhat),
    xhat = (x - mean) * rstd, N = H * W:

    * channel planes:  dx = dy * s + cweight * S1 / N
    * spatial planes:  dx = dy * s + alpha * (dt - S1 / N - xhat * S2 / N)

    and, summed over batch and groups, dcbias = S1, dcweight = S1 * mean on the
    channel planes; dsbias = S1, dsweight = gn_weight * S2 + gn_bias * S1,
    dgn_weight = sweight * S2, dgn_bias = sweight * S1 on the spatial planes.
    """
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return (dx,) + tuple(torch.zeros_like(p) for p in params)
    k = _Constants(params, mean.dtype)
    s1, s2 = torch.empty_like(mean), torch.empty_like(mean)
    chunk = _backward_branches if _planes_contiguous(x) else _backward_planes
    _in_chunks(chunk, (grad_out, x, dx, mean, rstd, s1, s2), k, groups)

    # Fixed-order reductions over (batch, group): bitwise reproducible.
    (s1c, s1s), (_, s2s), (mc, _) = _branches(s1, groups), _branches(s2, groups), _branches(mean, groups)
    dcweight, dcbias, dsbias, ds2 = torch.stack((s1c * mc, s1c, s1s, s2s)).sum((1, 2))
    grads = (
        dcweight,
        dcbias.clone(),  # one storage among the outputs: an op's outputs may not alias
        torch.addcmul(k.gn_weight * ds2, k.gn_bias, dsbias),  # sweight
        dsbias.clone(),
        k.sweight * ds2,                                     # gn_weight
        k.sweight * dsbias,                                  # gn_bias
    )
    return (dx,) + tuple(g if g.dtype == p.dtype and g.shape == p.shape else g.to(p.dtype).view_as(p)
                         for g, p in zip(grads, params))


def _constant_gates(k, mean_c):
    """sigmoid(cweight * mean + cbias): the one gate of each channel-branch plane."""
    return torch.addcmul(k.cbias, k.cweight, mean_c).sigmoid_()


def _through_the_gate(dy, x, centred, s, alpha, rstd, s1, s2):
    """Planes gated by s = sigmoid(alpha * (x - mean) + beta), in place: dy becomes
    dy * s + alpha * dt, with dt = dy * x * s * (1 - s) the gradient at the gate's argument;
    s1 = sum(dt) and s2 = rstd * sum(dt * (x - mean)) per plane."""
    dy.mul_(s)
    dt = torch.mul(dy, x)
    dt.addcmul_(dt, s, value=-1)
    torch.sum(dt, (-2, -1), out=s1)
    dy.addcmul_(dt, _plane(alpha))
    torch.sum(dt.mul_(centred), (-2, -1), out=s2).mul_(rstd)


def _gradient_buffer(dx, xa):
    """Where dx is built: dx itself where it has the accumulation dtype, else a buffer like xa."""
    return dx if dx.dtype == xa.dtype else torch.empty_like(xa)


def _backward_planes(grad_out, x, dx, mean, rstd, s1, s2, k, groups):
    """Any layout: every plane in the spatial form (alpha = 0 on channel planes)."""
    n = x.shape[2] * x.shape[3]
    xa = x if x.dtype == mean.dtype else x.to(mean.dtype)
    # Centred values, not x: S2 and dx's xhat term from x itself would lose digits to
    # cancellation on planes whose mean is large against their spread.
    centred = xa - _plane(mean)
    alpha, beta = _gates(mean, rstd, k, groups)
    f0, f1 = torch.empty_like(mean), torch.zeros_like(mean)
    (_, rs), (_, a_s) = _branches(rstd, groups), _branches(alpha, groups)
    s = torch.addcmul(_plane(beta), centred, _plane(alpha)).sigmoid_()
    dy = _gradient_buffer(dx, xa)
    _load_shuffled(dy, grad_out)
    _through_the_gate(dy, xa, centred, s, alpha, rstd, s1, s2)
    # dx = dy * s + alpha * dt + f1 * (x - mean) + f0: channel planes f0 = cweight * S1 / N;
    # spatial planes f0 = -alpha * S1 / N, f1 = -alpha * rstd * S2 / N.
    (s1c, s1s), (_, s2s) = _branches(s1, groups), _branches(s2, groups)
    (f0c, f0s), (_, f1s) = _branches(f0, groups), _branches(f1, groups)
    torch.mul(k.cweight, s1c, out=f0c).div_(n)
    torch.mul(a_s, s1s, out=f0s).div_(-n)
    torch.mul(a_s * rs, s2s, out=f1s).div_(-n)
    dy.addcmul_(centred, _plane(f1)).add_(_plane(f0))
    if dy is not dx:
        dx.copy_(dy)


def _backward_branches(grad_out, x, dx, mean, rstd, s1, s2, k, groups):
    """Contiguous planes: channel-branch planes take their closed form on their own views."""
    n = x.shape[2] * x.shape[3]
    xa = x if x.dtype == mean.dtype else x.to(mean.dtype)
    dy = _gradient_buffer(dx, xa)
    _load_shuffled(dy, grad_out)
    (mc, ms), (_, rs) = _branches(mean, groups), _branches(rstd, groups)
    (xc, xs), (yc, ys) = _branches(xa, groups), _branches(dy, groups)
    (s1c, s1s), (s2c, s2s) = _branches(s1, groups), _branches(s2, groups)

    # Channel planes: s constant, S1 = s * (1 - s) * sum(dy * x).
    constant = _constant_gates(k, mc)
    torch.sum(yc * xc, (-2, -1), out=s1c).mul_(constant).addcmul_(s1c, constant, value=-1)
    s2c.zero_()

    # Spatial planes.
    alpha = k.scale * rs
    centred = xs - _plane(ms)
    s = torch.addcmul(_plane(k.shift), centred, _plane(alpha)).sigmoid_()
    _through_the_gate(ys, xs, centred, s, alpha, rs, s1s, s2s)
    # dx = dy * s + alpha * dt - alpha * (S1 + xhat * S2) / N
    ys.addcmul_(centred, _plane(alpha * rs * s2s), value=-1.0 / n).sub_(_plane(alpha * s1s / n))

    # Channel planes: dx = dy * s + cweight * S1 / N.
    torch.addcmul(_plane(k.cweight * s1c / n), yc, _plane(constant), out=yc)
    if dy is not dx:
        dx.copy_(dy)
