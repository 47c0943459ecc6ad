"""ViT-B/16 (models/vit.py): BackdoorBench's keys, a start from torchvision's weights file (local only),
the narrow test model, the layers D3 selects and the in-model resize."""
import re

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import linear_names, on_meta, shapes
from safetensors.torch import save_file

from models import create_model
from models.vit import Resize
from utils.errors import UserError
from utils.record import load_into


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    """BackdoorBench's vit_b_16 for 10 classes, and torchvision's ImageNet-format file (random weights)."""
    torch.manual_seed(0)
    net = torchvision.models.vit_b_16(weights=None)
    path = tmp_path_factory.mktemp("vit") / "vit_b_16-random.pth"
    torch.save(net.state_dict(), path)
    net.heads.head = nn.Linear(768, 10)
    return nn.Sequential(torchvision.transforms.Resize(224), net), path


def test_vit_b_16_has_backdoorbench_keys_and_loads_its_state_dict_strictly(vit_files):
    reference, _ = vit_files
    ours = on_meta("vit_b_16", pretrained=False)
    assert shapes(ours) == shapes(reference)
    assert {"1.conv_proj.weight", "1.encoder.layers.encoder_layer_11.mlp.3.weight", "1.heads.head.weight"} <= set(
        ours.state_dict())
    load_into(ours.to_empty(device="cpu"), reference.state_dict(), "backdoorbench vit_b_16")
    assert torch.equal(ours[1].heads.head.weight, reference[1].heads.head.weight)


def test_vit_b_16_starts_from_a_torchvision_file(vit_files):
    _, path = vit_files
    imagenet = torch.load(path, weights_only=True)
    model = create_model("vit_b_16", 10, pretrained_path=path)
    state = model.state_dict()
    assert all(torch.equal(state[f"1.{k}"], v) for k, v in imagenet.items() if not k.startswith("heads."))
    assert state["1.heads.head.weight"].shape == (10, 768)


def test_vit_b_16_without_a_weights_file_says_how_to_get_one():
    with pytest.raises(UserError) as e:
        create_model("vit_b_16", 10)
    message = str(e.value)
    assert "\n" not in message
    assert all(s in message for s in ("--pretrained_path", "vit_b_16-c867db91.pth", "--pretrained false"))


def test_a_weights_file_that_does_not_fit_is_one_clear_line(tmp_path):
    from torchvision.models import VisionTransformer
    wide = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=64)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "wide.pth").read_bytes()[:2000])
    for path, match in [(tmp_path / "wide.pth", "does not fit VisionTransformer: shape of class_token is "
                                                r"\(1, 1, 48\), model needs \(1, 1, 32\); pass a torchvision"),
                        (tmp_path / "cut.pth", "cannot read .* the file is damaged")]:
        with pytest.raises(UserError, match=match) as e:
            create_model("vit_tiny_test", 10, pretrained_path=path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vit_tiny_loads_a_torchvision_format_file(tmp_path, suffix):
    from torchvision.models import VisionTransformer
    net = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    path = tmp_path / f"tiny{suffix}"
    (save_file if suffix == ".safetensors" else lambda s, p: torch.save(s, p))(net.state_dict(), str(path))
    model = create_model("vit_tiny_test", 10, pretrained_path=path)
    assert torch.equal(model[1].encoder.layers[1].mlp[0].weight, net.encoder.layers[1].mlp[0].weight)
    assert model[1].heads.head.weight.shape == (10, 32)


def test_vit_tiny_keeps_the_layout_and_runs():
    tiny, full = create_model("vit_tiny_test", 10), on_meta("vit_b_16", pretrained=False)

    def pattern(model):  # key names with the layer number dropped
        return {re.sub(r"encoder_layer_\d+", "encoder_layer_N", k) for k in model.state_dict()}
    assert pattern(tiny) == pattern(full)
    assert list(tiny[0].parameters()) == [] and list(tiny[0].buffers()) == []
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert tiny(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # Tiny-ImageNet size, resized to 32


def test_vit_linear_layers_for_d3():
    names = linear_names(on_meta("vit_b_16", pretrained=False))
    assert len(names) == 37 and names[-1] == "1.heads.head"
    assert names[:3] == [f"1.encoder.layers.encoder_layer_0.{n}" for n in ("self_attention.out_proj", "mlp.0", "mlp.3")]


def test_resize_is_torchvisions_on_tensors():
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(Resize(224)(x), torchvision.transforms.Resize(224)(x), atol=1e-5)
    assert torch.allclose(Resize(224)(x), torchvision.transforms.Resize((224, 224), antialias=False)(x), atol=1e-5)
