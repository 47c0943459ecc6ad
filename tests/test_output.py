"""Nothing lost (utils/output.py, utils/checkpoint.py, utils/cli.py): interruptions keep finished results
and resume bit for bit, reruns over finished outputs, a second run on the same output, signals, and
unwritable folders refused before any slow work."""
import importlib
import json
import os
import signal
import time

import pytest
import torch
from conftest import TINY, copy_record, d3_args, expect_error, interrupt_after_saves, run_args

import attack.badnet as badnet
import defense.d3 as d3
import defense.ft as ft
import utils.report
from utils.cli import cli_main
from utils.errors import UserError
from utils.output import check_writable, claim_output, staging_dir
from utils.record import load_tensors


def interrupted(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    assert exc.value.code == 130
    return capsys.readouterr().err.strip().splitlines()[-1]


def same_weights(a, b) -> bool:
    a, b = load_tensors(a), load_tensors(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
    monkeypatch.setattr(utils.report.EpochReporter, "__call__", stop)
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


@pytest.mark.parametrize("folder", ["/dev/null/rec", "/proc/rec"])
def test_unwritable_record_dir_fails_before_any_slow_work(capsys, tmp_path, folder):
    # the dataset path does not exist: the record folder must be refused before the data is looked at
    expect_error(capsys, badnet.main, ["--save_folder_name", "x", "--record_dir", folder, "--dataset_path",
                                       str(tmp_path / "absent")], f"cannot write results under {folder}")
    assert not (tmp_path / "absent").exists()


def test_check_writable_names_the_flag(tmp_path):
    check_writable(tmp_path / "new" / "folder", "--record_dir")
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(UserError, match="choose a writable folder with --record_dir"):
        check_writable(tmp_path / "file.txt" / "sub", "--record_dir")
