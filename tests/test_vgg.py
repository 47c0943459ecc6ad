"""VGG-19-BN (models/vgg.py): torchvision's layout, which BackdoorBench uses, its narrow variant, and
pretrained weights from a local file only."""

import torch
import torchvision
from conftest import linear_names, on_meta, shapes

from models import create_model
from utils.record import load_into


def test_vgg19_bn_is_torchvisions_and_loads_its_state_dict_strictly():
    with torch.device("meta"):  # BackdoorBench's vgg19_bn; on "meta": its 139M weights cost nothing to build
        reference = torchvision.models.vgg19_bn(weights=None, num_classes=10)
    ours = on_meta("vgg19_bn")
    assert shapes(ours) == shapes(reference)
    assert repr(ours) == repr(reference)  # same module types and settings (ReLU, Dropout(0.5), pooling) in order
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in reference.state_dict().items()}
    load_into(ours.to_empty(device="cpu"), state, "torchvision vgg19_bn")
    assert linear_names(ours) == ["classifier.0", "classifier.3", "classifier.6"]


def test_vgg19_bn_narrow_variant_keeps_the_layout():
    narrow = create_model("vgg19_bn_w16", 10)
    assert list(narrow.state_dict()) == list(on_meta("vgg19_bn").state_dict())
    assert narrow.features[0].out_channels == 16 and narrow.classifier[0].out_features == 1024
    x = torch.randn(2, 3, 32, 32)
    narrow.eval()
    assert narrow(x).shape == (2, 10)
    assert torch.equal(narrow(x), torchvision.models.VGG.forward(narrow, x))  # torchvision's forward


def test_vgg19_bn_optional_pretrained_file_fills_all_but_the_last_layer(tmp_path):
    imagenet = create_model("vgg19_bn_w16", 1000)
    torch.save(imagenet.state_dict(), tmp_path / "w.pth")
    model = create_model("vgg19_bn_w16", 10, pretrained_path=tmp_path / "w.pth")
    assert torch.equal(model.classifier[3].weight, imagenet.classifier[3].weight)
    assert model.classifier[6].weight.shape == (10, 1024)
