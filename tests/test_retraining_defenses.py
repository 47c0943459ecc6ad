"""FT-SAM, NAD, SAU and i-BAU: end to end on the shared tiny record, and each algorithm's core by hand."""
import importlib
import inspect
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import copy_record, expect_error, run_args

from utils.errors import UserError
from utils.record import load_tensors
from utils.sam import SAM

ft_sam = importlib.import_module("defense.ft-sam")
nad = importlib.import_module("defense.nad")
sau = importlib.import_module("defense.sau")
ibau = importlib.import_module("defense.i-bau")
MODULES = {"ft-sam": ft_sam, "nad": nad, "sau": sau, "i-bau": ibau}
RUNS = {"ft-sam": ["--epochs", "2"], "nad": ["--epochs", "1", "--te_epochs", "1"], "sau": ["--epochs", "1"],
        "i-bau": ["--epochs", "2"]}


@pytest.fixture(scope="module")
def retrained(tiny_data, tiny_record, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrained")
    rec = copy_record(tiny_record, root)
    for name, module in MODULES.items():
        module.main(["--result_file", "badnet", *run_args(tiny_data, root), "--ratio", "0.5", "--batch_size", "50",
                     *RUNS[name]])
    return rec


@pytest.mark.parametrize("name", list(MODULES))
def test_defense_writes_every_file(retrained, name):
    out = retrained / "defense" / name
    assert {"record.json", "config.yaml", "model.safetensors", "reserved_index.safetensors", "metrics.csv",
            "summary.json", "defense.log", f"{name}_acc_like_metric_plots.png"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert all(0.0 <= summary[k] <= 1.0 for k in ("clean_acc", "asr", "ra", "attack_clean_acc", "attack_asr"))
    assert summary["reserved_size"] == 100 and summary["train_images_per_s"] > 0 and summary["wall_seconds"] > 0
    attacked = load_tensors(retrained / "model.safetensors")
    purified = load_tensors(out / "model.safetensors")
    assert attacked.keys() == purified.keys()
    assert any(not torch.equal(attacked[k], purified[k]) for k in attacked)  # it did change the model


def test_defenses_receive_only_model_clean_data_config_and_report():
    for module in MODULES.values():
        assert list(inspect.signature(module.purify).parameters) == ["model", "clean", "cfg", "report"]


def test_ft_sam_reserves_equal_numbers_per_class(retrained, tiny_data):
    index = load_tensors(retrained / "defense" / "ft-sam" / "reserved_index.safetensors")["reserved_index"]
    counts = torch.bincount(torch.from_numpy(tiny_data["y_train"])[index], minlength=10)
    assert counts.tolist() == [10] * 10


def test_nad_reports_teacher_then_student(retrained):
    import pandas as pd
    rows = pd.read_csv(retrained / "defense" / "nad" / "metrics.csv")
    assert rows["epoch"].tolist() == [0, 1, 2]
    assert rows["stage"].tolist()[1:] == ["nad teacher", "nad student"]
    assert rows["clean_acc"].notna().all()  # each stage evaluates its own last epoch
    assert "at_loss_layer3" in rows and "at_loss_layer4" in rows


# ----------------------------------------------------------------------------- SAM


def test_sam_ascent_by_hand():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    w.grad = torch.tensor([0.3, 0.4, -1.2])
    g = w.grad.clone()
    plain = SAM(torch.optim.SGD([w], lr=0.1), nn.Identity(), rho=2.0, adaptive=False)
    (_, e), = plain.ascent()
    assert torch.allclose(e, 2.0 * g / g.norm())
    adaptive = SAM(torch.optim.SGD([w], lr=0.1), nn.Identity(), rho=2.0, adaptive=True)
    (_, e), = adaptive.ascent()
    assert torch.allclose(e, 2.0 * w.detach() ** 2 * g / (w.detach().abs() * g).norm())


def test_sam_steps_with_the_gradient_at_the_perturbed_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    w0 = [p.detach().clone() for p in model.parameters()]
    seen, stats = [], []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        stats.append(model[1].running_mean.clone())
        return loss

    optimizer = SAM(torch.optim.SGD(model.parameters(), lr=0.5), model, rho=0.05, adaptive=False)
    optimizer.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], w0))  # first pass at w
    shift = [b - a for a, b in zip(seen[0], seen[1])]
    assert torch.linalg.vector_norm(torch.cat([s.flatten() for s in shift])) == pytest.approx(0.05, rel=1e-4)
    assert torch.equal(stats[0], stats[1])  # the second pass leaves the running statistics alone
    # The update: back to w, then SGD with the gradient taken at w + e.
    probe = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for p, v in zip(probe.parameters(), seen[1]):
            p.copy_(v)
    F.cross_entropy(probe(x), y).backward()
    for p, start, q in zip(model.parameters(), w0, probe.parameters()):
        assert torch.allclose(p.detach(), start - 0.5 * q.grad, atol=1e-6)


def test_smooth_cross_entropy_by_hand():
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    log_p = F.log_softmax(logits, 1)[0]
    expected = -(0.9 * log_p[0] + 0.05 * log_p[1] + 0.05 * log_p[2])
    assert ft_sam.smooth_cross_entropy(logits, y, 0.1).item() == pytest.approx(expected.item())


# ----------------------------------------------------------------------------- NAD


