"""PreAct-ResNet18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).

Layout is exactly BackdoorBench's ``PreActResNet18`` (its ``models/preact_resnet.py``, the model of
the D3 paper's Table 1): a 3x3 stem without pooling (CIFAR-sized inputs), four stages of two
pre-activation basic blocks (64/128/256/512 channels, strides 1/2/2/2), then global average pooling
of the last block's output -- a sum of residual branches, with no final BN or ReLU -- and a
classifier named ``linear``, the layer D3 selects by default. Module names, state-dict keys and
shapes are BackdoorBench's, so its checkpoints load strictly.

``width`` scales every stage; ``preactresnet18_w16`` / ``_w32`` are the narrow variants that
make a CPU smoke run practical (the full model trains at about 50 images/s on 2 CPU cores).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import ModelLayers, register_model


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the paper.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks_per_stage=(2, 2, 2, 2), num_classes: int = 10, width: int = 64,
                 in_channels: int = 3):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        in_planes = width
        stages = []
        for i, (planes, n) in enumerate(zip(widths, blocks_per_stage)):
            layers = []
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, stride=(2 if i > 0 and j == 0 else 1)))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


# D3's theta_s is ``linear`` (the official code's default); NAD distils layer3 and layer4, what
# BackdoorBench measured; FP prunes the pooled layer4 channels entering ``linear``.
LAYERS = ModelLayers(classifier="linear", stages=("layer3", "layer4"), pruned="linear")


@register_model(layers=LAYERS)
def preactresnet18(num_classes: int = 10, **kw) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, width=64, **kw)


@register_model(layers=LAYERS)
def preactresnet18_w32(num_classes: int = 10, **kw) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, width=32, **kw)


@register_model(layers=LAYERS)
def preactresnet18_w16(num_classes: int = 10, **kw) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, width=16, **kw)


@register_model(layers=LAYERS)
def preactresnet18_w8(num_classes: int = 10, **kw) -> PreActResNet:
    """Tiny variant for tests."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, width=8, **kw)
