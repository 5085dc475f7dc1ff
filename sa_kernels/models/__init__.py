"""Reference networks built with Shuffle Attention."""
from .sa_resnet import SABottleneck, SAResNet, sa_resnet50, sa_resnet101

__all__ = ["SABottleneck", "SAResNet", "sa_resnet50", "sa_resnet101"]
