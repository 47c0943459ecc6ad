"""End-to-end runs of the scripts (in-process on the shared tiny record; two real subprocess runs),
the threat model, and bad input."""
import importlib
import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, TINY, copy_record, expect_error, run_args

import attack.badnet as badnet
import defense.d3 as d3
import defense.ft as ft
from defense.base import Defense
from defense.runner import run_defense
from models import create_model
from sweeps.collect import NO_DEFENSE, collect
from utils.record import load_tensors, save_tensors, sha256_file

ATTACK_FILES = {"record.json", "config.yaml", "model.safetensors", "indices.safetensors", "trigger.safetensors",
                "metrics.csv", "summary.json", "attack.log", "attack_acc_like_metric_plots.png",
                "attack_loss_metric_plots.png"}


def defense_files(name):
    return {"record.json", "config.yaml", "model.safetensors", "reserved_index.safetensors", "metrics.csv",
            "summary.json", "defense.log", f"{name}_acc_like_metric_plots.png", f"{name}_loss_metric_plots.png"}


def check_fraction(summary, *keys):
    for k in keys:
        assert 0.0 <= summary[k] <= 1.0, (k, summary[k])


@pytest.fixture(scope="module")
def defended(tiny_data, tiny_record):
    """The shared record defended once by D3 and by FT (2 epochs, half the training data)."""
    for module in (d3, ft):
        module.main(["--result_file", "badnet", *run_args(tiny_data, tiny_record.parent), "--epochs", "2",
                     "--ratio", "0.5", "--overwrite"])
    return tiny_record


def test_cli_subprocess_attack_then_defense_then_table(tiny_data, tmp_path):
    """The real command lines, as a user types them (the only subprocess runs of the suite)."""
    def run(*args):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc
    run("attack/badnet.py", "--save_folder_name", "cli", *run_args(tiny_data, tmp_path), *TINY, "--epochs", "1")
    proc = run("defense/d3.py", "--result_file", "cli", *run_args(tiny_data, tmp_path), "--epochs", "1")
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr  # no progress bars when stderr is not a terminal
    table = run("sweeps/results_table.py", "--record_dir", str(tmp_path), "--runs").stdout
    assert "cli" in table and "badnet" in table and "d3" in table


