"""The analyses (analysis/): the trajectory between an attacked and a defended model (Figure 2) and
the weight differences of D3's layers (Figure 4b), on the tiny record defended by FT and D3."""
import csv
import json
import math
import importlib

import pytest
import torch
from conftest import copy_record, expect_error, run_args

from attack.record import load_model, rebuild_backdoor_test
from utils.evaluate import Evaluator
from utils.loader import Normalizer
from utils.sources import load_dataset

trajectory = importlib.import_module("analysis.trajectory")
weight_diff = importlib.import_module("analysis.weight_diff")
ft = importlib.import_module("defense.ft")
d3 = importlib.import_module("defense.d3")


@pytest.fixture(scope="module")
def defended(tiny_data, tiny_record, tmp_path_factory):
    root = tmp_path_factory.mktemp("analysed")
    rec = copy_record(tiny_record, root)
    common = ["--result_file", "badnet", *run_args(tiny_data, root), "--epochs", "1", "--ratio", "0.5",
              "--batch_size", "50"]
    ft.main(common)
    d3.main(common)
    return rec


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def analysis_files(rec):
    folder = rec / "analysis"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def evaluated(defended, tiny_data):
    """ACC / ASR / losses of the attacked and the FT-defended model, computed here as the record's evaluation does."""
    dataset = load_dataset("cifar10", tiny_data["pickles"])
    meta = json.loads((defended / "record.json").read_text())
    spec = dataset.spec
    evaluator = Evaluator(dataset.test, rebuild_backdoor_test(meta, defended, dataset),
                          Normalizer(spec.mean, spec.std, "cpu"), device="cpu")
    return {"init": evaluator(load_model(defended)), "ft": evaluator(load_model(defended / "defense" / "ft"))}


