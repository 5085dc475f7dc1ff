"""sa-kernels: fused Shuffle Attention (SA-Net, arXiv 2102.00240) for PyTorch."""
from . import ops  # noqa: F401  (registers torch.ops.sa_kernels.*)
from .backends import BackendUnavailableError, available_backends
from .decomposition import decompositions
from .functional import shuffle_attention
from .fuse import FuseError, FuseReport, fuse_model
from .module import FusedShuffleAttention
from .reference import ShuffleAttention

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FuseError",
    "FuseReport",
    "FusedShuffleAttention",
    "ShuffleAttention",
    "available_backends",
    "decompositions",
    "fuse_model",
    "shuffle_attention",
]
