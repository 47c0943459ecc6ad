"""No result lost, every record verified, one clear line for each bad input, a first run that explains
itself: interruptions and resume, reruns over finished results, damaged records, unwritable folders,
the offline first run, the time estimate, the training subset and the results table."""
import importlib
import io
import json
import logging
import os
import signal
import time

import pytest
import torch

import attack.badnet as badnet
import defense.d3 as d3
import defense.ft as ft
import utils.runner
from conftest import TINY, copy_record, expect_error, interrupt_after_saves, run_args
from models import create_model
from utils.data import BatchLoader, ImageSet, Normalizer, load_dataset
from utils.errors import UserError
from utils.progress import progress
from utils.record import load_tensors, read_yaml, sha256_file
from utils.results import build_tables, collect, format_runs, format_text
from utils.runner import announce_plan, check_writable, claim_output, cli_main, staging_dir


def interrupted(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    assert exc.value.code == 130
    return capsys.readouterr().err.strip().splitlines()[-1]


def same_weights(a, b) -> bool:
    a, b = load_tensors(a), load_tensors(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def d3_args(tiny_data, root, *extra):
    return ["--result_file", "badnet", *run_args(tiny_data, root), "--ratio", "0.5", *extra]


# ----------------------------------------------------------------------------- nothing lost

def test_interrupted_overwrite_keeps_the_finished_defense_then_resumes(capsys, monkeypatch, tiny_data, tiny_record,
                                                                       tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    out = rec / "defense" / "d3"
    d3.main(d3_args(tiny_data, tmp_path, "--epochs", "1"))
    old_model = (out / "model.safetensors").read_bytes()

    restore = interrupt_after_saves(monkeypatch, 1)
    message = interrupted(capsys, d3.main, d3_args(tiny_data, tmp_path, "--epochs", "3", "--overwrite"))
    assert "the defense d3" in message and "after 1 finished epoch" in message and "--resume" in message
    assert "still holds the previous finished result" in message
    # at every moment the folder holds the old finished result (or the new one): here the old one
    assert (out / "model.safetensors").read_bytes() == old_model and (out / "record.json").is_file()
    assert (staging_dir(out) / "checkpoint.pt").is_file()
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path, "--epochs", "3"), "an interrupted rerun waits")

    restore()
    d3.main(d3_args(tiny_data, tmp_path, "--epochs", "3", "--overwrite", "--resume"))
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
    assert not staging_dir(out).exists() and not (out / "checkpoint.pt").exists()
    assert (out / "model.safetensors").read_bytes() != old_model


def test_interrupted_attack_overwrite_keeps_the_finished_record(capsys, monkeypatch, tiny_data, tiny_record,
                                                                tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    manifest = (rec / "record.json").read_bytes()
    argv = ["--save_folder_name", "badnet", *run_args(tiny_data, tmp_path), "--random_seed", "1", *TINY]
    interrupt_after_saves(monkeypatch, 1)
    message = interrupted(capsys, badnet.main, [*argv, "--overwrite"])
    assert "the attack badnet" in message and "--resume" in message
    assert (rec / "record.json").read_bytes() == manifest and (staging_dir(rec) / "checkpoint.pt").is_file()


@pytest.mark.parametrize("module,extra", [
    (d3, []), (ft, []),
    (importlib.import_module("defense.ft-sam"), []),  # a two-pass optimiser with a per-batch schedule
    (importlib.import_module("defense.nad"), ["--te_epochs", "2"]),  # interrupted in its second stage
    (importlib.import_module("defense.i-bau"), []),  # each round's perturbation is made again on resume
])
def test_defense_resume_is_bit_identical(capsys, monkeypatch, tiny_data, tiny_record, tmp_path, module, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for root in (straight, resumed):
        copy_record(tiny_record, root)
    name = module.__name__.split(".")[-1]
    module.main(d3_args(tiny_data, straight, "--epochs", "3", *extra))
    restore = interrupt_after_saves(monkeypatch, 2)
    interrupted(capsys, module.main, d3_args(tiny_data, resumed, "--epochs", "3", *extra))
    work = resumed / "badnet" / "defense" / name
    assert (work / "checkpoint.pt").is_file() and not (work / "record.json").exists()
    expect_error(capsys, module.main, d3_args(tiny_data, resumed, "--epochs", "3", *extra), "--resume to continue")
    restore()
    module.main(d3_args(tiny_data, resumed, "--epochs", "3", "--resume", *extra))
    a, b = (root / "badnet" / "defense" / name for root in (straight, resumed))
    assert same_weights(a / "model.safetensors", b / "model.safetensors")
    import pandas as pd
    cols = ["epoch", "train_loss", "clean_acc", "asr", "ra"]
    pd.testing.assert_frame_equal(pd.read_csv(a / "metrics.csv")[cols], pd.read_csv(b / "metrics.csv")[cols])


@pytest.mark.parametrize("script", ["badnet", "wanet"])  # a data-poisoning and a training-controlled attack
def test_attack_resume_is_bit_identical(capsys, monkeypatch, tiny_data, tmp_path, script):
    main = importlib.import_module(f"attack.{script}").main
    argv = [*run_args(tiny_data, tmp_path), *TINY]
    main(["--save_folder_name", "straight", *argv])
    restore = interrupt_after_saves(monkeypatch, 1)
    interrupted(capsys, main, ["--save_folder_name", "resumed", *argv])
    restore()
    expect_error(capsys, main, ["--save_folder_name", "resumed", *argv, "--lr", "0.5", "--resume"],
                 "settings changed (lr)")
    main(["--save_folder_name", "resumed", *argv, "--resume"])
    assert same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")
    import pandas as pd
    a, b = (pd.read_csv(tmp_path / n / "metrics.csv") for n in ("straight", "resumed"))
    assert len(b) == 2  # the epoch before the interruption is kept, none repeated
    cols = ["epoch", "train_loss", "clean_acc", "asr", "ra", "clean_test_loss"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_resume_without_a_checkpoint(capsys, tiny_data, tiny_record, tmp_path):
    copy_record(tiny_record, tmp_path)
    argv = ["--save_folder_name", "badnet", *run_args(tiny_data, tmp_path), *TINY, "--resume"]
    expect_error(capsys, badnet.main, argv, "holds a finished run and there is no interrupted run to resume")
    badnet.main(["--save_folder_name", "fresh", *run_args(tiny_data, tmp_path), *TINY, "--epochs", "1", "--resume"])
    assert "no interrupted run to resume" in capsys.readouterr().err
    assert (tmp_path / "fresh" / "record.json").is_file()


def test_interrupt_before_the_first_epoch_keeps_nothing(capsys, monkeypatch, tiny_data, tmp_path):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(utils.runner.EpochReporter, "__call__", stop)
    message = interrupted(capsys, badnet.main, ["--save_folder_name", "x", *run_args(tiny_data, tmp_path), *TINY])
    assert "the attack badnet" in message and "before its first epoch finished; nothing of it was kept" in message
    assert not (tmp_path / "x").exists()


def test_a_second_run_on_the_same_output_is_refused(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    out = rec / "defense" / "ft"
    out.parent.mkdir()
    with claim_output(out):  # another run (here: this test) is writing defense/ft
        with pytest.raises(UserError, match="another run is writing"), claim_output(out):
            pass
        expect_error(capsys, ft.main, ["--result_file", rec.name, *run_args(tiny_data, tmp_path), "--epochs", "1",
                                       "--resume"], f"another run is writing {out} now")
        assert not out.exists()
    assert not (out.parent / ".ft.lock").exists()  # the claim ends with its run and leaves no file
    ft.main(["--result_file", rec.name, *run_args(tiny_data, tmp_path), "--epochs", "1"])
    assert (out / "record.json").is_file() and not (out.parent / ".ft.lock").exists()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_run_as_ctrl_c_does(capsys, signame):
    """A cluster's time limit or a closed terminal: the interruption message and exit code 128 + signal;
    a signal the process started ignoring (nohup) stays ignored."""
    signum = getattr(signal, signame)

    def main(argv):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the signal arrives before this ends
        raise AssertionError("the signal did not stop the run")

    before = signal.signal(signum, signal.SIG_DFL)  # as a script starts (pytest's runner may differ)
    try:
        with pytest.raises(SystemExit) as exc:
            cli_main(main, [])
        assert exc.value.code == 128 + signum
        assert "interrupted before anything was written" in capsys.readouterr().err
        assert signal.getsignal(signum) is signal.SIG_DFL  # the previous handler is back

        signal.signal(signum, signal.SIG_IGN)  # started under nohup (SIGHUP) or told to ignore it
        cli_main(lambda argv: os.kill(os.getpid(), signum), [])  # ignored: the run goes on and ends
        assert signal.getsignal(signum) is signal.SIG_IGN
    finally:
        if before is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signum, before)


# ----------------------------------------------------------------------------- records verified

def test_missing_files_are_named(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    (rec / "summary.json").unlink()
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "summary.json is missing; the record is incomplete")
    (rec / "record.json").unlink()
    err = expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "record.json, written last by a finished run, "
                       "is missing")
    assert "model.safetensors" in err  # says what is there
    (rec / "checkpoint.pt").write_bytes(b"")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "its run was interrupted")


def test_flipped_bytes_in_the_weights_are_caught(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    data = bytearray((rec / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 100, header + 1100):  # 1,000 bytes inside the tensor data
        data[i] ^= 0xFF
    (rec / "model.safetensors").write_bytes(bytes(data))
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path),
                 "model.safetensors does not match the SHA-256 in")
    assert not (rec / "defense").exists()


def _rewrite(rec, name, text):
    """Edit a record file and its hash alike, as a user who knows the format might."""
    (rec / name).write_text(text)
    meta = json.loads((rec / "record.json").read_text())
    meta["files"][name] = sha256_file(rec / name)
    (rec / "record.json").write_text(json.dumps(meta))


def test_config_yaml_faults_are_one_line(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    sentinel = tmp_path / "pwned"
    original = (rec / "config.yaml").read_text()
    (rec / "config.yaml").write_text(original + "x: 1\n")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "config.yaml does not match the SHA-256")
    _rewrite(rec, "config.yaml", "model: [unclosed\n")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "config.yaml is not plain YAML")
    _rewrite(rec, "config.yaml", f"model: !!python/object/apply:os.system ['touch {sentinel}']\n")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "config.yaml is not plain YAML")
    assert not sentinel.exists()
    _rewrite(rec, "config.yaml", "[1, 2]\n")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "does not hold a mapping")
    (rec / "config.yaml").unlink()
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "config.yaml is missing")
    with pytest.raises(UserError, match="not plain YAML"):
        read_yaml(_write(tmp_path / "t.yaml", "a: !!python/name:os.system\n"))


