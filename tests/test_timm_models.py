"""Any timm model by name (models/timm_models.py): local weights only, one-line errors, and the layers
the defenses use from timm's metadata."""

import pytest
import torch

from models import ModelLayers, create_timm_model, model_layers
from utils.errors import UserError


def test_timm_model_by_name(tmp_path):
    import timm
    imagenet = timm.create_model("resnet18", pretrained=False)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    model = create_timm_model("resnet18", 10, pretrained_path=tmp_path / "resnet18.pth")
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight) and model.fc.weight.shape == (10, 512)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("kw,match", [
    ({"name": "resnet181"}, "unknown timm model 'resnet181'; did you mean resnet18"),
    ({"pretrained": True}, "--pretrained_path"),
    ({"img_size": 32}, "cannot be built with"),
])
def test_timm_bad_input_is_one_line(kw, match):
    with pytest.raises(UserError, match=match) as e:
        create_timm_model(**{"name": "resnet18", "num_classes": 10, **kw})
    assert "\n" not in str(e.value)


def test_timm_layers_come_from_timms_metadata():
    cnn = create_timm_model("resnet18", 10)
    assert model_layers("timm/resnet18", cnn) == ModelLayers("fc", ("layer3", "layer4"), "fc")
    vit = create_timm_model("vit_tiny_patch16_224", 10, img_size=32)
    layers = model_layers("timm/vit_tiny_patch16_224", vit)
    assert layers.classifier == "head" and layers.stages == ("blocks.10", "blocks.11") and layers.pruned is None
