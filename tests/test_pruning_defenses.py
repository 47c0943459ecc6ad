"""ANP and FP, and the held-out split of the defender's clean data that replaces the test sets as
their validation signal."""
import importlib
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from conftest import copy_record, expect_error, leaks, run_args

from defense.base import DefenderData
from models import create_model
from utils.datasets import DatasetSpec, ImageSet
from utils.loader import BatchLoader, Normalizer
from utils.record import load_tensors

anp = importlib.import_module("defense.anp")
fp = importlib.import_module("defense.fp")
RUNS = {"anp": ["--nb_iter", "4", "--print_every", "2", "--batch_size", "32"],
        "fp": ["--epochs", "1", "--batch_size", "50", "--once_prune_ratio", "0.25"]}


def clean_data(n=40):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    spec = DatasetSpec("toy", 10, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return DefenderData(ImageSet(images, torch.arange(n) % 10), spec, torch.device("cpu"))


def test_held_out_split_is_disjoint_and_fixed_by_the_seed():
    clean = clean_data()
    train, held = clean.split(0.1, seed=3)
    ids = lambda part: set(part.data.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert len(held) == 4 and len(train) == 36 and not ids(train) & ids(held)
    assert ids(train) | ids(held) == set(range(40)) and clean.held_out == 4
    again, held_again = clean.split(0.1, seed=3)
    assert ids(held_again) == ids(held) and ids(clean.split(0.1, seed=4)[1]) != ids(held)


@pytest.fixture(scope="module")
def pruned(tiny_data, tiny_record, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    rec = copy_record(tiny_record, root)
    for name, module in (("anp", anp), ("fp", fp)):
        module.main(["--result_file", "badnet", *run_args(tiny_data, root), "--ratio", "0.5", *RUNS[name]])
    return rec


@pytest.mark.parametrize("name", ["anp", "fp"])
def test_defense_writes_every_file(pruned, name):
    out = pruned / "defense" / name
    extra = {"anp": ["anp_mask_values.safetensors", "anp_thresholds.png"],
             "fp": ["fp_pruning.safetensors", "fp_pruning_curve.png"]}[name]
    written = {p.name for p in out.iterdir()}
    assert {"record.json", "model.safetensors", "metrics.csv", "summary.json", *extra} <= written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reserved_size"] == 100 and summary["held_out_size"] == 10 and summary["train_size"] == 90
    assert all(0.0 <= summary[k] <= 1.0 for k in ("clean_acc", "asr", "ra"))
    meta = json.loads((out / "record.json").read_text())
    assert extra[0] in meta["files"]  # the tensors a defense saves are verified like the rest
    key = {"anp": "pruned_neurons", "fp": "pruned_channels"}[name]
    assert summary[key] >= 0


def test_anp_pruned_model_is_the_attacked_one_with_zeroed_bn_weights(pruned):
    out = pruned / "defense" / "anp"
    attacked, defended = load_tensors(pruned / "model.safetensors"), load_tensors(out / "model.safetensors")
    masks = load_tensors(out / "anp_mask_values.safetensors")
    assert all(((m >= 0) & (m <= 1)).all() for m in masks.values())  # clipped to [0, 1]
    changed = [k for k in attacked if not torch.equal(attacked[k], defended[k])]
    assert all(k.endswith(".weight") and k[:-len(".weight")] in masks for k in changed)
    zeroed = sum(int(((defended[k] == 0) & (attacked[k] != 0)).sum()) for k in changed)
    assert zeroed == json.loads((out / "summary.json").read_text())["pruned_neurons"]


def test_anp_pruning_by_threshold_removes_exactly_the_neurons_under_it():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(3))
    masks = {"0": torch.tensor([0.9, 0.1, 0.5, 0.05]), "1": torch.tensor([0.3, 1.0, 0.2])}
    ranking = anp.ranked_neurons(masks)
    assert [v for v, _, _ in ranking] == sorted(v for m in masks.values() for v in m.tolist())
    accuracy = {0.0: 1.0, 0.25: 0.95, 0.5: 0.7}  # held-out accuracy by the number of neurons pruned
    state = lambda m: float(sum(int((m[i].weight == 0).sum()) for i in (0, 1)))  # noqa: E731
    acc_by_count = {0: 1.0, 3: 0.95, 5: 0.7}
    threshold, count, curve = anp.choose_threshold(model, ranking, [0.0, 0.25, 0.5],
                                                   lambda m: acc_by_count[int(state(m))], 0.1)
    assert (threshold, count) == (0.25, 3) and [a for _, a in curve] == list(accuracy.values())
    anp.prune_neurons(model, ranking[:count])
    assert model[0].weight.tolist() == [1.0, 0.0, 1.0, 0.0] and model[1].weight.tolist() == [1.0, 1.0, 0.0]


def test_anp_masks_stay_in_unit_interval_and_noise_only_acts_when_perturbed():
    torch.manual_seed(0)
    model = create_model("preactresnet18_w8", 10)
    net, switch, masks, noises = anp.perturbable_copy(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), model.eval()(x), atol=1e-5)  # mask 1, no noise: the same model
    loss, logs = anp.anp_loss(net.train(), switch, noises, x, y, eps=0.4, steps=1, alpha=0.2)
    assert not switch["on"] and all(n.abs().max() <= 0.8 + 1e-6 for n in noises)
    loss.backward()
    opt = torch.optim.SGD(list(masks.values()), lr=10.0)
    opt.step()
    for m in masks.values():
        m.data.clamp_(0, 1)
    assert all(((m >= 0) & (m <= 1)).all() for m in masks.values())
    assert all(p.grad is None for n, p in net.named_parameters() if "original" in n)  # the model stays fixed


@pytest.mark.parametrize("nb_iter,per_round,rows", [(3, 2, [2, 1]), (1, 500, [1]), (4, 2, [2, 2])])
def test_anp_runs_exactly_nb_iter_batches_in_rounds(nb_iter, per_round, rows):
    """BackdoorBench's loop runs --nb_iter batches and reports every --print_every: the last round
    holds what is left (``--nb_iter 1 --print_every 500`` once ran 500)."""
    data = ImageSet(torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    inner = BatchLoader(data, 2, Normalizer((0, 0, 0), (1, 1, 1), "cpu"), device="cpu", num_batches=per_round)
    loader = anp.MaskRounds(inner, nb_iter, per_round)
    counts = []
    for epoch in range(loader.rounds):
        loader.set_epoch(epoch)
        counts.append(sum(1 for _ in loader))
        assert counts[-1] == len(loader)
    assert counts == rows and sum(counts) == nb_iter


def test_fp_prunes_in_ascending_order_of_mean_activation_and_zeroes_the_channels():
    layer = nn.Linear(4, 2)
    model = nn.Sequential(nn.Flatten(), layer)
    data = [(torch.tensor([[3.0, 0.5, 2.0, 0.1], [1.0, 0.5, 2.0, 0.3]]), torch.zeros(2, dtype=torch.long))]
    mean = fp.mean_channel_activation(model, layer, data)
    assert torch.allclose(mean, torch.tensor([2.0, 0.5, 2.0, 0.2]))
    ranking = torch.argsort(mean)
    assert ranking[:2].tolist() == [3, 1]
    fp.prune_channels(layer, ranking[:2])
    assert (layer.weight[:, [1, 3]] == 0).all() and (layer.weight[:, [0, 2]] != 0).all()
    x = torch.tensor([[1.0, 5.0, 1.0, -7.0]])
    y = x.clone()
    y[0, [1, 3]] = 0.0
    assert torch.equal(model(x), model(y))  # a pruned channel contributes nothing


@pytest.mark.parametrize("name,extra,pattern", [
    ("fp", ["--prune_layer", "layer4"], "--prune_layer 'layer4' is not a Linear layer"),
    ("anp", ["--pruning_by", "number"], "needs --pruning_number"),
    ("anp", ["--anp_eps", "-1"], "--anp_eps -1.0: the noise budget is a size"),
])
def test_bad_settings_are_one_clear_line(capsys, tiny_data, tiny_record, tmp_path, name, extra, pattern):
    copy_record(tiny_record, tmp_path)
    module = {"anp": anp, "fp": fp}[name]
    expect_error(capsys, module.main, ["--result_file", "badnet", *run_args(tiny_data, tmp_path), *extra], pattern)
    assert not (tmp_path / "badnet" / "defense" / name).exists()


def test_purify_receives_no_test_data_poison_index_or_trigger(tiny_data, tiny_record, tmp_path):
    """Walk every object reachable from what purify receives (attributes, containers) and look for
    the test images, the poison indices and the trigger."""
    from attack.record import load_attack_record
    from defense.base import Defense
    from defense.runner import run_defense
    copy_record(tiny_record, tmp_path)
    record = load_attack_record(tmp_path / "badnet")
    secrets = [torch.from_numpy(tiny_data["x_test"])]
    secrets += list(load_tensors(tmp_path / "badnet" / "indices.safetensors").values())
    secrets += list(load_tensors(tmp_path / "badnet" / "trigger.safetensors").values())
    assert len(leaks(SimpleNamespace(inner=[{"x": secrets[0].clone()}]), secrets)) == 1  # the walker finds a plant
    found = []

    def spy(model, clean, cfg, report):
        found.extend(leaks((model, clean, cfg, report), secrets))
        report(0, {"train_loss": 1.0})
        return model
    run_defense(Defense("spy", spy, "spy defense"), ["--result_file", "badnet", *run_args(tiny_data, tmp_path),
                                                     "--epochs", "1", "--ratio", "0.5", "--random_seed", "0",
                                                     "--batch_size", "8"])
    assert record.meta and not found


def test_test_set_rule_reports_what_backdoorbench_would_have_chosen(pruned, tiny_data):
    """The comparison script (not a defense) reads the saved masks and ranking against the test sets."""
    import importlib.util

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("test_set_rule", ROOT / "tools" / "test_set_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main(["--record_dir", str(pruned.parent), "--result_file", "badnet",
                        "--dataset_path", str(tiny_data["pickles"]), "--device", "cpu"])
    anp_part, fp_part = text.split("\n\n")
    summary = json.loads((pruned / "defense" / "anp" / "summary.json").read_text())
    threshold_rows = [ln for ln in anp_part.splitlines()[2:]]
    assert len(threshold_rows) == 19 and any("held-out rule (ours)" in ln for ln in threshold_rows)
    ours = next(ln for ln in threshold_rows if "held-out rule (ours)" in ln)
    assert float(ours.split()[0]) == summary["threshold"]
    fp_summary = json.loads((pruned / "defense" / "fp" / "summary.json").read_text())
    assert f"held-out rule (ours)       {fp_summary['pruned_channels']:>7}" in fp_part
    assert "BackdoorBench's test rule" in fp_part
