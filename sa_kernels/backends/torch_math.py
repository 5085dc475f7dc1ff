"""The torch backend: Shuffle Attention as per-plane fused math in plain PyTorch.

Runs on every device PyTorch supports; it is the CPU path and the fallback.
Every output plane is one input plane times a gate, so with the plane
statistics (mean, rstd) and the parameters folded into two numbers per plane,

    out[b, shuffled(c)] = x[b, c] * sigmoid(alpha[b, c] * (x[b, c] - mean[b, c]) + beta[b, c])

where channel-branch planes have alpha = 0, beta = cweight * mean + cbias and
spatial-branch planes have alpha = sweight * gn_weight * rstd,
beta = sweight * gn_bias + sbias. The channel shuffle is folded into the
output's indexing (a strided view), never materialised as a separate copy.

Only x and the (B, C) statistics are saved for backward; the backward is the
closed form below (see ``backward``), not autograd of the reference graph.
"""
import torch

from .._checks import acc_dtype


def unavailable_reason(device, build=True):
    return None


def _input_order(t):
    """(B, C, H, W) -> (B, 2, C/2, H, W): channel c = i * C/2 + j sits at [:, i, j]."""
    return t.unflatten(1, (2, t.shape[1] // 2))


def _shuffled_order(t):
    """An output-ordered tensor viewed in input order: output channel 2j + i holds input i * C/2 + j."""
    return t.unflatten(1, (t.shape[1] // 2, 2)).transpose(1, 2)


def _plane(v):
    """(B, C) per-plane values -> (B, C, 1, 1), broadcastable against x."""
    return v[:, :, None, None]


def _branches(v, groups):
    """(B, C) -> (B, G, 2, half): [:, :, 0] the channel branch, [:, :, 1] the spatial branch."""
    return v.view(v.shape[0], groups, 2, -1)


def _gate_coefficients(mean, rstd, params, groups):
    cweight, cbias, sweight, sbias, gn_weight, gn_bias = (p.to(mean.dtype) for p in params)
    m, r = _branches(mean, groups), _branches(rstd, groups)
    beta_c = cweight * m[:, :, 0] + cbias
    alpha_s = sweight * gn_weight * r[:, :, 1]
    beta_s = (sweight * gn_bias + sbias).expand_as(beta_c)
    alpha = torch.stack((torch.zeros_like(alpha_s), alpha_s), 2).view_as(mean)
    beta = torch.stack((beta_c, beta_s), 2).view_as(mean)
    return alpha, beta


def forward(x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps):
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    B, C = x.shape[:2]
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x)
    if x.numel() == 0:
        zeros = x.new_zeros((B, C), dtype=acc)
        return out, zeros, zeros.clone()
    xa = x.to(acc)  # a float32 copy for half-precision x only
    # Two-pass variance from the centred values, which the gate needs anyway (on CPU this
    # is also several times faster than torch.var_mean over small planes).
    mean = xa.mean(dim=(2, 3))
    centred = xa - mean[:, :, None, None]
    rstd = torch.rsqrt(centred.square().mean(dim=(2, 3)) + eps)
    alpha, beta = _gate_coefficients(mean, rstd, params, groups)
    gate = torch.addcmul(_plane(beta), centred, _plane(alpha)).sigmoid_()
    torch.mul(_input_order(xa), _input_order(gate), out=_shuffled_order(out))
    return out, mean, rstd


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
    B, C, H, W = x.shape
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return (dx,) + tuple(torch.zeros_like(p) for p in params)
    acc = mean.dtype
    n = H * W
    alpha, beta = _gate_coefficients(mean, rstd, params, groups)
    xa = x.to(acc)
    xc = xa - _plane(mean)
    s = torch.addcmul(_plane(beta), xc, _plane(alpha)).sigmoid_()
    # grad_out gathered into input channel order once (x's layout, accumulation dtype), so
    # everything below is plain 4-D elementwise work.
    dy = torch.empty_like(x, dtype=acc)
    _input_order(dy).copy_(_shuffled_order(grad_out))
    dy_s = dy.mul_(s)
    dt = dy_s * xa * s.neg_().add_(1)  # s is not needed after this: 1 - s in place
    s1 = dt.sum((2, 3))
    s2 = (dt * xc).sum((2, 3)) * rstd

    cweight_a = cweight.to(acc)
    s1_b, s2_b = _branches(s1, groups), _branches(s2, groups)
    alpha_s, rstd_s = _branches(alpha, groups)[:, :, 1], _branches(rstd, groups)[:, :, 1]
    k0 = torch.stack((cweight_a * s1_b[:, :, 0] / n, -alpha_s * s1_b[:, :, 1] / n), 2).view(B, C)
    k1 = torch.stack((torch.zeros_like(alpha_s), -alpha_s * rstd_s * s2_b[:, :, 1] / n), 2).view(B, C)
    dx.copy_(dy_s.addcmul_(dt, _plane(alpha)).add_(_plane(k0)).addcmul_(xc, _plane(k1)))

    # Fixed-order reductions over (batch, group): bitwise reproducible.
    sum_c = s1_b[:, :, 0].sum((0, 1))
    sum_cm = (s1_b[:, :, 0] * _branches(mean, groups)[:, :, 0]).sum((0, 1))
    sum_s1 = s1_b[:, :, 1].sum((0, 1))
    sum_s2 = s2_b[:, :, 1].sum((0, 1))
    sweight_a, gn_weight_a, gn_bias_a = (p.to(acc) for p in (sweight, gn_weight, gn_bias))
    grads = (
        sum_cm,                                   # cweight
        sum_c,                                    # cbias
        gn_weight_a * sum_s2 + gn_bias_a * sum_s1,  # sweight
        sum_s1,                                   # sbias
        sweight_a * sum_s2,                       # gn_weight
        sweight_a * sum_s1,                       # gn_bias
    )
    return (dx,) + tuple(g.to(p.dtype).view_as(p) for g, p in zip(grads, params))
