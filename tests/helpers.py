"""Test helpers shared by every backend's tests: random modules, the float64 reference, tolerances."""
import os
import socket

import torch

import sa_kernels

# Elementwise tolerances for out and dx against the float64 reference run on the same
# (rounded) inputs. Half-precision results are computed in float32 and rounded once on
# store, so they sit within about one unit of their format's rounding.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

# Parameter gradients are float32 (float64) sums over B * G * H * W exact products, so
# they stay close even for half-precision x: compared by relative error of the norm,
# plus one rounding of the gradient's own dtype when parameters are half precision.
PARAM_GRAD_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-5,
    torch.bfloat16: 2e-5,
}
ROUNDING_RTOL = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}

PARAM_NAMES = ("cweight", "cbias", "sweight", "sbias", "gn.weight", "gn.bias")


def random_reference(channel, G, device="cpu", dtype=torch.float32):
    """A reference module whose six parameters are random (the defaults would zero two branches)."""
    ref = sa_kernels.ShuffleAttention(channel, G=G).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.8 + 0.2)
    return ref


def random_input(shape, dtype, device, memory_format=torch.contiguous_format):
    """Non-zero-mean, non-unit-scale random input, so centring and scaling are exercised."""
    x = torch.randn(shape, device=device, dtype=torch.float64) * 1.7 + 0.6
    return x.to(dtype).contiguous(memory_format=memory_format)


def reference_outputs(ref, x, dy):
    """Forward and all gradients of the reference in float64 on x's (already rounded) values."""
    ref64 = _float64_copy(ref)
    x64 = x.detach().to(torch.float64).requires_grad_()
    out = ref64(x64)
    out.backward(dy.to(torch.float64))
    return out.detach(), x64.grad, {n: p.grad for n, p in ref64.named_parameters()}


def fused_outputs(fused, x, dy):
    x = x.detach().requires_grad_()  # the same storage, strides and alignment as given
    fused.zero_grad(set_to_none=True)
    out = fused(x)
    out.backward(dy)
    return out.detach(), x.grad, {n: p.grad for n, p in fused.named_parameters()}


def assert_matches_reference(ref, fused, x, dy=None):
    """Forward, dx and all six parameter gradients of ``fused`` against the float64 reference."""
    if dy is None:
        dy = random_input(x.shape, x.dtype, x.device)
    results = fused_outputs(fused, x, dy)
    assert_close_to_reference(ref, x, dy, results)
    return results


def assert_close_to_reference(ref, x, dy, results):
    """``results`` = (out, dx, {name: grad}) of a fused run on (x, dy), against the float64 reference."""
    out, dx, grads = results
    ref_out, ref_dx, ref_grads = reference_outputs(ref, x, dy)
    tol = TOLERANCES[x.dtype]
    assert out.dtype == x.dtype and dx.dtype == x.dtype
    torch.testing.assert_close(out.to(torch.float64), ref_out, **tol, msg=lambda m: f"forward: {m}")
    torch.testing.assert_close(dx.to(torch.float64), ref_dx, **tol, msg=lambda m: f"dx: {m}")
    for name in PARAM_NAMES:
        rtol = PARAM_GRAD_RTOL[x.dtype] + ROUNDING_RTOL[grads[name].dtype]
        assert_rel_close(grads[name], ref_grads[name], rtol, name)


def assert_rel_close(actual, expected, rtol, what=""):
    """‖actual − expected‖ ≤ rtol · ‖expected‖, plus a floor for gradients that are zero in exact
    arithmetic (gn_weight on 1x1 planes), where the float64 reference leaves ~1e-12 of rounding."""
    assert actual is not None, f"{what}: no gradient"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.to(torch.float64) - expected).norm().item()
    scale = expected.norm().item()
    assert err <= rtol * scale + 1e-10, f"{what}: relative error {err / max(scale, 1e-300):.3e} > {rtol}"


def naive_shuffle_attention(x, ref):
    """The issue's semantics read plane by plane: slow, obviously right, independent of the reference."""
    B, C, H, W = x.shape
    G = ref.G
    half = C // (2 * G)
    out = torch.empty_like(x)
    for b in range(B):
        for c in range(C):
            plane = x[b, c]
            k = c % (2 * half)
            mean = plane.mean()
            if k < half:
                gate = torch.sigmoid(ref.cweight.flatten()[k] * mean + ref.cbias.flatten()[k])
            else:
                p = k - half
                xhat = (plane - mean) / torch.sqrt(plane.var(unbiased=False) + ref.gn.eps)
                gn = ref.gn.weight[p] * xhat + ref.gn.bias[p]
                gate = torch.sigmoid(ref.sweight.flatten()[p] * gn + ref.sbias.flatten()[p])
            i, j = divmod(c, C // 2)
            out[b, 2 * j + i] = plane * gate
    return out


def _float64_copy(module):
    ref64 = sa_kernels.ShuffleAttention(module.channel, G=module.G).to(torch.float64)
    ref64.to(module.cweight.device)
    ref64.load_state_dict({k: v.to(torch.float64) for k, v in module.state_dict().items()})
    ref64.gn.eps = module.gn.eps
    return ref64


def gloo_on_loopback():
    """Point gloo at the loopback interface (in a worker process): without it gloo uses the
    address the hostname resolves to, which on some machines is unreachable."""
    names = [name for _, name in socket.if_nameindex()]
    interface = next((n for n in ("lo", "lo0") if n in names), None)
    if interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface


def force_torch_own_ops(monkeypatch):
    """The torch backend's forward on contiguous planes with its own ops, not GroupNorm's kernel
    (torch_math._forward_path chooses by size; the test shapes mostly take GroupNorm's)."""
    from sa_kernels.backends import torch_math
    monkeypatch.setattr(torch_math, "_forward_path", lambda x: (
        torch_math._forward_branches if torch_math._planes_contiguous(x) else torch_math._forward_planes))

