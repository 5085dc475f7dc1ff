"""``FusedShuffleAttention``: a drop-in for the reference module, and ``fuse_model``."""
import torch
from torch import nn
from torch.nn.parameter import Parameter

from . import functional
from ._checks import check_config
from .backends import check_choice
from .reference import ShuffleAttention

_SEED_PARAMS = ("cweight", "cbias", "sweight", "sbias")


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
        # Parameters straight from their dicts: this method is the module's whole per-call cost.
        p, gp = self._parameters, gn._parameters
        params = (p["cweight"], p["cbias"], p["sweight"], p["sbias"], gp["weight"], gp["bias"])
        if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return functional.shuffle_attention(x, *params, self.G, gn.eps, self._backend)
        try:
            route = self._routes[(x.device, x.dtype)]
        except KeyError:
            route = self._route(x)
        except AttributeError:
            functional.check_tensor(x)
            raise
        return functional.run_eager(route, x, *params, self.G, gn.eps)

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
        """A fused copy of a ShuffleAttention-like ``module`` (parameters copied, same device and dtype)."""
        return _fused_from(cls, module, backend, share_parameters=False)


def is_shuffle_attention_like(module):
    """The reference class, or any module with the seed's attributes (G, channel, the four gates, gn)."""
    if isinstance(module, FusedShuffleAttention):
        return False
    if isinstance(module, ShuffleAttention):
        return True
    return (all(isinstance(getattr(module, n, None), torch.Tensor) for n in _SEED_PARAMS)
            and isinstance(getattr(module, "gn", None), nn.GroupNorm)
            and isinstance(getattr(module, "G", None), int)
            and isinstance(getattr(module, "channel", None), int))


def _fused_from(cls, module, backend, share_parameters):
    if not is_shuffle_attention_like(module):
        raise TypeError(f"expected a ShuffleAttention-like module, got {type(module).__name__}")
    channel, G, gn = module.channel, module.G, module.gn
    check_config(channel, G)
    half = channel // (2 * G)
    if not gn.affine or gn.num_groups != half or gn.num_channels != half:
        raise ValueError(
            f"{type(module).__name__}.gn must be an affine GroupNorm({half}, {half}), got "
            f"GroupNorm({gn.num_groups}, {gn.num_channels}, affine={gn.affine})")
    fused = cls(channel, G=G, backend=backend)
    fused.gn.eps = gn.eps
    sources = {n: getattr(module, n) for n in _SEED_PARAMS}
    sources.update({"gn.weight": gn.weight, "gn.bias": gn.bias})
    for name, src in sources.items():
        if src.numel() != half:
            raise ValueError(f"{type(module).__name__}.{name} has {src.numel()} values, expected {half}")
        target = fused.get_parameter(name)
        if share_parameters and isinstance(src, Parameter) and src.shape == target.shape:
            new = src
        else:
            new = Parameter(src.detach().clone().reshape(target.shape), requires_grad=src.requires_grad)
        owner, attr = (fused.gn, name[3:]) if name.startswith("gn.") else (fused, name)
        setattr(owner, attr, new)
    return fused.train(module.training)


def fuse_model(model, backend="auto"):
    """Swap, in place, every ShuffleAttention-like module of ``model`` for a FusedShuffleAttention.

    The fused modules take over the originals' Parameter objects, so an optimizer
    built before the swap keeps training the same tensors. Fused modules already
    in the model get ``backend``. Returns the model (the fused module itself when
    ``model`` is ShuffleAttention-like).
    """
    check_choice(backend)
    if isinstance(model, FusedShuffleAttention):
        model.backend = backend
        return model
    if is_shuffle_attention_like(model):
        return _fused_from(FusedShuffleAttention, model, backend, share_parameters=True)
    for name, child in list(model.named_children()):
        fused = fuse_model(child, backend)
        if fused is not child:
            setattr(model, name, fused)
    return model
