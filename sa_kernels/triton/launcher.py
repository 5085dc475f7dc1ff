"""A kernel launch whose every argument but the tensors is fixed, built once per plan.

Triton's ``kernel[grid](*args, **kwargs)`` binds and specialises every argument
on every call (about 30 here: type, value-equals-1 and divisibility of each int,
16-byte alignment of each pointer), builds a cache key from them and checks the
kernel's globals before it launches. For a given plan all of that is fixed
except the pointers' alignment, so ``KernelLaunch`` goes through Triton's JIT
on the first call for each alignment pattern of its tensors, keeps the
``CompiledKernel`` that call returned, and launches it directly from then on
(``compiled[grid](*args)``: Triton's own launcher, its launch hooks included).
Same kernel binary, same arguments, same stream; no host synchronisation.

The direct path is used on CUDA devices only; under the interpreter (CPU
tensors), wherever Triton returns something other than a compiled kernel, and
with ``SA_KERNELS_TRITON_DIRECT_LAUNCH=0`` in the environment (read at import;
or ``DIRECT = False`` before launches are built), every call goes through
``kernel[grid]`` as before.
"""
import os

DIRECT = os.environ.get("SA_KERNELS_TRITON_DIRECT_LAUNCH", "1") != "0"


class KernelLaunch:
    """``launch(*tensors)`` runs ``kernel[grid](*tensors, *scalars, **constexprs, num_warps=...)``.

    ``tensors`` are the kernel's leading pointer arguments; ``scalars`` the
    arguments after them; ``constexprs`` the keyword arguments, which must be
    the kernel's last parameters.
    """

    __slots__ = ("kernel", "grid", "scalars", "constexprs", "num_warps", "direct", "compiled",
                 "tail")

    def __init__(self, kernel, grid, tensors, scalars, constexprs, num_warps, direct):
        self.kernel = kernel
        # Three dimensions: CompiledKernel[grid] reads grid[0], grid[1] and grid[2].
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.scalars = tuple(scalars)
        self.constexprs = dict(constexprs)
        self.num_warps = num_warps
        self.compiled = {}  # alignment pattern of the tensors -> CompiledKernel
        self.tail = None
        self.direct = bool(direct) and DIRECT
        if self.direct:
            # The launcher takes every parameter in signature order, constexprs included.
            names = list(getattr(kernel, "arg_names", ()))
            count = tensors + len(self.scalars)
            if names[count:] and sorted(names[count:]) == sorted(self.constexprs):
                self.tail = self.scalars + tuple(self.constexprs[n] for n in names[count:])
            else:
                self.direct = False

    def __call__(self, *tensors):
        if self.direct:
            pattern = tuple([t.data_ptr() % 16 == 0 for t in tensors])
            compiled = self.compiled.get(pattern)
            if compiled is not None:
                compiled[self.grid](*tensors, *self.tail)
                return
        result = self.kernel[self.grid](*tensors, *self.scalars, num_warps=self.num_warps,
                                        **self.constexprs)
        if self.direct:
            if all(hasattr(result, a) for a in ("__getitem__", "function", "packed_metadata")):
                self.compiled[pattern] = result
            else:  # not a compiled kernel (another Triton): stay on the JIT path
                self.direct = False
