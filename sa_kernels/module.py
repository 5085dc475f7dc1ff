"""``FusedShuffleAttention``: a drop-in for the reference module (``fuse_model`` lives in fuse.py)."""
import torch
from torch import nn
from torch.nn.parameter import Parameter

from ._checks import check_config
from .backends import check_choice
from .functional import shuffle_attention


class FusedShuffleAttention(nn.Module):
    """Shuffle Attention in one fused pass; same constructor, parameters and state_dict as the reference."""

    def __init__(self, channel=512, reduction=16, G=8, *, backend="auto"):
        super().__init__()
        check_config(channel, G)
        check_choice(backend)
        half = channel // (2 * G)
        self.G = G
        self.channel = channel
        self.backend = backend
        self.gn = nn.GroupNorm(half, half)
        self.cweight = Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = Parameter(torch.ones(1, half, 1, 1))
        self.sweight = Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = Parameter(torch.ones(1, half, 1, 1))

    def forward(self, x):
        if x.dim() == 4 and x.shape[1] != self.channel:
            raise ValueError(
                f"{type(self).__name__}(channel={self.channel}) got input with {x.shape[1]} "
                f"channels (shape {tuple(x.shape)})")
        return shuffle_attention(x, self.cweight, self.cbias, self.sweight, self.sbias,
                                 self.gn.weight, self.gn.bias, self.G, self.gn.eps, self.backend)

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