def test_trajectory_ends_are_the_attacked_and_the_defended_model(defended, tiny_data, evaluated, capsys):
    rows = trajectory.main(["--result_file", "badnet", *run_args(tiny_data, defended.parent), "--defense", "ft",
                            "--points", "5", "--device", "cpu"])
    assert [r["t"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for row, which in ((rows[0], "init"), (rows[-1], "ft")):
        for key in ("clean_acc", "asr", "ra", "clean_test_loss", "bd_test_loss"):
            assert row[key] == evaluated[which][key], (which, key)
    summary = json.loads((defended / "defense" / "ft" / "summary.json").read_text())
    assert (rows[0]["clean_acc"], rows[0]["asr"]) == (summary["attack_clean_acc"], summary["attack_asr"])
    assert (rows[-1]["clean_acc"], rows[-1]["asr"]) == (summary["clean_acc"], summary["asr"])
    out = defended / "analysis"
    written = rows_of(out / "trajectory_ft.csv")
    assert len(written) == 5 and {"t", "clean_test_loss", "bd_test_loss", "clean_acc", "asr", "ra"} <= set(written[0])
    assert (out / "trajectory_ft.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_trajectory_overlays_several_defenses_with_points_rows_each(defended, tiny_data, tmp_path):
    prefix = tmp_path / "both"
    trajectory.main(["--result_file", "badnet", *run_args(tiny_data, defended.parent), "--defense", "ft,d3",
                     "--points", "3", "--t_max", "2", "--device", "cpu", "--out", str(prefix)])
    written = rows_of(tmp_path / "both.csv")
    assert [r["defense"] for r in written] == ["ft"] * 3 + ["d3"] * 3
    assert [float(r["t"]) for r in written[:3]] == [0.0, 1.0, 2.0]
    assert (tmp_path / "both.png").is_file()


def test_batchnorm_buffers_are_interpolated_and_integer_buffers_kept():
    a = torch.nn.BatchNorm2d(2)
    b = torch.nn.BatchNorm2d(2)
    a.running_mean.fill_(1.0)
    b.running_mean.fill_(3.0)
    a.running_var.fill_(2.0)
    b.running_var.fill_(4.0)
    a.num_batches_tracked.fill_(7)
    b.num_batches_tracked.fill_(9)
    with torch.no_grad():
        b.weight.fill_(5.0)
    mid = trajectory.interpolate(a.state_dict(), b.state_dict(), 0.5)
    assert torch.equal(mid["running_mean"], torch.full((2,), 2.0))
    assert torch.equal(mid["running_var"], torch.full((2,), 3.0))
    assert torch.equal(mid["weight"], torch.full((2,), 3.0))
    assert int(mid["num_batches_tracked"]) == 7
    far = trajectory.interpolate(a.state_dict(), b.state_dict(), 2.0)
    assert torch.equal(far["running_mean"], torch.full((2,), 5.0))
    for t, ref in ((0.0, a), (1.0, b)):
        ends = trajectory.interpolate(a.state_dict(), b.state_dict(), t)
        assert all(torch.equal(ends[k], v) for k, v in ref.state_dict().items() if v.is_floating_point())


def test_a_point_whose_running_variance_crosses_zero_is_left_out_not_scored(capsys):
    """Past t = 1 a variance can turn negative: the model computes NaN there, which an argmax would
    count as class 0 (a false 100% ASR); the point is NaN instead, and only defined points are evaluated."""
    a, b = torch.nn.BatchNorm1d(2).eval(), torch.nn.BatchNorm1d(2).eval()
    a.running_var.fill_(3.0)
    b.running_var.copy_(torch.tensor([1.0, 2.0]))  # var_t = 3 - 2t (first channel): 0 at t = 1.5
    evaluated = []

    def evaluator(model):
        evaluated.append(model.running_var.clone())
        return {m: 1.0 for m in trajectory.METRICS}
    rows = trajectory.trajectory(a, b, [0.0, 1.0, 1.4, 1.5, 2.0], evaluator, torch.device("cpu"))
    assert [r["t"] for r in rows] == [0.0, 1.0, 1.4, 1.5, 2.0] and len(evaluated) == 3
    assert all(r["asr"] == 1.0 for r in rows[:3])
    assert all(math.isnan(r[m]) for r in rows[3:] for m in trajectory.METRICS)
    assert "t=1.5: 1 BatchNorm running variance(s) not positive" in capsys.readouterr().err


def test_trajectory_of_the_tiny_model_interpolates_its_bn_statistics(defended):
    init, ft_model = load_model(defended), load_model(defended / "defense" / "ft")
    a, b = init.state_dict(), ft_model.state_dict()
    stats = [k for k in a if k.endswith("running_mean") and not torch.equal(a[k], b[k])]
    assert stats  # fine-tuning in train mode moved them
    mid = trajectory.interpolate(a, b, 0.5)
    assert all(torch.allclose(mid[k], (a[k] + b[k]) / 2, atol=1e-6) for k in stats)


@pytest.mark.parametrize("extra,pattern", [
    (["--result_file", "nothing"], "no finished attack record"),
    (["--defense", "nc"], "no finished defense output"),
    (["--defense", "bogus"], "no defense of this toolkit"),
    (["--defense", "ft,,d3"], "--defense"),
    (["--points", "1"], "--points 1"),
    (["--t_max", "0"], "--t_max 0"),
    (["--t_max", "-1"], "--t_max -1"),
    (["--t_max", "nan"], "--t_max nan"),
])
def test_trajectory_bad_input_is_one_line_and_writes_nothing(defended, tiny_data, capsys, extra, pattern):
    before = analysis_files(defended)
    argv = ["--result_file", "badnet", *run_args(tiny_data, defended.parent), "--device", "cpu", *extra]
    expect_error(capsys, trajectory.main, argv, pattern)
    assert analysis_files(defended) == before


def frobenius_rows(path):
    """{(defense, layer): (frobenius, numel, sum of the counts)} from a weight_diff CSV."""
    out = {}
    for r in rows_of(path):
        key = (r["defense"], r["layer"])
        f, n, total = out.get(key, (float(r["frobenius"]), int(r["numel"]), 0))
        out[key] = (f, n, total + int(r["count"]))
    return out


def test_weight_diff_distances_are_the_norms_of_the_differences(defended, capsys):
    rows = weight_diff.main(["--result_file", "badnet", "--record_dir", str(defended.parent)])
    init = load_model(defended).state_dict()
    found = frobenius_rows(defended / "analysis" / "weight_diff_ft+d3.csv")
    assert {k[1] for k in found} == {"all"}  # D3's default for PreAct-ResNet18: its one classifier layer
    for name in ("ft", "d3"):
        diff = load_model(defended / "defense" / name).state_dict()["linear.weight"] - init["linear.weight"]
        distance, numel, counted = found[(name, "all")]
        assert distance == pytest.approx(torch.norm(diff).item(), rel=1e-6)
        assert distance == next(r["frobenius"] for r in rows if r["defense"] == name)
        assert numel == counted == diff.numel()
    assert found[("d3", "all")][0] > found[("ft", "all")][0]  # D3 moves theta_s away; FT barely does
    assert (defended / "analysis" / "weight_diff_ft+d3.png").stat().st_size > 0
    assert "||theta_def - theta_init||_F" in capsys.readouterr().out


def test_weight_diff_chosen_layers_get_a_panel_each(defended, tmp_path):
    layers = "layer4.1.conv2,linear"
    weight_diff.main(["--result_file", "badnet", "--record_dir", str(defended.parent), "--defenses", "ft",
                      "--layers", layers, "--bins", "7", "--out", str(tmp_path / "wd")])
    found = frobenius_rows(tmp_path / "wd.csv")
    assert set(found) == {("ft", "all"), ("ft", "layer4.1.conv2"), ("ft", "linear")}
    a, b = load_model(defended).state_dict(), load_model(defended / "defense" / "ft").state_dict()
    for layer in layers.split(","):
        diff = b[f"{layer}.weight"] - a[f"{layer}.weight"]
        assert found[("ft", layer)][0] == pytest.approx(torch.norm(diff).item(), rel=1e-6)
        assert found[("ft", layer)][2] == diff.numel()
    total = (found[("ft", "layer4.1.conv2")][0] ** 2 + found[("ft", "linear")][0] ** 2) ** 0.5
    assert found[("ft", "all")][0] == pytest.approx(total, rel=1e-5)
    assert len(rows_of(tmp_path / "wd.csv")) == 3 * 7 and (tmp_path / "wd.png").is_file()


@pytest.mark.parametrize("extra,pattern", [
    (["--result_file", "nothing"], "no finished attack record"),
    (["--defenses", "ft,nc"], "no finished defense output"),
    (["--defenses", "bogus"], "no defense of this toolkit"),
    (["--layers", "layer9"], "--layers 'layer9' is not a module"),
    (["--layers", "avgpool"], "holds no Linear or Conv2d"),
    (["--bins", "0"], "--bins 0"),
])
def test_weight_diff_bad_input_is_one_line_and_writes_nothing(defended, capsys, extra, pattern):
    before = analysis_files(defended)
    expect_error(capsys, weight_diff.main, ["--result_file", "badnet", "--record_dir", str(defended.parent), *extra],
                 pattern)
    assert analysis_files(defended) == before


def test_a_defense_of_an_earlier_attack_run_is_refused(defended, tiny_data, tmp_path, capsys):
    """A defense output left from before the attack was rerun names another record.json: refused."""
    import shutil
    rec = copy_record(defended, tmp_path)
    shutil.rmtree(rec / "analysis", ignore_errors=True)  # what the tests above wrote
    shutil.copytree(defended / "defense" / "ft", rec / "defense" / "ft")
    manifest = rec / "defense" / "ft" / "record.json"
    meta = json.loads(manifest.read_text())
    meta["attack_record_sha256"] = "0" * 64
    manifest.write_text(json.dumps(meta))
    expect_error(capsys, weight_diff.main, ["--result_file", "badnet", "--record_dir", str(tmp_path),
                                            "--defenses", "ft"], "earlier run of the attack record")
    assert not (rec / "analysis").exists()
