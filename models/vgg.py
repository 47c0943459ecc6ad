"""VGG-19 with batch normalisation (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015; BN after every convolution as in torchvision's ``vgg19_bn``).

Layout is exactly BackdoorBench's ``vgg19_bn``, which is torchvision's ``vgg19_bn(num_classes=K)``
unchanged, started at random: ``features`` (16 blocks of 3x3 conv + BN + ReLU, five 2x2 max-pools),
``avgpool`` (adaptive average pooling to 7x7: a CIFAR image, 1x1 after the pools, is copied into
7x7, images are not resized), then ``classifier`` = Linear(25088, 4096), ReLU, Dropout(0.5),
Linear(4096, 4096), ReLU, Dropout(0.5), Linear(4096, K). Module names, state-dict keys, shapes and
initialisation are torchvision's, so BackdoorBench's checkpoints load strictly.

Layers for D3 (``--select_layer_name``): the default is ``classifier``, its three Linear layers
``classifier.0``, ``classifier.3`` and ``classifier.6`` (what ``all_linear`` also selects): the
paper's theta_s is "the weights of the linear layers", "one or a few layers", and here they are
the classifier head, trained from scratch like the rest, so re-initialising all three (D3's warm-up)
loses nothing a few epochs on the reserved data cannot relearn. Measured on the narrow variant
(Blended, 8 epochs on a 10,000-image CIFAR-10 subset (JPEG copy), attacked 31.40 / 73.98 ACC / ASR;
D3 20 epochs): the final layer ``classifier.6`` alone gives 33.82 / 46.59, all three 32.85 / 19.49.

NAD's default stages are ``features.38`` and ``features.51`` (the ReLUs closing the 4th and 5th
convolutional stages, before their max-pools), FP's layer is ``classifier.0`` (BackdoorBench's).
``width`` scales every convolution (64 -> ``width``) and the hidden classifier width
(4096 -> 4096 * width / 64); ``vgg19_bn_w16`` keeps the key names for CPU tests and smoke runs.
``pretrained_path`` optionally starts from torchvision's ImageNet file (all but ``classifier.6``),
like BackdoorBench's ``pretrained`` option; its default, as here, is a random start.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.registry import ModelLayers, register_model
from models.timm_models import load_pretrained, pretrained_file

# torchvision's configuration "E": output channels of each 3x3 conv, "M" for a 2x2 max-pool.
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg=VGG19, num_classes: int = 10, width: int = 64, dropout: float = 0.5,
                 in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = v * width // 64
                layers += [nn.Conv2d(in_channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                in_channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = 4096 * width // 64
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        # torchvision's initialisation, so a random start is BackdoorBench's random start.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(num_classes: int, width: int, pretrained_path=None, pretrained: bool | None = None, **kw) -> VGG:
    model = VGG(VGG19, num_classes=num_classes, width=width, **kw)
    # Optional: BackdoorBench's vgg19_bn starts at random; its pretrained option loads torchvision's
    # ImageNet weights into all but the last layer, as here.
    weights = "torchvision's VGG19_BN_Weights.IMAGENET1K_V1 file vgg19_bn-c79401a0.pth"
    path = pretrained_file(f"vgg19_bn (width {width})", pretrained, pretrained_path, weights)
    if path is not None:
        load_pretrained(model, path, ("classifier.6",), weights)
    return model


# D3 takes the classifier's three Linear layers (see the docstring); NAD distils
# the outputs of the last two convolutional stages (the ReLUs before the 4th and 5th max-pools: 4x4
# and 2x2 maps on 32-pixel images, as layer3/layer4 in PreAct-ResNet18); FP prunes the pooled
# features entering classifier.0, as BackdoorBench does.
LAYERS = ModelLayers(classifier="classifier.6", stages=("features.38", "features.51"), pruned="classifier.0",
                     theta_s="classifier")


@register_model(layers=LAYERS)
def vgg19_bn(num_classes: int = 10, pretrained_path=None, pretrained: bool | None = None, **kw) -> VGG:
    return _vgg(num_classes, 64, pretrained_path, pretrained, **kw)


@register_model(layers=LAYERS)
def vgg19_bn_w16(num_classes: int = 10, pretrained_path=None, pretrained: bool | None = None, **kw) -> VGG:
    """Narrow variant for CPU tests: channels 16..128, hidden classifier width 1024."""
    return _vgg(num_classes, 16, pretrained_path, pretrained, **kw)