def test_attack_record_is_complete(tiny_record):
    rec = tiny_record
    assert ATTACK_FILES <= {p.name for p in rec.iterdir()}
    assert not (rec / "checkpoint.pt").exists()
    summary = json.loads((rec / "summary.json").read_text())
    check_fraction(summary, "clean_acc", "asr", "ra")
    meta = json.loads((rec / "record.json").read_text())
    assert meta["format_version"] == 2 and meta["attack"] == "badnet" and meta["dataset"]["name"] == "cifar10"
    assert set(meta["files"]) == {"config.yaml", "trigger.safetensors", "indices.safetensors", "model.safetensors",
                                  "metrics.csv", "summary.json"}
    assert all(sha256_file(rec / name) == digest for name, digest in meta["files"].items())
    config = yaml.safe_load((rec / "config.yaml").read_text())
    assert config["random_seed"] == 1 and config["pratio"] == 0.1 and config["model"] == "preactresnet18_w8"
    text = "".join(p.read_text(errors="ignore") for p in rec.iterdir() if p.suffix in (".json", ".yaml", ".csv"))
    assert str(rec.parent) not in text and "dataset_path" not in text  # portable: no machine-local paths
    idx = load_tensors(rec / "indices.safetensors")
    assert len(idx["train_poison_index"]) == 20 and len(idx["test_backdoor_index"]) == 90  # 10% of 200; 100 - 10
    trig = load_tensors(rec / "trigger.safetensors")
    assert trig["mask"].sum() == 3 * 3 * 3 and (trig["patch"][:, 29:, 29:] == 255).all()
    rows = (rec / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "asr" in rows[0] and "train_images_per_s" in rows[0]
    assert "attack record finished" in (rec / "attack.log").read_text()


@pytest.mark.parametrize("name", ["d3", "ft"])
def test_defense_end_to_end(defended, name):
    out = defended / "defense" / name
    assert defense_files(name) <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    check_fraction(summary, "clean_acc", "asr", "ra", "der", "attack_clean_acc", "attack_asr")
    attack_summary = json.loads((defended / "summary.json").read_text())
    assert summary["attack_clean_acc"] == pytest.approx(attack_summary["clean_acc"])
    assert summary["attack_asr"] == pytest.approx(attack_summary["asr"])
    assert summary["reserved_size"] == 100
    assert len(load_tensors(out / "reserved_index.safetensors")["reserved_index"]) == 100
    meta = json.loads((out / "record.json").read_text())
    assert meta["attack_record_sha256"] == sha256_file(defended / "record.json")  # which attack run it defends
    assert set(meta["files"]) == {"config.yaml", "reserved_index.safetensors", "model.safetensors", "metrics.csv",
                                  "summary.json"}
    if name == "d3":
        header = (out / "metrics.csv").read_text().splitlines()[0]
        assert {"clean_loss", "distance", "clean_acc", "asr", "ra"} <= set(header.split(","))
        assert yaml.safe_load((out / "config.yaml").read_text())["lmd"] == 10.0


@pytest.mark.parametrize("extra,pattern", [
    (["--model", "resnet999"], "unknown model 'resnet999'"),
    (["--pratio", "1.5"], "--pratio 1.5 is outside (0.0, 1.0]"),
    (["--pratio", "0"], "--pratio 0.0 is outside"),
    (["--attack_target", "10"], "--attack_target 10 is not a class"),
    (["--attack_label_trans", "all2some"], "choose all2one or all2all"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--train_subset", "0"], "--train_subset asks for 0 images; choose between 1 and the 200"),
    (["--lr", "nan"], "--lr nan is not a finite number"),
    (["--wd", "inf"], "--wd inf is not a finite number"),
    (["--wd=-0.1"], "--wd -0.1 must not be negative"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_attack_bad_input(capsys, tiny_data, tmp_path, extra, pattern):
    argv = ["--save_folder_name", "bad", *run_args(tiny_data, tmp_path), *TINY, *extra]
    expect_error(capsys, badnet.main, argv, pattern)
    assert not (tmp_path / "bad").exists()  # nothing written


@pytest.mark.parametrize("name,extra,pattern", [
    ("badnet", ["--patch_size", "40"], "--patch_size 40 must be between 1 and 32"),
    ("blended", ["--attack_test_blended_alpha", "1.5"], "--attack_test_blended_alpha 1.5 is outside"),
    ("sig", ["--sig_delta", "0"], "--sig_delta 0.0 must be positive"),
    ("wanet", ["--k", "99"], "--k 99 must be between 1 and the image size 32"),
    ("inputaware", ["--pratio", "0.5"], "Input-aware needs pratio < 0.5"),
    ("lf", ["--lf_cutoff", "2"], "--lf_cutoff 2.0 is outside (0, 1]"),
    ("ssba", ["--ssba_secret", ""], "--ssba_secret '' is empty"),
    ("ssba", ["--ssba_encoder_epochs", "0"], "--ssba_encoder_epochs 0 must be at least 1"),
])
def test_attack_flags_are_checked_before_the_dataset(capsys, tmp_path, name, extra, pattern):
    """A bad value of an attack's own flag is named before any data is read: here the dataset does not
    exist, so a check that came after loading it would say so instead."""
    main = importlib.import_module(f"attack.{name}").main
    expect_error(capsys, main, ["--save_folder_name", "bad", "--dataset_path", str(tmp_path / "none.zip"),
                                "--record_dir", str(tmp_path), *extra], pattern)
    assert not (tmp_path / "bad").exists()


def test_attack_missing_dataset_and_bad_yaml(capsys, tmp_path):
    expect_error(capsys, badnet.main, ["--save_folder_name", "x", "--dataset_path", str(tmp_path / "none.zip"),
                                       "--record_dir", str(tmp_path)], "no cifar10 data found")
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    expect_error(capsys, badnet.main, ["--save_folder_name", "x", "--yaml_path", str(tmp_path / "c.yaml")],
                 "unknown setting 'epochz'")
    assert not (tmp_path / "x").exists()


def test_existing_record_is_not_overwritten(capsys, tiny_data, tiny_record):
    before = (tiny_record / "model.safetensors").read_bytes()
    expect_error(capsys, badnet.main, ["--save_folder_name", "badnet", *run_args(tiny_data, tiny_record.parent),
                                       *TINY], "--overwrite")
    assert (tiny_record / "model.safetensors").read_bytes() == before


def test_defense_bad_input(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    base = [*run_args(tiny_data, tmp_path), "--epochs", "1"]
    expect_error(capsys, d3.main, ["--result_file", "nope", *base], "no finished attack record")
    expect_error(capsys, d3.main, ["--result_file", "badnet", "--ratio", "0", *base], "--ratio 0.0 is outside")
    expect_error(capsys, ft.main, ["--result_file", "badnet", "--wd", "nan", *base], "--wd nan is not a finite")
    expect_error(capsys, d3.main, ["--result_file", "badnet", "--Lp", "0", *base], "--Lp 0.0 gives no norm")
    # a loss that overflows stops the run at that epoch with one line; no finished output (FT: one batch an
    # epoch here, so the second epoch's loss is the first to see the exploded weights)
    expect_error(capsys, ft.main, ["--result_file", "badnet", *base, "--lr", "1e30", "--epochs", "2"],
                 "the training loss became nan in epoch 2/2")
    assert not (rec / "defense" / "ft" / "record.json").exists()
    nad = importlib.import_module("defense.nad")
    expect_error(capsys, nad.main, ["--result_file", "badnet", "--te_epochs", "0", *base], "fine-tunes no teacher")
    assert not (rec / "defense" / "nad").exists()
    expect_error(capsys, d3.main, ["--result_file", "badnet", "--select_layer_name", "fc", *base], "not a module")
    expect_error(capsys, d3.main, ["--result_file", "badnet", *base, "--dataset_path", str(tiny_data["zip"])],
                 "is not the data the attack used")
    (tmp_path / "idx.txt").write_text("1\n2\n999\n")
    expect_error(capsys, d3.main, ["--result_file", "badnet", "--index", str(tmp_path / "idx.txt"), *base],
                 "distinct indices in 0..199")
    expect_error(capsys, d3.main, ["--result_file", "badnet", "--index", str(tmp_path), *base], "is a folder")
    (tmp_path / "empty.txt").write_text("\n")
    expect_error(capsys, d3.main, ["--result_file", "badnet", "--index", str(tmp_path / "empty.txt"), *base],
                 "is empty")
    pdb = importlib.import_module("defense.pdb")
    expect_error(capsys, pdb.main, ["--result_file", "badnet", "--index", str(tmp_path / "idx.txt"), *base],
                 "holds no reserve of clean data; leave --index out")
    assert not (rec / "defense" / "pdb").exists()
    assert not (rec / "defense" / "d3").exists()
    # weights of another model, consistently re-hashed (an edited record): named by the strict loader
    save_tensors(rec / "model.safetensors", create_model("preactresnet18_w16", 10).state_dict())
    meta = json.loads((rec / "record.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(rec / "model.safetensors")
    (rec / "record.json").write_text(json.dumps(meta))
    expect_error(capsys, d3.main, ["--result_file", "badnet", *base], "do not fit")
    assert not (rec / "defense" / "d3").exists()


def test_save_name_keeps_a_variant_beside_the_default_run(capsys, tiny_data, tiny_record, tmp_path):
    """``--save_name`` writes a variant to its own folder, which the table builder shows as its own
    column; a name that is not one plain folder name is refused with one line, nothing written."""
    rec = copy_record(tiny_record, tmp_path)
    base = ["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "1"]
    expect_error(capsys, ft.main, [*base, "--save_name", "../ft"], "--save_name '../ft'")
    assert not (rec / "defense").exists()
    ft.main(base)
    ft.main([*base, "--lr", "0.05", "--save_name", "ft_lr0.05"])
    assert yaml.safe_load((rec / "defense" / "ft_lr0.05" / "config.yaml").read_text())["lr"] == 0.05
    assert yaml.safe_load((rec / "defense" / "ft" / "config.yaml").read_text())["lr"] == 0.01
    assert {r.defense for r in collect(tmp_path)} == {NO_DEFENSE, "ft", "ft_lr0.05"}


def test_reserved_index_file_is_used(tiny_data, tiny_record, tmp_path):
    copy_record(tiny_record, tmp_path)
    (tmp_path / "idx.txt").write_text("\n".join(str(i) for i in range(0, 200, 4)))
    ft.main(["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "1",
             "--index", str(tmp_path / "idx.txt")])
    out = tmp_path / "badnet" / "defense" / "ft"
    assert load_tensors(out / "reserved_index.safetensors")["reserved_index"].tolist() == list(range(0, 200, 4))


def test_defense_sees_only_reserved_clean_data(tiny_data, tiny_record, tmp_path):
    """The threat model as a signature: purify gets the model, the reserved clean data and the config;
    its report hook returns nothing."""
    copy_record(tiny_record, tmp_path)
    seen = {}

    def spy(model, clean, cfg, report):
        seen.update(n=len(clean), images=clean.data.images.clone(), report=report(0, {"train_loss": 1.0}),
                    keys=set(vars(cfg)), public=[a for a in dir(report) if not a.startswith("_")])
        return model
    run_defense(Defense("spy", spy, "spy defense"), ["--result_file", "badnet", *run_args(tiny_data, tmp_path),
                                                     "--epochs", "1", "--batch_size", "8", "--random_seed", "0",
                                                     "--ratio", "0.25"])
    assert seen["n"] == 50 and seen["report"] is None
    # checkpointing through fit, and ways to keep what the defense decided; no metric to read
    assert set(seen["public"]) == {"start", "restore", "save", "log", "note", "save_tensors", "save_image",
                                   "save_plot"}
    train = torch.from_numpy(tiny_data["x_train"])
    index = load_tensors(tmp_path / "badnet" / "defense" / "spy" / "reserved_index.safetensors")["reserved_index"]
    assert torch.equal(seen["images"], train[index])  # clean training images, never poisoned or test ones
    assert not {"poison_index", "trigger", "test"} & seen["keys"]


def test_unsafe_checkpoint_is_refused_on_resume(capsys, tiny_data, tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))
    (tmp_path / "evil").mkdir()
    torch.save({"model": Payload()}, tmp_path / "evil" / "checkpoint.pt")
    expect_error(capsys, badnet.main, ["--save_folder_name", "evil", *run_args(tiny_data, tmp_path), *TINY,
                                       "--resume"], "refused to load")
    assert not sentinel.exists()


def _script_mains():
    import importlib.util
    scripts = sorted((ROOT / "attack").glob("*.py")) + sorted((ROOT / "defense").glob("*.py")) + \
        [ROOT / "sweeps" / f for f in ("launch.py", "results_table.py")] + \
        [ROOT / "tools" / f for f in ("test_set_rule.py", "bench_throughput.py")]
    for path in scripts:
        if 'if __name__ == "__main__":' not in path.read_text():  # the framework beside the scripts
            continue
        spec = importlib.util.spec_from_file_location(f"_help_{path.parent.name}_{path.stem.replace('-', '_')}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield path, module.main


def test_every_script_prints_its_help(capsys):
    """``--help`` works for every script (argparse formats each help string, so one stray ``%`` in a
    help text or a preset description breaks it), and names the script's own flags."""
    for path, main in _script_mains():
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "usage:" in out, path
