"""Nothing lost (utils/output.py, utils/checkpoint.py, utils/cli.py): interruptions keep finished results
and resume bit for bit, reruns over finished outputs (a replaced record kept with its defenses, an
output that is a link), a second run on the same output, a killed run's lock and temporary files,
signals, file modes, and unwritable folders refused before any slow work."""
import contextlib
import importlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
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
from utils.output import check_writable, claim_output, commit_output, open_output, plan_output, staging_dir
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


def test_overwrite_without_resume_starts_an_interrupted_run_again(capsys, monkeypatch, tiny_data, tiny_record,
                                                                   tmp_path):
    """``--overwrite`` alone means start again: an interrupted run's checkpoint is not resumed."""
    copy_record(tiny_record, tmp_path)
    restore = interrupt_after_saves(monkeypatch, 2)
    interrupted(capsys, ft.main, d3_args(tiny_data, tmp_path, "--epochs", "3"))
    restore()
    ft.main(d3_args(tiny_data, tmp_path, "--epochs", "3", "--overwrite"))
    out = tmp_path / "badnet" / "defense" / "ft"
    log = (out / "defense.log").read_text()
    assert "resuming" not in log and (out / "record.json").is_file() and not (out / "checkpoint.pt").exists()
    import pandas as pd
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [0, 1, 2, 3]


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


# ----------------------------------------------------------------------------- replaced results are kept

def _finished(folder, files=("model.safetensors",), extra=()):
    """A hand-made finished result: ``files`` listed in its record.json, plus a log, a plot and ``extra``."""
    folder.mkdir(parents=True)
    for name in (*files, "run.log", "curves.png", *extra):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    (folder / "record.json").write_text(json.dumps({"files": {name: "0" * 64 for name in files}}))
    return folder


