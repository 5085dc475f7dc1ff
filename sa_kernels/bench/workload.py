"""The timed work: one module per provider, rotated random inputs, and the step each round runs."""
import os
import zlib

import torch
from torch import nn

from ..module import FusedShuffleAttention
from ..reference import ShuffleAttention
from .cases import PROVIDERS

# torch.compile's backend for the ``compile`` providers. Inductor is what is benchmarked; the
# unit tests set "eager" (Dynamo alone) to check the wiring without minutes of code generation.
COMPILE_BACKEND_ENV = "SA_KERNELS_BENCH_COMPILE_BACKEND"


def compile_backend():
    return os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


def case_seed(case_id):
    """A stable seed per case, so every provider of a case gets the same parameters and inputs."""
    return zlib.crc32(case_id.encode())


def reference_module(shape, dtype, device, seed):
    """The reference module with random parameters (its defaults would zero both gates' slopes)."""
    generator = torch.Generator().manual_seed(seed)
    module = ShuffleAttention(shape.channels, G=shape.groups)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.8 + 0.2)
    return module.to(device=device, dtype=dtype)


class CopyInput(nn.Module):
    """The ``copy`` yardstick: a plain ``copy_`` of x into a new tensor of its layout.

    A new tensor per call, as every provider allocates its output: the difference to a
    fused forward is then the fused op's own work.
    """

    def forward(self, x):
        return torch.empty_like(x).copy_(x)


def group_norm_module(shape, dtype, device, seed):
    """The ``groupnorm`` yardstick: ``nn.GroupNorm(G, C)`` with random affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    module = nn.GroupNorm(shape.groups, shape.channels)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.8 + 0.2)
    return module.to(device=device, dtype=dtype)


def build_module(provider, shape, dtype, device, seed):
    """The module ``provider`` runs: a yardstick, the reference, torch.compile of it, or the fused one."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "copy":
        return CopyInput()
    if provider == "groupnorm":
        return group_norm_module(shape, dtype, device, seed)
    reference = reference_module(shape, dtype, device, seed)
    if provider == "eager":
        return reference
    if provider == "compile":
        # A fresh Dynamo cache per case: every case compiles its own graph (in warm-up, or
        # read from Inductor's on-disk cache that a prewarm filled) instead of running into
        # the recompile limit and falling back to eager.
        torch._dynamo.reset()
        return torch.compile(reference, dynamic=False, backend=compile_backend())
    return FusedShuffleAttention.from_module(reference, backend=provider)


class InputRotation:
    """Round-robin over several input sets, so consecutive steps never find their inputs in cache."""

    def __init__(self, sets):
        if not sets:
            raise ValueError("InputRotation needs at least one input set")
        self.sets = list(sets)
        self._next = 0

    def __len__(self):
        return len(self.sets)

    def next(self):
        inputs = self.sets[self._next]
        self._next = (self._next + 1) % len(self.sets)
        return inputs

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for inputs in self.sets for t in inputs)


def random_buffer(dims, dtype, device, generator):
    """Non-zero-mean, non-unit-scale random values: never zeros, which can run faster than real data."""
    x = torch.randn(dims, generator=generator, device=device, dtype=torch.float32)
    return x.mul_(1.7).add_(0.6).to(dtype)


def make_inputs(case, device, count, seed):
    """``count`` input sets for ``case``: (x,) for forward, (x, dy) for forward+backward.

    The sets are copies of one random draw: rotation is about addresses (no set is still in
    cache when its turn comes), and copying is far cheaper than drawing each set. x requires
    grad in forward+backward mode, as an activation inside a network does.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    fmt = case.memory_format  # channels_last cases: x and dy both, as inside a network

    def copy(t):
        return t.clone(memory_format=fmt)
    x = random_buffer(case.shape.dims, case.dtype, device, generator)
    if case.mode == "forward":
        return InputRotation([(copy(x),) for _ in range(count)])
    dy = random_buffer(case.shape.dims, case.dtype, device, generator)
    return InputRotation([(copy(x).requires_grad_(), copy(dy)) for _ in range(count)])


def input_set_bytes(case):
    """Bytes of one input set: x, plus the upstream gradient dy for forward+backward."""
    return case.input_bytes * (1 if case.mode == "forward" else 2)


def make_step(module, mode, rotation):
    """The timed step on the next input set.

    forward: inference, under ``torch.no_grad``. forward+backward: one training step through
    the module, the backward of a fixed random dy, with dx and all six parameter gradients
    returned by ``torch.autograd.grad`` (no accumulation into ``.grad``, which would add a
    read and write of each gradient that no provider needs).
    """
    if mode == "forward":
        def step():
            (x,) = rotation.next()
            with torch.no_grad():
                return module(x)
    elif mode == "forward+backward":
        params = tuple(module.parameters())

        def step():
            x, dy = rotation.next()
            return torch.autograd.grad(module(x), (x,) + params, dy)
    else:
        raise ValueError(f"mode must be 'forward' or 'forward+backward', got {mode!r}")
    return step


def forward_for_saved_bytes(module, rotation):
    """A forward that records the graph (for the saved-tensor probe) on the next input set."""
    def forward():
        x = rotation.next()[0]
        return module(x)
    return forward
