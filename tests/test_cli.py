"""End-to-end runs of the scripts, bad-input handling, and resume."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import defense.d3 as d3
import defense.ft as ft
import utils.attack
from attack.badnet import BadNet
from conftest import ROOT
from models import create_model
from utils.attack import run_attack
from utils.defense import run_defense
from utils.record import load_tensors, save_tensors
from utils.runner import cli_main

ATTACK_FILES = {"record.json", "config.yaml", "model.safetensors", "indices.safetensors", "trigger.safetensors",
                "metrics.csv", "summary.json", "attack.log", "attack_acc_like_metric_plots.png",
                "attack_loss_metric_plots.png"}
TINY = ["--model", "preactresnet18_w8", "--epochs", "2", "--batch_size", "64"]


def defense_files(name):
    return {"record.json", "config.yaml", "model.safetensors", "reserved_index.safetensors", "metrics.csv",
            "summary.json", "defense.log", f"{name}_acc_like_metric_plots.png", f"{name}_loss_metric_plots.png"}


def run_script(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def attacked(tiny_data, tmp_path_factory):
    records = tmp_path_factory.mktemp("records")
    proc = run_script("attack/badnet.py", "--save_folder_name", "e2e", "--dataset_path", str(tiny_data["pickles"]),
                      "--record_dir", str(records), "--random_seed", "1", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return records


def check_fraction(summary, *keys):
    for k in keys:
        assert 0.0 <= summary[k] <= 1.0, (k, summary[k])


def test_attack_record_is_complete(attacked):
    rec = attacked / "e2e"
    assert ATTACK_FILES <= {p.name for p in rec.iterdir()}
    assert not (rec / "checkpoint.pt").exists()
    summary = json.loads((rec / "summary.json").read_text())
    check_fraction(summary, "clean_acc", "asr", "ra")
    meta = json.loads((rec / "record.json").read_text())
    assert meta["format_version"] == 2 and meta["attack"] == "badnet" and meta["dataset"]["name"] == "cifar10"
    config = yaml.safe_load((rec / "config.yaml").read_text())
    assert config["random_seed"] == 1 and config["pratio"] == 0.1 and config["model"] == "preactresnet18_w8"
    text = "".join(p.read_text(errors="ignore") for p in rec.iterdir() if p.suffix in (".json", ".yaml", ".csv"))
    assert str(attacked) not in text and "dataset_path" not in text  # portable: no machine-local paths
    idx = load_tensors(rec / "indices.safetensors")
    assert len(idx["train_poison_index"]) == 20 and len(idx["test_backdoor_index"]) == 90  # 10% of 200; 100 - 10
    trig = load_tensors(rec / "trigger.safetensors")
    assert trig["mask"].sum() == 3 * 3 * 3 and (trig["patch"][:, 29:, 29:] == 255).all()
    rows = (rec / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "asr" in rows[0] and "train_images_per_s" in rows[0]


@pytest.mark.parametrize("name", ["d3", "ft"])
def test_defense_end_to_end(attacked, tiny_data, name):
    proc = run_script(f"defense/{name}.py", "--result_file", "e2e", "--dataset_path", str(tiny_data["pickles"]),
                      "--record_dir", str(attacked), "--epochs", "2", "--ratio", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = attacked / "e2e" / "defense" / name
    assert defense_files(name) <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    check_fraction(summary, "clean_acc", "asr", "ra", "der", "attack_clean_acc", "attack_asr")
    attack_summary = json.loads((attacked / "e2e" / "summary.json").read_text())
    assert summary["attack_clean_acc"] == pytest.approx(attack_summary["clean_acc"])
    assert summary["attack_asr"] == pytest.approx(attack_summary["asr"])
    assert summary["reserved_size"] == 100
    assert len(load_tensors(out / "reserved_index.safetensors")["reserved_index"]) == 100
    if name == "d3":
        header = (out / "metrics.csv").read_text().splitlines()[0]
        assert {"clean_loss", "distance", "clean_acc", "asr", "ra"} <= set(header.split(","))
        assert yaml.safe_load((out / "config.yaml").read_text())["lmd"] == 10.0


def _expect_error(capsys, main, argv, pattern):
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # logs may precede it on stderr
    assert err.startswith("error: "), err
    assert pattern in err, err


def attack_main(argv):
    return run_attack(BadNet, argv)


def defense_main(module, name):
    return lambda argv: run_defense(name, module.purify, getattr(module, "add_arguments", None), argv)


@pytest.mark.parametrize("extra,pattern", [
    (["--model", "resnet999"], "unknown model 'resnet999'"),
    (["--pratio", "1.5"], "--pratio 1.5 is outside (0.0, 1.0]"),
    (["--pratio", "0"], "--pratio 0.0 is outside"),
    (["--attack_target", "10"], "--attack_target 10 is not a class"),
    (["--attack_label_trans", "all2some"], "choose all2one or all2all"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_attack_bad_input(capsys, tiny_data, tmp_path, extra, pattern):
    argv = ["--save_folder_name", "bad", "--dataset_path", str(tiny_data["pickles"]),
            "--record_dir", str(tmp_path), *TINY, *extra]
    _expect_error(capsys, attack_main, argv, pattern)
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_attack_missing_dataset_and_bad_yaml(capsys, tmp_path):
    _expect_error(capsys, attack_main, ["--save_folder_name", "x", "--dataset_path", str(tmp_path / "none.zip"),
                                        "--record_dir", str(tmp_path)], "no cifar10 data found")
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    _expect_error(capsys, attack_main, ["--save_folder_name", "x", "--yaml_path", str(tmp_path / "c.yaml")],
                  "unknown setting 'epochz'")
    assert not (tmp_path / "x").exists()


def test_existing_record_is_not_overwritten(capsys, attacked, tiny_data):
    before = (attacked / "e2e" / "model.safetensors").read_bytes()
    _expect_error(capsys, attack_main, ["--save_folder_name", "e2e", "--dataset_path", str(tiny_data["pickles"]),
                                        "--record_dir", str(attacked), *TINY], "--overwrite")
    assert (attacked / "e2e" / "model.safetensors").read_bytes() == before


def test_defense_bad_input(capsys, attacked, tiny_data, tmp_path):
    base = ["--dataset_path", str(tiny_data["pickles"]), "--epochs", "1"]
    main = defense_main(d3, "d3")
    _expect_error(capsys, main, ["--result_file", "nope", "--record_dir", str(attacked), *base],
                  "no finished attack record")
    _expect_error(capsys, main, ["--result_file", "e2e", "--record_dir", str(attacked), "--ratio", "0", *base],
                  "--ratio 0.0 is outside")
    _expect_error(capsys, main, ["--result_file", "e2e", "--record_dir", str(attacked), "--select_layer_name", "fc",
                                 "--overwrite", *base], "not a module")
    _expect_error(capsys, main, ["--result_file", "e2e", "--record_dir", str(attacked), "--dataset_path",
                                 str(tiny_data["zip"]), "--epochs", "1"], "is not the data the attack used")
    (tmp_path / "idx.txt").write_text("1\n2\n999\n")
    _expect_error(capsys, main, ["--result_file", "e2e", "--record_dir", str(attacked), "--index",
                                 str(tmp_path / "idx.txt"), *base], "distinct indices in 0..199")

    # weights that do not fit the model, and a damaged weights file
    shutil.copytree(attacked / "e2e", tmp_path / "copy", ignore=shutil.ignore_patterns("defense"))
    save_tensors(tmp_path / "copy" / "model.safetensors", create_model("preactresnet18_w16", 10).state_dict())
    _expect_error(capsys, main, ["--result_file", "copy", "--record_dir", str(tmp_path), *base], "do not fit")
    (tmp_path / "copy" / "model.safetensors").write_bytes(b"not safetensors")
    _expect_error(capsys, main, ["--result_file", "copy", "--record_dir", str(tmp_path), *base],
                  "not a valid safetensors file")
    assert not (tmp_path / "copy" / "defense").exists()


def test_reserved_index_file_is_used(capsys, attacked, tiny_data, tmp_path):
    (tmp_path / "idx.txt").write_text("\n".join(str(i) for i in range(0, 200, 4)))
    cli_main(defense_main(ft, "ft"), ["--result_file", "e2e", "--record_dir", str(attacked), "--dataset_path",
                                      str(tiny_data["pickles"]), "--epochs", "1", "--index", str(tmp_path / "idx.txt"),
                                      "--overwrite"])
    out = attacked / "e2e" / "defense" / "ft"
    assert load_tensors(out / "reserved_index.safetensors")["reserved_index"].tolist() == list(range(0, 200, 4))


def test_defense_sees_only_reserved_clean_data(attacked, tiny_data):
    """The threat model as a signature: purify gets the model, the reserved clean data and the config;
    its report hook returns nothing."""
    seen = {}

    def spy(model, clean, cfg, report):
        seen.update(n=len(clean), images=clean.data.images.clone(), report=report(0, {"train_loss": 1.0}),
                    keys=set(vars(cfg)))
        return model
    run_defense("spy", spy, None, ["--result_file", "e2e", "--record_dir", str(attacked), "--dataset_path",
                                   str(tiny_data["pickles"]), "--epochs", "1", "--batch_size", "8",
                                   "--random_seed", "0", "--ratio", "0.25"])
    assert seen["n"] == 50 and seen["report"] is None
    train = torch.from_numpy(tiny_data["x_train"])
    index = load_tensors(attacked / "e2e" / "defense" / "spy" / "reserved_index.safetensors")["reserved_index"]
    assert torch.equal(seen["images"], train[index])  # clean training images, never poisoned or test ones
    assert not {"poison_index", "trigger", "test"} & seen["keys"]


def test_resume_gives_the_same_weights(tiny_data, tmp_path, monkeypatch, capsys):
    argv = ["--dataset_path", str(tiny_data["pickles"]), "--record_dir", str(tmp_path), *TINY, "--epochs", "3"]
    run_attack(BadNet, ["--save_folder_name", "straight", *argv])

    real_save = utils.attack.torch_save
    calls = []

    def save_then_die(path, obj):
        real_save(path, obj)
        calls.append(obj["epoch"])
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(utils.attack, "torch_save", save_then_die)
    with pytest.raises(SystemExit):
        cli_main(attack_main, ["--save_folder_name", "resumed", *argv])
    assert (tmp_path / "resumed" / "checkpoint.pt").exists() and not (tmp_path / "resumed" / "summary.json").exists()
    monkeypatch.setattr(utils.attack, "torch_save", real_save)
    _expect_error(capsys, attack_main, ["--save_folder_name", "resumed", *argv], "--resume")
    _expect_error(capsys, attack_main, ["--save_folder_name", "resumed", *argv, "--lr", "0.5", "--resume"],
                  "settings changed (lr)")
    run_attack(BadNet, ["--save_folder_name", "resumed", *argv, "--resume"])

    a = load_tensors(tmp_path / "straight" / "model.safetensors")
    b = load_tensors(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    import pandas as pd
    resumed, straight = (pd.read_csv(tmp_path / n / "metrics.csv") for n in ("resumed", "straight"))
    assert len(resumed) == 3  # the epochs before the interruption are kept, none repeated
    cols = ["epoch", "train_loss", "clean_acc", "asr", "ra", "clean_test_loss"]
    pd.testing.assert_frame_equal(resumed[cols], straight[cols])
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["asr"] == pytest.approx(
        json.loads((tmp_path / "straight" / "summary.json").read_text())["asr"])


def test_unsafe_checkpoint_is_refused_on_resume(tiny_data, tmp_path, capsys):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))
    (tmp_path / "evil").mkdir()
    torch.save({"model": Payload()}, tmp_path / "evil" / "checkpoint.pt")
    _expect_error(capsys, attack_main, ["--save_folder_name", "evil", "--dataset_path", str(tiny_data["pickles"]),
                                        "--record_dir", str(tmp_path), *TINY, "--resume"], "refused to load")
    assert not sentinel.exists()