def dead_pid() -> int:
    """The id of a process that has ended (what a killed run's lock names)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def _replaced(folder) -> list:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f"{folder.name}.replaced-"))


def _modes(folder) -> set:
    return {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


@contextlib.contextmanager
def umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def test_attack_overwrite_keeps_the_replaced_record_with_its_defenses(capsys, monkeypatch, tiny_data, tiny_record,
                                                                      tmp_path):
    """An interrupted overwrite keeps the old record and its defense in place; finished with --resume, the
    old record moves, whole, beside the new one (the defense defended the old model), said in one line.
    Files and folders are written as other tools write them: 0644 / 0755 under umask 022."""
    rec = copy_record(tiny_record, tmp_path)
    ft.main(["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "1"])
    manifest, defense = (rec / "record.json").read_bytes(), (rec / "defense" / "ft" / "record.json").read_bytes()
    argv = ["--save_folder_name", "badnet", *run_args(tiny_data, tmp_path), "--random_seed", "2", *TINY,
            "--overwrite"]
    restore = interrupt_after_saves(monkeypatch, 1)
    with umask(0o022):
        interrupted(capsys, badnet.main, argv)
        assert (rec / "record.json").read_bytes() == manifest and (rec / "defense" / "ft" / "record.json").is_file()
        assert not _replaced(rec)
        restore()
        badnet.main([*argv, "--resume"])
    kept = _replaced(rec)
    assert len(kept) == 1 and re.fullmatch(r"badnet\.replaced-\d{8}-\d{6}", kept[0]), kept
    old = tmp_path / kept[0]
    assert (old / "record.json").read_bytes() == manifest
    assert (old / "defense" / "ft" / "record.json").read_bytes() == defense
    assert (rec / "record.json").read_bytes() != manifest and not (rec / "defense").exists()
    said = [ln for ln in capsys.readouterr().err.splitlines() if str(old) in ln]
    assert len(said) == 1 and "defense/" in said[0], said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badnet", kept[0]]  # no lock, no staging left
    assert _modes(rec) == {(True, 0o755), (False, 0o644)}


def test_replaced_outputs_are_kept_when_they_hold_more_than_their_run(capsys, tmp_path, monkeypatch):
    """A defense output holding only its run's files is replaced as before; one holding anything else
    (a note, a subfolder) is kept beside it; a second one the same second gets a counter."""
    monkeypatch.setattr("utils.output.time.strftime", lambda fmt: "20240101-120000")
    out = _finished(tmp_path / "defense" / "ft")
    _finished(staging_dir(out), files=("model.safetensors", "metrics.csv"))
    commit_output(staging_dir(out), out)
    assert (out / "metrics.csv").is_file() and not _replaced(out) and not staging_dir(out).exists()
    for extra in ("notes.txt", "sub/x.txt"):
        (out / extra).parent.mkdir(exist_ok=True)
        (out / extra).write_text("mine")
        _finished(staging_dir(out))
        commit_output(staging_dir(out), out)
        assert not (out / extra).exists()
    assert _replaced(out) == ["ft.replaced-20240101-120000", "ft.replaced-20240101-120000-2"]
    assert (tmp_path / "defense" / "ft.replaced-20240101-120000" / "notes.txt").is_file()
    assert (tmp_path / "defense" / "ft.replaced-20240101-120000-2" / "sub" / "x.txt").is_file()
    assert "ft.replaced-20240101-120000-2" in capsys.readouterr().err


def test_an_interrupted_replacement_or_an_unfinished_output_is_kept_not_cleared(capsys, tmp_path):
    """Killed between the exchange and the move aside, the previous record waits in the staging folder: the
    next run keeps it. An unfinished output with defenses under it (record.json lost) is kept too."""
    out = _finished(tmp_path / "rec")
    _finished(staging_dir(out), extra=("defense/ft/record.json",))  # the previous record, just exchanged out
    open_output(staging_dir(out), out)
    assert staging_dir(out).is_dir() and not list(staging_dir(out).iterdir())
    kept = tmp_path / _replaced(out)[0]
    assert (kept / "defense" / "ft" / "record.json").is_file() and str(kept) in capsys.readouterr().err
    other = tmp_path / "other"
    (other / "defense" / "ft").mkdir(parents=True)
    (other / "defense" / "ft" / "record.json").write_text("{}")
    assert plan_output(other, overwrite=True, resume=False) == other
    open_output(other, other)
    assert not list(other.iterdir()) and (tmp_path / _replaced(other)[0] / "defense" / "ft" / "record.json").is_file()


def test_an_output_that_is_a_link_is_replaced_at_its_target_and_keeps_its_link(capsys, tiny_data, tiny_record,
                                                                                tmp_path):
    records, elsewhere = tmp_path / "records", tmp_path / "elsewhere"
    target = copy_record(tiny_record, elsewhere, "base")
    (target / "defense" / "ft").mkdir(parents=True)
    (target / "defense" / "ft" / "record.json").write_text("{}")
    records.mkdir()
    (records / "base").symlink_to(target)
    (records / ".base.rerun").symlink_to(target)  # the stray link an older version left behind
    argv = ["--save_folder_name", "base", *run_args(tiny_data, records), *TINY, "--epochs", "1", "--overwrite"]
    for _ in range(2):  # the second overwrite replaces a record with nothing under it: no copy kept
        badnet.main(argv)
        assert os.readlink(records / "base") == str(target) and (target / "record.json").is_file()
        assert os.listdir(records) == ["base"] and not (target / "defense").exists()
        kept = _replaced(target)
        assert sorted(os.listdir(elsewhere)) == ["base", *kept] and len(kept) == 1
        assert (elsewhere / kept[0] / "defense" / "ft" / "record.json").is_file()


def test_a_killed_runs_lock_and_temporary_files_do_not_stay(capsys, monkeypatch, tiny_data, tiny_record, tmp_path):
    """SIGKILL runs no cleanup: the lock file naming a process that is gone is taken over (said in a
    line), the temporary files in its output are removed by the run that resumes it."""
    rec = copy_record(tiny_record, tmp_path)
    out, argv = rec / "defense" / "ft", ["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "2"]
    restore = interrupt_after_saves(monkeypatch, 1)
    interrupted(capsys, ft.main, argv)
    restore()
    gone = dead_pid()
    (out.parent / ".ft.lock").write_text(f"{gone}\n")
    (out / ".x.tmp.png").write_bytes(b"half a figure")
    (out / ".metrics.csv.0123abcd.tmp").write_text("half a table")
    ft.main([*argv, "--resume"])
    err = capsys.readouterr().err
    assert f"left by process {gone}, which is gone" in err and "removed 2 temporary file(s)" in err
    assert (out / "record.json").is_file() and not (out.parent / ".ft.lock").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, mask):
    from sweeps.table_files import write_tables
    from utils.plots import pyplot, save_figure
    from utils.record import save_tensors, torch_save, write_text
    out = tmp_path / "out"
    with umask(mask):
        open_output(out, out)
        write_text(out / "a.txt", "a")
        save_tensors(out / "t.safetensors", {"x": torch.zeros(2)})
        torch_save(out / "c.pt", {"x": torch.zeros(2)})
        save_figure(pyplot().figure(), out / "f.png")
        write_tables([], out / "tables" / "sweep")
    assert _modes(out) == {(True, 0o777 & ~mask), (False, 0o666 & ~mask)}
    assert len(list(out.rglob("*"))) == 8
