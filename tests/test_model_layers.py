"""The layers each model names for D3, NAD and FP, and every attack and layer defense running on each
model family."""

import pytest
import torch
import torch.nn as nn
from conftest import linear_names, on_meta

from models import create_model, list_models, model_layers


def test_attack_and_defense_run_on_vgg_and_refuse_a_vit_without_weights(capsys, tiny_data, tmp_path):
    """Every script takes the other models by name; a pretrained start without its file stops first."""
    from conftest import expect_error, run_args

    import attack.badnet as badnet
    import defense.ft as ft
    from attack.record import load_model
    args = run_args(tiny_data, tmp_path)
    badnet.main(["--save_folder_name", "vgg", *args, "--model", "vgg19_bn_w16", "--epochs", "1", "--batch_size", "64"])
    ft.main(["--result_file", "vgg", *args, "--epochs", "1"])
    assert type(load_model(tmp_path / "vgg" / "defense" / "ft")).__name__ == "VGG"
    expect_error(capsys, badnet.main, ["--save_folder_name", "vit", *args, "--model", "vit_b_16"], "--pretrained_path")
    expect_error(capsys, badnet.main, ["--save_folder_name", "x", *args, "--model", "timm/no_such_net"],
                 "unknown timm model")
    assert not (tmp_path / "vit").exists() and not (tmp_path / "x").exists()


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
    from conftest import expect_error, run_args

    import attack.badnet as badnet
    import defense.d3 as d3
    import defense.fp as fp
    import defense.nad as nad
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
