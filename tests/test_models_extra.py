"""VGG-19-BN, ViT-B/16 and timm models: BackdoorBench's layouts (torchvision's models are
BackdoorBench's), pretrained weights from a local file only, and narrow variants that run on a CPU."""
import re

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

from models import ModelLayers, create_model, create_timm_model, list_models, model_layers
from models.vit import Resize
from utils.errors import UserError
from utils.record import load_into


def shapes(model: nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def on_meta(name: str, **kw) -> nn.Module:
    """Layout only: no memory, no initialisation."""
    with torch.device("meta"):
        return create_model(name, 10, **kw)


def linear_names(model: nn.Module) -> list[str]:
    """What D3's ``all_linear`` selects."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------------------------------------- VGG

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


# ---------------------------------------------------------------------------------------------- ViT

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


# --------------------------------------------------------------------------------------------- timm

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


def test_attack_and_defense_run_on_vgg_and_refuse_a_vit_without_weights(capsys, tiny_data, tmp_path):
    """Every script takes the other models by name; a pretrained start without its file stops first."""
    import attack.badnet as badnet
    import defense.ft as ft
    from conftest import expect_error, run_args
    from utils.record import load_model
    args = run_args(tiny_data, tmp_path)
    badnet.main(["--save_folder_name", "vgg", *args, "--model", "vgg19_bn_w16", "--epochs", "1", "--batch_size", "64"])
    ft.main(["--result_file", "vgg", *args, "--epochs", "1"])
    assert type(load_model(tmp_path / "vgg" / "defense" / "ft")).__name__ == "VGG"
    expect_error(capsys, badnet.main, ["--save_folder_name", "vit", *args, "--model", "vit_b_16"], "--pretrained_path")
    expect_error(capsys, badnet.main, ["--save_folder_name", "x", *args, "--model", "timm/no_such_net"],
                 "unknown timm model")
    assert not (tmp_path / "vit").exists() and not (tmp_path / "x").exists()


# ------------------------------------------------------------------- named layers for the defenses

@pytest.mark.parametrize("name", [n for n in list_models()])
def test_every_model_names_its_layers_for_the_defenses(name):
    """D3's classifier is a K-way Linear; NAD's stages and FP's layer are modules of the model."""
    model = on_meta(name, pretrained=False)
    layers = model_layers(name, model)
    modules = dict(model.named_modules())
    assert isinstance(modules[layers.classifier], nn.Linear) and modules[layers.classifier].out_features == 10
    assert layers.classifier == linear_names(model)[-1]
    from defense.d3 import select_layers
    theta_s = [n for n, _ in select_layers(model, layers.d3_layers)]
    assert layers.classifier in theta_s and set(theta_s) <= set(linear_names(model))
    assert len(layers.stages) == 2 and all(s in modules for s in layers.stages)
    if layers.pruned is None:
        assert not any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in modules.values())
    else:
        assert isinstance(modules[layers.pruned], nn.Linear)


def test_timm_layers_come_from_timms_metadata():
    cnn = create_timm_model("resnet18", 10)
    assert model_layers("timm/resnet18", cnn) == ModelLayers("fc", ("layer3", "layer4"), "fc")
    vit = create_timm_model("vit_tiny_patch16_224", 10, img_size=32)
    layers = model_layers("timm/vit_tiny_patch16_224", vit)
    assert layers.classifier == "head" and layers.stages == ("blocks.10", "blocks.11") and layers.pruned is None


def test_nad_attention_over_tokens_is_over_the_token_axis():
    from defense.nad import attention_map
    tokens = torch.randn(2, 5, 8)                       # [N, tokens, dim]
    am = attention_map(tokens, 2.0)
    expected = tokens.pow(2).sum(2)
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert am.shape == (2, 1, 5, 1) and torch.allclose(am.flatten(1), expected, atol=1e-5)


@pytest.mark.parametrize("model", ["vgg19_bn_w16", "vit_tiny_test"])
def test_attack_then_every_layer_defense_on_each_narrow_model(model, capsys, tiny_data, tmp_path):
    """BadNets then D3, NAD and FP with their per-model defaults; the resolved layer names are
    written into each output's config; FP on a ViT is one clear line and writes nothing."""
    import attack.badnet as badnet
    import defense.d3 as d3
    import defense.fp as fp
    import defense.nad as nad
    from conftest import expect_error, run_args
    from utils.record import read_json, read_yaml
    args = run_args(tiny_data, tmp_path)
    badnet.main(["--save_folder_name", "r", *args, "--model", model, "--epochs", "1", "--batch_size", "64"])
    net = create_model(model, 10, pretrained=False)
    layers = model_layers(model, net)
    d3.main(["--result_file", "r", *args, "--epochs", "1"])
    nad.main(["--result_file", "r", *args, "--epochs", "1", "--te_epochs", "1"])
    out = tmp_path / "r" / "defense"
    assert read_yaml(out / "d3" / "config.yaml")["select_layer_name"] == layers.d3_layers
    assert read_yaml(out / "nad" / "config.yaml")["nad_layers"] == ",".join(layers.stages)
    assert 0 <= read_json(out / "d3" / "summary.json")["asr"] <= 1
    if layers.pruned is None:
        expect_error(capsys, fp.main, ["--result_file", "r", *args, "--epochs", "1"],
                     "vit_tiny_test has none; to prune the features entering a Linear layer")
        assert not (out / "fp").exists()
    else:
        fp.main(["--result_file", "r", *args, "--epochs", "1"])
        assert read_yaml(out / "fp" / "config.yaml")["prune_layer"] == layers.pruned


def test_throughput_compares_models(tiny_data, capsys):
    import importlib.util

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "sh" / "bench_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--dataset_path", str(tiny_data["pickles"]), "--models", "preactresnet18_w8,vit_tiny_test",
                "--steps", "1", "--device", "cpu"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert set(rows) == {"model", "preactresnet18_w8", "vit_tiny_test"}
    assert all(float(rows[m][2]) > 0 and float(rows[m][3]) > 0 for m in ("preactresnet18_w8", "vit_tiny_test"))
