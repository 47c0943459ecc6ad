"""The model registry and PreAct-ResNet18's layout, which must be BackdoorBench's exactly."""
import pytest
import torch

from models import create_model, list_models
from utils.errors import UserError
from utils.record import load_into

# BackdoorBench's PreActResNet18(num_classes=10) state dict (its models/preact_resnet.py): key and
# shape ('-' for a scalar), in order. No final BatchNorm: the pooled input of 'linear' is the sum of
# the last block's residual branches.
BACKDOORBENCH_PREACTRESNET18 = """
conv1.weight 64x3x3x3
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.bn1.num_batches_tracked -
layer1.0.conv1.weight 64x64x3x3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.bn2.num_batches_tracked -
layer1.0.conv2.weight 64x64x3x3
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.bn1.num_batches_tracked -
layer1.1.conv1.weight 64x64x3x3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.bn2.num_batches_tracked -
layer1.1.conv2.weight 64x64x3x3
layer2.0.bn1.weight 64
layer2.0.bn1.bias 64
layer2.0.bn1.running_mean 64
layer2.0.bn1.running_var 64
layer2.0.bn1.num_batches_tracked -
layer2.0.conv1.weight 128x64x3x3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.bn2.num_batches_tracked -
layer2.0.conv2.weight 128x128x3x3
layer2.0.shortcut.0.weight 128x64x1x1
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.bn1.num_batches_tracked -
layer2.1.conv1.weight 128x128x3x3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.bn2.num_batches_tracked -
layer2.1.conv2.weight 128x128x3x3
layer3.0.bn1.weight 128
layer3.0.bn1.bias 128
layer3.0.bn1.running_mean 128
layer3.0.bn1.running_var 128
layer3.0.bn1.num_batches_tracked -
layer3.0.conv1.weight 256x128x3x3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.bn2.num_batches_tracked -
layer3.0.conv2.weight 256x256x3x3
layer3.0.shortcut.0.weight 256x128x1x1
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.bn1.num_batches_tracked -
layer3.1.conv1.weight 256x256x3x3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.bn2.num_batches_tracked -
layer3.1.conv2.weight 256x256x3x3
layer4.0.bn1.weight 256
layer4.0.bn1.bias 256
layer4.0.bn1.running_mean 256
layer4.0.bn1.running_var 256
layer4.0.bn1.num_batches_tracked -
layer4.0.conv1.weight 512x256x3x3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.bn2.num_batches_tracked -
layer4.0.conv2.weight 512x512x3x3
layer4.0.shortcut.0.weight 512x256x1x1
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.bn1.num_batches_tracked -
layer4.1.conv1.weight 512x512x3x3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.bn2.num_batches_tracked -
layer4.1.conv2.weight 512x512x3x3
linear.weight 10x512
linear.bias 10
"""


def _expected():
    rows = [line.split() for line in BACKDOORBENCH_PREACTRESNET18.strip().splitlines()]
    return [(k, () if s == "-" else tuple(int(d) for d in s.split("x"))) for k, s in rows]


def test_preactresnet18_has_backdoorbench_keys_and_shapes():
    state = create_model("preactresnet18", 10).state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == _expected()


def test_backdoorbench_state_dict_loads_strictly_and_drives_the_forward_pass():
    gen = torch.Generator().manual_seed(0)
    foreign = {k: (torch.randn(s, generator=gen) if k.endswith(("weight", "bias")) else
                   torch.ones(s) if k.endswith("running_var") else
                   torch.zeros(s, dtype=torch.long) if k.endswith("num_batches_tracked") else torch.zeros(s))
               for k, s in _expected()}
    model = create_model("preactresnet18", 10)
    load_into(model, foreign, "backdoorbench")
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    # BackdoorBench's forward: stem, four stages, average pooling, linear -- nothing in between.
    out = model.layer4(model.layer3(model.layer2(model.layer1(model.conv1(x)))))
    expected = model.linear(out.mean((2, 3)))
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert (out < 0).any()  # the pooled features are not rectified


def test_old_layout_with_a_final_bn_is_refused():
    state = create_model("preactresnet18_w8", 10).state_dict()
    state["bn.weight"] = torch.ones(64)
    with pytest.raises(UserError, match="unexpected bn.weight"):
        load_into(create_model("preactresnet18_w8", 10), state, "old record")


@pytest.mark.parametrize("name,width", [("preactresnet18_w32", 32), ("preactresnet18_w16", 16),
                                        ("preactresnet18_w8", 8)])
def test_narrow_variants_follow_the_same_layout(name, width):
    state = create_model(name, 10).state_dict()
    full = _expected()
    assert list(state) == [k for k, _ in full]
    assert state["conv1.weight"].shape == (width, 3, 3, 3) and state["linear.weight"].shape == (10, 8 * width)


def test_unknown_model_is_named():
    assert "preactresnet18" in list_models()
    with pytest.raises(UserError, match="unknown model 'resnet9'"):
        create_model("resnet9", 10)