def test_nad_attention_map_and_loss_by_hand():
    a = torch.tensor([[[[1.0, -2.0]], [[0.0, 1.0]]]])  # [N=1, C=2, H=1, W=2]
    am = nad.attention_map(a, 2.0)  # channel sums of squares: [1, 5]; L2 norm sqrt(26)
    assert torch.allclose(am.flatten(), torch.tensor([1.0, 5.0]) / (26 ** 0.5 + 1e-6))
    b = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # map [4, 0] -> [1, 0]
    expected = ((am.flatten() - torch.tensor([4.0, 0.0]) / (4.0 + 1e-6)) ** 2).mean()
    assert nad.attention_loss(a, b, 2.0).item() == pytest.approx(expected.item())
    pooled_s, pooled_t = torch.randn(4, 8, 1, 1), torch.randn(4, 8, 1, 1)
    assert nad.attention_loss(pooled_s, pooled_t, 2.0).item() < 1e-10  # BackdoorBench's third term: always ~0


@pytest.mark.parametrize("name,extra,pattern", [
    ("nad", ["--nad_layers", "layer3,block9"], "no module 'block9'"),
    ("nad", ["--teacher_model_loc", "missing.safetensors"], "--teacher_model_loc missing.safetensors not found"),
    ("sau", ["--norm_type", "L3"], "--norm_type 'L3'"),
    ("ft-sam", ["--label_smoothing", "1.5"], "--label_smoothing 1.5 is outside"),
    ("i-bau", ["--K", "0"], "--K 0 must be at least 1"),
])
def test_bad_settings_are_one_clear_line(capsys, tiny_data, tiny_record, tmp_path, name, extra, pattern):
    copy_record(tiny_record, tmp_path)
    expect_error(capsys, MODULES[name].main, ["--result_file", "badnet", *run_args(tiny_data, tmp_path), *extra],
                 pattern)
    assert not (tmp_path / "badnet" / "defense" / name).exists()


# ----------------------------------------------------------------------------- SAU


def test_sau_shared_term_counts_only_samples_that_fool_the_frozen_model():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    adv_label_ref = torch.tensor([0, 0, 2])
    fools = torch.tensor([True, False, True])
    loss = sau.shared_adversarial_loss(logits, adv_label_ref, fools)
    p = F.softmax(logits, 1)
    pos = torch.stack([p[0, 0], p[2, 2]])
    expected = (-torch.log(1e-6 + (1 - pos).clamp(max=0.999)).sum()
                - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2 / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed = logits.clone()
    changed[1] = torch.tensor([5.0, -5.0, 0.0])  # a sample that does not fool the frozen model: no effect
    assert sau.shared_adversarial_loss(changed, adv_label_ref, fools).item() == pytest.approx(loss.item())
    values = [sau.shared_adversarial_loss(torch.tensor([[s, 0.0, 0.0]]), torch.tensor([0]), torch.tensor([True]))
              for s in (-1.0, 0.0, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:]))  # grows with p(frozen model's adversarial label)
    assert sau.shared_adversarial_loss(logits, adv_label_ref, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_sau_pgd_stays_in_budget():
    from types import SimpleNamespace
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    reference = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(5, 3, 2, 2), torch.randint(0, 3, (5,))
    cfg = SimpleNamespace(pgd_init="max", norm_type="L_inf", trigger_norm=0.2, adv_steps=5, adv_lr=0.2,
                          beta_1=0.01, beta_2=1.0)
    delta = sau.shared_pgd(model, reference, x, y, lambda d: d, cfg)
    assert delta.abs().max() <= 0.2 + 1e-7
    steps = delta / 0.2  # from +0.2, steps of 0.2 * sign, clamped: only -0.2, 0 and 0.2 are reachable
    assert torch.allclose(steps, steps.round(), atol=1e-5) and (steps.round() != 1).any()
    l2 = sau.project(torch.ones(2, 3, 2, 2), "L2", 0.5)
    assert torch.allclose(torch.linalg.vector_norm(l2.flatten(1), dim=1), torch.tensor([0.5, 0.5]))
    with pytest.raises(UserError):
        sau.purify(model, None, SimpleNamespace(norm_type="L3", pgd_init="max"), None)


# ----------------------------------------------------------------------------- i-BAU


@pytest.mark.parametrize("K", [1, 3, 200])
def test_ibau_hypergradient_on_a_quadratic(K):
    """Inner: delta*(theta) = argmin 0.5 a (delta - theta)^2 = theta; outer: 0.5 delta^2, so the true
    hypergradient is theta. K fixed-point iterations of the map delta - eta a (delta - theta) give
    (1 - (1 - eta a)^K) theta."""
    a, eta = 2.0, 0.1
    theta = torch.tensor([1.5, -0.5], requires_grad=True)
    surrogate = ibau.hypergradient_surrogate(theta.detach().clone(), lambda d: 0.5 * a * ((d - theta) ** 2).sum(),
                                             lambda d: 0.5 * (d ** 2).sum(), K, eta)
    surrogate.backward()
    expected = (1 - (1 - eta * a) ** K) * theta.detach()
    assert torch.allclose(theta.grad, expected, atol=1e-6)
    if K == 200:
        assert torch.allclose(theta.grad, theta.detach(), atol=1e-6)
