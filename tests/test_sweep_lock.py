"""Locks (utils/output.py hold_lock): a run's output held by a live process is refused naming it; the
same sweep started twice (sweeps/launch.py, sh/sweep.sh): the second launcher on a record folder a sweep
is running on is refused in one line, exit 2, writes nothing, and its sh/sweep.sh writes no table; the
lock a killed launcher left is taken over, and the temporary file a killed table build left goes."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import ROOT, copy_record

from utils.errors import UserError
from utils.output import claim_output


def _launch():
    spec = importlib.util.spec_from_file_location("launch", ROOT / "sweeps" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = _launch()


def _argv(tiny_data, records, *extra) -> list[str]:
    return ["--attacks", "badnet", "--defenses", "none", "--model", "preactresnet18_w8", "--epochs", "2",
            "--seeds", "1", "--dataset_path", str(tiny_data["pickles"]), "--device", "cpu", "--record_dir",
            str(records), "--prefix", "t_", "--attack_args", "--batch_size 64", *extra]


def dead_pid() -> int:
    """The id of a process that has ended (what a killed launcher's lock names)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_second_sweep_on_the_same_records_is_refused_and_writes_no_table(tiny_data, tmp_path):
    records, table = tmp_path / "records", tmp_path / "results" / "sweep"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    with launch.sweep_lock(records):  # the first sweep, still running
        expected = f"error: a sweep is already running on {records} (pid {os.getpid()}); wait for it or stop it"
        second = subprocess.run([sys.executable, "sweeps/launch.py", *_argv(tiny_data, records)], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [expected], second.stderr
        assert second.stdout == ""
        script = subprocess.run(["bash", "sh/sweep.sh", *_argv(tiny_data, records)], cwd=ROOT, capture_output=True,
                                text=True, env={**env, "TABLE": str(table), "RECORD_DIR": str(records)})
        assert script.returncode == 2 and expected in script.stderr, script.stderr
        assert _files(records) == ["_logs", "_logs/.sweep.lock"] and not table.parent.exists()
    assert _files(records) == ["_logs"]  # the lock ends with its sweep


def test_a_killed_launchers_lock_is_taken_over(capsys, tiny_data, tiny_record, tmp_path):
    records = tmp_path / "records"
    copy_record(tiny_record, records, "t_badnet_s1")  # the sweep's one job is done: nothing runs
    gone = dead_pid()
    (records / "_logs").mkdir()
    (records / "_logs" / ".sweep.lock").write_text(f"{gone}\n")
    assert launch.main(_argv(tiny_data, records)) == 0
    out, err = capsys.readouterr()
    assert "skipped" in out and f"left by process {gone}, which is gone" in err
    assert not (records / "_logs" / ".sweep.lock").exists()


def test_a_killed_writers_temporary_file_goes_with_the_next_write(tmp_path):
    """A table (or any file written atomically) killed half-way leaves ``.<name>.<pid>-<x>.tmp``: the next
    write of that file removes it once its writer is gone, never a live writer's."""
    from sweeps.table_files import write_tables
    dead, live = tmp_path / f".sweep.csv.{dead_pid()}-0a1b.tmp", tmp_path / f".sweep.csv.{os.getppid()}-2c3d.tmp"
    for f in (dead, live):
        f.write_text("half a table")
    write_tables([], tmp_path / "sweep")
    assert not dead.exists() and live.exists() and (tmp_path / "sweep.csv").is_file()


def test_a_live_owner_is_named_and_refused(tmp_path):
    out = tmp_path / "out"
    code = (f"import sys, time; from pathlib import Path; from utils.output import claim_output\n"
            f"with claim_output(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"another run is writing {out} now \(pid {owner.pid}\)"), \
                claim_output(out):
            pass
    finally:
        owner.kill()
        owner.wait()
    with claim_output(out):  # the OS dropped the killed owner's lock: taken over
        assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