def _write(path, text):
    path.write_text(text)
    return path


def test_older_record_format_is_refused(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    meta = json.loads((rec / "record.json").read_text())
    meta["format_version"] = 1
    (rec / "record.json").write_text(json.dumps(meta))
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path),
                 "has record format version 1, this toolkit reads version 2 only; rerun the step that wrote it")


# ----------------------------------------------------------------------------- bad input, first run

@pytest.mark.parametrize("folder", ["/dev/null/rec", "/proc/rec"])
def test_unwritable_record_dir_fails_before_any_slow_work(capsys, tmp_path, folder):
    # the dataset path does not exist: the record folder must be refused before the data is looked at
    expect_error(capsys, badnet.main, ["--save_folder_name", "x", "--record_dir", folder, "--dataset_path",
                                       str(tmp_path / "absent")], f"cannot write results under {folder}")
    assert not (tmp_path / "absent").exists()


def test_check_writable_names_the_flag(tmp_path):
    check_writable(tmp_path / "new" / "folder", "--record_dir")
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())
    _write(tmp_path / "file.txt", "")
    with pytest.raises(UserError, match="choose a writable folder with --record_dir"):
        check_writable(tmp_path / "file.txt" / "sub", "--record_dir")


def test_offline_first_run_says_what_to_place_where(monkeypatch, tmp_path):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as exc:
        load_dataset("cifar10", "data")
    message = str(exc.value)
    assert f"{tmp_path / 'data'}" in message and "could not be downloaded" in message
    assert "cifar-10-batches-py/" in message and "train/<class>/" in message and ".zip" in message
    assert "\n" not in message
    assert not (tmp_path / "data").exists()  # no empty folder left behind


