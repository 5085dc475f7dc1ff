"""SA-ResNet-50/101: ResNet with a Shuffle Attention layer in every bottleneck (SA-Net, arXiv 2102.00240).

The network is the usual ImageNet ResNet (7x7 stem, four stages of bottlenecks,
global average pool, linear classifier); submodule names follow the common
``conv1``/``bn1``/``layer1.0.conv1`` layout so ResNet checkpoints map onto it
key for key, plus ``sa.*`` in each bottleneck. As in SA-Net, the SA layer
(G = 64) gates the output of the block's last BatchNorm, before the residual add.
"""
from torch import nn

from ..backends import check_choice
from ..module import FusedShuffleAttention
from ..reference import ShuffleAttention

SA_GROUPS = 64


def shuffle_attention_layer(channel, fused, backend):
    if fused:
        return FusedShuffleAttention(channel, G=SA_GROUPS, backend=backend)
    return ShuffleAttention(channel, G=SA_GROUPS)


class SABottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), SA on the expanded output, then the residual add."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, *, fused=True, backend="auto"):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.sa = shuffle_attention_layer(width, fused, backend)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.sa(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


class SAResNet(nn.Module):
    def __init__(self, layers, num_classes=1000, *, fused=True, backend="auto", zero_init_residual=False):
        super().__init__()
        check_choice(backend)
        self.fused = fused
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        block_options = dict(fused=fused, backend=backend)
        self.layer1 = self._make_stage(64, layers[0], 1, block_options)
        self.layer2 = self._make_stage(128, layers[1], 2, block_options)
        self.layer3 = self._make_stage(256, layers[2], 2, block_options)
        self.layer4 = self._make_stage(512, layers[3], 2, block_options)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * SABottleneck.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_stage(self, planes, blocks, stride, block_options):
        out_channels = planes * SABottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))
        stage = [SABottleneck(self.inplanes, planes, stride, downsample, **block_options)]
        self.inplanes = out_channels
        stage += [SABottleneck(self.inplanes, planes, **block_options) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual):
        # He init for convs, unit BatchNorm; the SA layers keep their own initial values.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch then starts as the identity (Goyal et al., 2017).
            for m in self.modules():
                if isinstance(m, SABottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def sa_resnet50(fused=True, backend="auto", num_classes=1000, **kwargs):
    """SA-ResNet-50: bottleneck stages [3, 4, 6, 3]. ``fused=False`` uses the reference ShuffleAttention."""
    return SAResNet([3, 4, 6, 3], num_classes, fused=fused, backend=backend, **kwargs)


def sa_resnet101(fused=True, backend="auto", num_classes=1000, **kwargs):
    """SA-ResNet-101: bottleneck stages [3, 4, 23, 3]. ``fused=False`` uses the reference ShuffleAttention."""
    return SAResNet([3, 4, 23, 3], num_classes, fused=fused, backend=backend, **kwargs)
