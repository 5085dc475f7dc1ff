"""``FusedShuffleAttention``: a drop-in for the reference module (``fuse_model`` lives in fuse.py)."""
import torch
from torch import nn
from torch.nn.parameter import Parameter

from . import functional
from ._checks import check_config
from .backends import check_choice


class FusedShuffleAttention(nn.Module):
    """Shuffle Attention in one fused pass; same constructor, parameters and state_dict as the reference."""

    def __init__(self, channel=512, reduction=16, G=8, *, backend="auto"):
        super().__init__()
        check_config(channel, G)
        half = channel // (2 * G)
        self.G = G
        self.channel = channel
        self.backend = backend
        self.gn = nn.GroupNorm(half, half)
        self.cweight = Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = Parameter(torch.ones(1, half, 1, 1))
        self.sweight = Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = Parameter(torch.ones(1, half, 1, 1))

    @property
    def backend(self):
        """The backend choice (``"auto"`` or a name); what it resolves to is cached per device and dtype."""
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = check_choice(value)
        self._routes = {}

    def forward(self, x):
        gn = self._modules["gn"]
        if gn._forward_pre_hooks or gn._forward_hooks or gn._backward_hooks or gn._backward_pre_hooks:
            self._gn_hooks(gn, x)
        if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            params = (self.cweight, self.cbias, self.sweight, self.sbias, gn.weight, gn.bias)
            return functional.shuffle_attention(x, *params, self.G, gn.eps, self._backend)
        # Parameters straight from their dicts: this method is the module's whole per-call cost.
        p, gp = self._parameters, gn._parameters
        try:
            params = (p["cweight"], p["cbias"], p["sweight"], p["sbias"], gp["weight"], gp["bias"])
        except KeyError:  # a parametrization, pruning or plain tensor: computed on attribute access
            params = (self.cweight, self.cbias, self.sweight, self.sbias, gn.weight, gn.bias)
        try:
            route = self._routes[(x.device, x.dtype)]
        except KeyError:
            route = self._route(x)
        except AttributeError:
            functional.check_tensor(x)
            raise
        return functional.run_eager(route, x, *params, self.G, gn.eps)

    def _gn_hooks(self, gn, x):
        """gn is never called (its GroupNorm is fused), so its forward pre-hooks run here, on
        the input the reference's gn gets: pruning, weight_norm and spectral_norm of gn.weight
        recompute it in one. Hooks that need gn's output or gradients cannot run: refused."""
        if gn._forward_hooks or gn._backward_hooks or gn._backward_pre_hooks:
            raise NotImplementedError(
                "FusedShuffleAttention: a forward or backward hook on its `gn` needs GroupNorm's own "
                "output or gradients, which the fused op never forms; register the hook on the "
                "FusedShuffleAttention module itself, or use the reference module")
        functional.check_tensor(x)
        if x.dim() != 4 or x.shape[1] != 2 * self.G * gn.num_channels:
            return  # the op's checks say what is wrong with x
        branch = x.unflatten(1, (self.G, 2, -1)).select(2, 1).flatten(0, 1)  # the spatial branch, (B * G, half, H, W)
        for hook_id, hook in tuple(gn._forward_pre_hooks.items()):
            if hook_id in gn._forward_pre_hooks_with_kwargs:
                result = hook(gn, (branch,), {})
            else:
                result = hook(gn, (branch,))
            if result is not None:
                raise NotImplementedError(
                    "FusedShuffleAttention: a forward pre-hook on its `gn` returned a new input for "
                    "GroupNorm, which the fused op cannot take; use the reference module")

    def _route(self, x):
        """Resolves the backend for x's device and dtype, once (SA_KERNELS_BACKEND is read then)."""
        functional.check_tensor(x)
        route = self._routes[(x.device, x.dtype)] = functional.route(self._backend, x.device)
        return route

    def __getstate__(self):
        state = super().__getstate__()
        state["_routes"] = {}  # resolved afresh where the module is loaded
        return state

    def __setstate__(self, state):
        if "backend" in state:  # pickled before the backend became a property
            state["_backend"] = state.pop("backend")
        state.setdefault("_routes", {})
        super().__setstate__(state)

    def extra_repr(self):
        return f"channel={self.channel}, G={self.G}, backend={self.backend!r}"

    @classmethod
    def from_module(cls, module, backend="auto"):
        """A fused copy of a Shuffle Attention ``module`` of any of the forms ``fuse_model`` recognises
        (parameters copied, same device, dtype, eps, requires_grad and mode; the reference's names).

        Raises TypeError for a module that is not Shuffle Attention-like, ValueError (with the
        reason) for one that cannot be fused or that computes something else.
        """
        from .fuse import fused_copy  # fuse.py imports this module
        return fused_copy(cls, module, backend)