def test_announce_plan_estimates_time_and_suggests_the_quick_start(caplog):
    model = create_model("preactresnet18_w8", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ImageSet(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,)))
    loader = BatchLoader(data, 32, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"), device="cpu")
    logger = logging.getLogger("test-announce")
    with caplog.at_level(logging.INFO, logger="test-announce"):
        announce_plan(logger, torch.device("cpu"), model, loader, epochs=100_000, images_per_epoch=50_000,
                      amp=False, evaluations=100, eval_images=19_000, cpu_hint="try the quick start")
    text = caplog.text
    assert "device cpu" in text and "training and" in text and "evaluation images/s" in text and " h" in text
    assert "long run for a CPU; try the quick start" in text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched


def test_progress_bars_are_off_when_stderr_is_not_a_terminal():
    assert progress(range(3), file=io.StringIO()).disable


def test_train_subset_is_balanced_seeded_recorded_and_inherited(tiny_data, tmp_path):
    argv = [*run_args(tiny_data, tmp_path), *TINY, "--epochs", "1", "--train_subset", "50"]
    badnet.main(["--save_folder_name", "sub", *argv])
    rec = tmp_path / "sub"
    meta = json.loads((rec / "record.json").read_text())
    assert meta["dataset"]["train_subset"] == 50 and meta["dataset"]["train_size"] == 50
    index = load_tensors(rec / "indices.safetensors")["train_subset_index"]
    labels = torch.from_numpy(tiny_data["y_train"])[index]
    assert len(index) == 50 and torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 5))
    assert len(load_tensors(rec / "indices.safetensors")["train_poison_index"]) == 5
    badnet.main(["--save_folder_name", "sub2", *argv])
    assert torch.equal(index, load_tensors(tmp_path / "sub2" / "indices.safetensors")["train_subset_index"])
    ft.main(["--result_file", "sub", *run_args(tiny_data, tmp_path), "--epochs", "1", "--ratio", "0.5"])
    out = rec / "defense" / "ft"
    assert json.loads((out / "summary.json").read_text())["reserved_size"] == 25
    assert load_tensors(out / "reserved_index.safetensors")["reserved_index"].max() < 50


