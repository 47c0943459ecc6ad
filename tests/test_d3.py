import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import defense.d3 as d3
from defense.base import DefenderData
from models import create_model
from utils.config import Config
from utils.datasets import DATASETS, ImageSet
from utils.errors import UserError


@pytest.mark.parametrize("lmd", [10.0, 0.5])
def test_objective_matches_eq4(lmd):
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    w = [torch.randn(10, 16), torch.randn(4, 3, 3, 3)]
    w0 = [torch.randn(10, 16), torch.randn(4, 3, 3, 3)]
    eps = 0.1
    ce = torch.stack([F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(8)])
    penalty = torch.clamp(ce - eps, min=0).mean()
    distance = sum(torch.sqrt(((a - b) ** 2).sum()) for a, b in zip(w, w0))  # Frobenius norms
    expected = lmd * penalty - distance
    if lmd > 1:
        expected = expected / (lmd + 1)
    objective, got_penalty, got_distance = d3.d3_objective(logits, labels, w, w0, lmd, eps)
    assert objective.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got_penalty.item() == pytest.approx(penalty.item(), rel=1e-5)
    assert got_distance.item() == pytest.approx(distance.item(), rel=1e-5)


def test_penalty_vanishes_below_eps():
    logits = torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    _, penalty, _ = d3.d3_objective(logits, torch.tensor([0, 1]), [torch.ones(2)], [torch.ones(2)], 10.0, 0.1)
    assert penalty.item() == 0.0


def test_layer_selection():
    model = create_model("preactresnet18_w8", 10)
    assert [n for n, _ in d3.select_layers(model, "linear")] == ["linear"]
    assert [n for n, _ in d3.select_layers(model, "all_linear")] == ["linear"]
    convs = d3.select_layers(model, "layer4")
    assert convs and all(isinstance(m, nn.Conv2d) for _, m in convs)
    assert [n for n, _ in d3.select_layers(model, "linear,layer4.1")][0] == "linear"
    with pytest.raises(UserError, match="not a module"):
        d3.select_layers(model, "fc")


@pytest.mark.parametrize("method", ["uniform", "near", "middle", "far", "noise"])
def test_warm_up_methods(method):
    torch.manual_seed(0)
    w0 = torch.randn(10, 32)
    w = w0.clone()
    d3.warm_up([w], method, 2.0)
    if method == "uniform":
        assert torch.linalg.norm(w) == pytest.approx(torch.linalg.norm(w0).item(), rel=1e-5)
        assert not torch.allclose(w, w0)
    elif method == "near":
        assert torch.equal(w, w0)
    elif method == "middle":
        assert (w == 0).all()
    elif method == "far":
        assert torch.equal(w, -w0)
    else:
        assert not torch.allclose(w, w0)
    with pytest.raises(UserError):
        d3.warm_up([w], "bogus", 2.0)


def _clean_data(n=64):
    torch.manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    return DefenderData(data, DATASETS["cifar10"], torch.device("cpu"), crop_padding=4, hflip=True)


def _cfg(**kw):
    base = dict(lmd=10.0, eps=0.1, Lp=2.0, select_layer_name="linear,layer4", warm_up_method="uniform",
                train_mode=True, client_optimizer="sgd", lr=0.05, sgd_momentum=0.9, wd=0.0,
                lr_scheduler="CosineAnnealingLR", epochs=2, batch_size=16, random_seed=0, amp=False)
    base.update(kw)
    return Config(**base)


def test_projection_keeps_norms_after_every_step(monkeypatch):
    model = create_model("preactresnet18_w8", 10)
    layers = d3.select_layers(model, "linear,layer4")
    init_norms = [torch.linalg.norm(m.weight.detach()).item() for _, m in layers]
    init_weights = [m.weight.detach().clone() for _, m in layers]
    steps = []
    real_fit = d3.fit

    def checking_fit(*args, after_step, **kw):
        def after():
            after_step()
            steps.append([torch.linalg.norm(m.weight.detach()).item() for _, m in layers])
        return real_fit(*args, after_step=after, **kw)
    monkeypatch.setattr(d3, "fit", checking_fit)
    reports = []
    d3.purify(model, _clean_data(), _cfg(), lambda epoch, stats: reports.append(stats))
    assert len(steps) == 2 * 4  # 64 images / batch 16, 2 epochs
    for norms in steps:
        assert norms == pytest.approx(init_norms, rel=1e-5)
    assert all(not torch.allclose(m.weight.detach(), w0) for (_, m), w0 in zip(layers, init_weights))
    assert [set(r) >= {"clean_loss", "distance", "clean_penalty", "train_acc"} for r in reports] == [True, True]
    assert all(r["distance"] > 0 for r in reports)


def test_d3_moves_away_while_fitting_clean_data():
    """On data it can fit, D3 lowers the clean loss and keeps a large distance from theta_init."""
    model = create_model("preactresnet18_w8", 10)
    w0 = model.linear.weight.detach().clone()
    reports = []
    d3.purify(model, _clean_data(32), _cfg(select_layer_name="linear", epochs=15, batch_size=32, lr=0.05),
              lambda e, s: reports.append(s))
    assert reports[-1]["clean_loss"] < reports[0]["clean_loss"]
    assert torch.linalg.norm(model.linear.weight.detach() - w0) > 0.5 * torch.linalg.norm(w0)
