"""Vision Transformer ViT-B/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for
Image Recognition at Scale", ICLR 2021).

Layout is exactly BackdoorBench's ``vit_b_16``: torchvision's ``vit_b_16`` started from ImageNet
weights (``ViT_B_16_Weights.IMAGENET1K_V1``), its ``heads.head`` replaced by a fresh
``nn.Linear(768, K)``, inside ``nn.Sequential(Resize((224, 224)), net)``. State-dict keys therefore
carry a ``1.`` prefix (``1.class_token``, ``1.conv_proj.weight``,
``1.encoder.layers.encoder_layer_0.self_attention.in_proj_weight``, ..., ``1.heads.head.weight``)
and BackdoorBench's checkpoints load strictly.

Index 0 is :class:`Resize`, without parameters: it resizes the batch on the model's device with
``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``, which is what torchvision's
``Resize(224)`` does to a square float tensor batch (its default since 0.17 is antialias=True). When upsampling
(CIFAR's 32 or Tiny-ImageNet's 64 to 224) antialiasing changes nothing, so the result also equals
BackdoorBench's ``Resize((224, 224))`` under older torchvision's antialias=False, up to float rounding.

These machines reach no model hub: the ImageNet start comes from a local file, torchvision's
``vit_b_16-c867db91.pth`` (``ViT_B_16_Weights.IMAGENET1K_V1``), given as ``pretrained_path`` and read
safely; every key but ``heads.head`` is loaded strictly. ``pretrained=False`` trains from scratch.

Layers for D3 (``--select_layer_name``): the default is the final linear layer ``1.heads.head``, the
one Linear layer outside the pretrained body; ``all_linear`` selects 37 layers: ``1.heads.head``
and, in each encoder layer ``1.encoder.layers.encoder_layer_N`` (N = 0..11),
``self_attention.out_proj``, ``mlp.0`` and ``mlp.3``. The query/key/value projection is
``nn.MultiheadAttention``'s ``in_proj_weight`` parameter, not an ``nn.Linear``, and the patch
embedding ``1.conv_proj`` is a Conv2d: no linear selection takes them. D3's warm-up re-initialises
every selected weight, so ``all_linear`` would replace most of the ImageNet-pretrained encoder by
noise and leave 5% of the training data to relearn it; the paper's "one or a few layers" is the
head. On the from-scratch ``vit_tiny_test`` (Blended, 8 epochs on a 10,000-image CIFAR-10 subset
(JPEG copy), attacked 28.37 / 71.97 ACC / ASR; D3 20 epochs) ``all_linear`` removed more of the
backdoor (23.63 / 7.99 against the head's 26.37 / 21.99), but that model has nothing pretrained to
lose; on the real model measure both (``--select_layer_name all_linear``) before preferring it.

NAD's default stages are the last two encoder layers (their token outputs); FP does not apply (no
convolutional stage) and refuses with one line.
``vit_tiny_test`` keeps the module names (2 layers, hidden size 32, 8x8 patches, images resized to
32) and starts at random, for CPU tests.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import ModelLayers, register_model
from models.timm_models import load_pretrained, pretrained_file
from utils.vision import import_vision

VIT_B_16_WEIGHTS = ("torchvision's ViT_B_16_Weights.IMAGENET1K_V1 file vit_b_16-c867db91.pth "
                    "(https://download.pytorch.org/models/vit_b_16-c867db91.pth)")


class Resize(nn.Module):
    """Bilinear resize of an image batch to ``size`` x ``size``, on the batch's device."""

    def __init__(self, size: int):
        super().__init__()
        self.size = (size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x  # bilinear resizing to the same size is the identity
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _vision_transformer(**kw):
    # imported here: torchvision takes seconds to import
    return import_vision("torchvision.models").VisionTransformer(**kw)


def _vit(net: nn.Module, num_classes: int, pretrained_path, weights: str) -> nn.Sequential:
    if pretrained_path is not None:
        load_pretrained(net, pretrained_path, ("heads.head",), weights)
    # BackdoorBench's head: a fresh nn.Linear (PyTorch's default init, not torchvision's zero init).
    net.heads.head = nn.Linear(net.hidden_dim, num_classes)
    return nn.Sequential(Resize(net.image_size), net)


def _layers(num_layers: int) -> ModelLayers:
    """D3: the head; NAD: the token outputs of the last two encoder layers; FP: none (no
    convolutional stage: FP refuses unless --prune_layer names a layer)."""
    stage = "1.encoder.layers.encoder_layer_{}".format
    return ModelLayers(classifier="1.heads.head", stages=(stage(num_layers - 2), stage(num_layers - 1)), pruned=None)


@register_model(layers=_layers(12))
def vit_b_16(num_classes: int = 10, pretrained_path=None, pretrained: bool = True, **kw) -> nn.Sequential:
    path = pretrained_file("vit_b_16", pretrained, pretrained_path, VIT_B_16_WEIGHTS,
                           note=" (the D3 paper's numbers need the pretrained start)")
    net = _vision_transformer(image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                             mlp_dim=3072, **kw)  # torchvision's vit_b_16
    return _vit(net, num_classes, path, VIT_B_16_WEIGHTS)


@register_model(layers=_layers(2))
def vit_tiny_test(num_classes: int = 10, pretrained_path=None, pretrained: bool | None = None,
                  **kw) -> nn.Sequential:
    """Narrow variant for CPU tests: 32x32 images in 16 patches, 2 layers of width 32."""
    weights = "a torchvision VisionTransformer state dict of the same size"
    path = pretrained_file("vit_tiny_test", pretrained, pretrained_path, weights)
    net = _vision_transformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, **kw)
    return _vit(net, num_classes, path, weights)