# ----------------------------------------------------------------------------- results table

def test_results_table(capsys, tiny_data, tiny_record, tmp_path):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "sh" / "results_table.py")
    results_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_table)

    rec = copy_record(tiny_record, tmp_path)
    ft.main(["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "1"])
    rows = collect(tmp_path)
    assert [(r.record, r.defense, r.problem) for r in rows] == [("badnet", "-", ""), ("badnet", "ft", "")]
    summary = json.loads((rec / "defense" / "ft" / "summary.json").read_text())
    table = results_table.main(["--record_dir", str(rec)])  # one record's folder works too
    assert f"{100 * summary['clean_acc']:.2f}" in table and f"{100 * summary['der']:.2f}" in table
    paper = format_text(build_tables(rows)[0]).splitlines()
    assert paper[3].startswith("badnet") and paper[3].split()[-3:] == [f"{100 * summary[k]:.2f}" for k in
                                                                       ("clean_acc", "asr", "der")]

    (rec / "defense" / "ft" / "summary.json").write_text(json.dumps({**summary, "asr": 0.0}))
    assert "summary.json does not match record.json" in format_runs(collect(tmp_path))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "checkpoint.pt").write_bytes(b"")
    assert any(r.record == "half" and r.problem == "unfinished" for r in collect(tmp_path))
    expect_error(capsys, results_table.main, ["--record_dir", str(tmp_path / "nope")], "is not a folder")


def test_data_poisoning_attacks_drop_the_last_partial_batch(monkeypatch, tiny_data, tmp_path):
    """BackdoorBench trains data-poisoning attacks and the prototype with ``drop_last=True``; WaNet and
    Input-aware (poisoning inside each batch, their own loaders) keep the last partial batch. 200 tiny
    training images in batches of 64: 3 batches, or 4."""
    import attack.prototype as prototype
    import attack.wanet as wanet
    import utils.attack

    class Seen(Exception):
        pass

    class Spy(BatchLoader):  # records the training loader's length, then stops the run before training
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            raise Seen(len(self))

    monkeypatch.setattr(utils.attack, "BatchLoader", Spy)
    for main, batches in ((badnet.main, 3), (prototype.main, 3), (wanet.main, 4)):
        with pytest.raises(Seen) as seen:
            main(["--save_folder_name", main.__module__, *run_args(tiny_data, tmp_path), *TINY])
        assert seen.value.args == (batches,), main.__module__
