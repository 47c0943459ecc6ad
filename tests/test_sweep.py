"""Sweeps: the launcher's scheduling (order, skip-if-done, resume, refusal of a record made otherwise,
failure reporting) on tiny real runs, in its own pool and through submitit's local executor. The table
builder's tests are in test_tables.py."""
from __future__ import annotations

import os
import re

import pytest
from conftest import ROOT, expect_error, interrupt_after_saves

import attack.badnet as badnet
import sweeps.launch as launch
from sweeps.collect import collect
from utils.cli import cli_main

# ----------------------------------------------------------------------------- the launcher on tiny runs

def sweep_argv(tiny_data, records, *extra) -> list[str]:
    return ["--attacks", "badnet", "--defenses", "ft", "--model", "preactresnet18_w8", "--epochs", "2",
            "--defense_epochs", "1", "--dataset_path", str(tiny_data["pickles"]), "--device", "cpu",
            "--record_dir", str(records), "--prefix", "t_", "--attack_args", "--batch_size 64", *extra]


def launched(capsys, argv) -> tuple[int, list[str]]:
    code = launch.main(argv)
    return code, [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]


def test_pool_runs_skips_resumes_and_refuses(tiny_data, tmp_path, capsys, monkeypatch):
    records = tmp_path / "records"
    code, lines = launched(capsys, sweep_argv(tiny_data, records))
    assert code == 0 and [ln.split()[1:3] for ln in lines] == [["done", "attack"], ["done", "ft"]]
    assert "ACC" in lines[0] and "DER" in lines[1] and " s " in lines[1]
    assert (records / "_logs" / "t_badnet_s0.log").is_file() and (records / "_logs" / "t_badnet_s0.ft.log").is_file()
    assert [r.record for r in collect(records)] == ["t_badnet_s0", "t_badnet_s0"]  # logs are not records

    code, lines = launched(capsys, sweep_argv(tiny_data, records))  # nothing left to do
    assert code == 0 and [ln.split()[1] for ln in lines] == ["skipped", "skipped"]

    # An interrupted attack (seed 1) is continued with --resume by the next sweep.
    job = next(j for j in launch.sweep_from(launch.parser().parse_args(sweep_argv(tiny_data, records, "--seeds", "1")))
               .jobs() if j.kind == "attack")
    restore = interrupt_after_saves(monkeypatch, 1)
    with pytest.raises(SystemExit):
        cli_main(badnet.main, list(job.args))
    restore()
    assert (records / "t_badnet_s1" / "checkpoint.pt").is_file()
    code, lines = launched(capsys, sweep_argv(tiny_data, records, "--seeds", "0,1"))
    assert code == 0 and [ln.split()[1:3] for ln in lines] == [["skipped", "attack"], ["skipped", "ft"],
                                                                ["done", "attack"], ["done", "ft"]]
    assert "--resume" in (records / "_logs" / "t_badnet_s1.log").read_text()

    # A finished record made with other settings is not reused, and its defenses do not start.
    code, lines = launched(capsys, sweep_argv(tiny_data, records, "--epochs", "3"))
    assert code == 1 and "FAILED" in lines[0] and "epochs 2 (asked 3)" in lines[0]
    assert "not started: its attack t_badnet_s0 failed" in lines[1]
    expect_error(capsys, launch.main, sweep_argv(tiny_data, records, "--defenses", "ft,nope"), "unknown defense nope")


def test_a_defense_job_with_save_name_is_looked_for_in_its_own_folder(tiny_data, tmp_path):
    argv = sweep_argv(tiny_data, tmp_path / "records", "--defense_args", "--lr 0.05 --save_name ft_lr0.05")
    job = next(j for j in launch.sweep_from(launch.parser().parse_args(argv)).jobs() if j.kind == "defense")
    assert job.output == tmp_path / "records" / "t_badnet_s0" / "defense" / "ft_lr0.05"


def test_preset_defense_schedules():
    """Long schedules scaled (cpu_small: 100 -> 60, 3 evaluations), a preset's own length for one defense
    (smoke: SAU 10 rounds), PDB on the attack's schedule, counts that are not epochs cut by flag, and
    --defense_epochs over all of it."""
    from sweeps.presets import PRESETS, defense_flags
    smoke, small = PRESETS["smoke"], PRESETS["cpu_small"]
    assert defense_flags("d3", small) == ["--epochs", "60", "--eval_every", "20"]
    assert defense_flags("d3", smoke) == ["--epochs", "20", "--eval_every", "20"]
    assert defense_flags("sau", smoke) == ["--epochs", "10", "--eval_every", "10"]
    assert defense_flags("sau", smoke, epochs=3) == ["--epochs", "3", "--eval_every", "3"]
    assert defense_flags("pdb", smoke) == ["--epochs", "6", "--eval_every", "6", "--lr", "0.05"]
    assert defense_flags("anp", smoke) == ["--nb_iter", "100", "--print_every", "25"]
    assert defense_flags("sau", PRESETS["paper"]) == ["--epochs", "100", "--eval_every", "10"]


def test_parallel_pool_jobs_share_the_cpu_threads():
    """Several jobs on one machine each get an equal share of the cores (OMP_NUM_THREADS), never
    overriding the user's setting; one job keeps PyTorch's default; a GPU slot is the job's only GPU."""
    from sweeps.executors import job_environment
    assert job_environment(None, 2, base={}, cpus=16)["OMP_NUM_THREADS"] == "8"
    assert job_environment(None, 4, base={}, cpus=2)["OMP_NUM_THREADS"] == "1"
    assert job_environment(None, 2, base={"OMP_NUM_THREADS": "3"}, cpus=16)["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in job_environment(None, 1, base={}, cpus=16)
    assert job_environment("1", 4, base={}, cpus=16) == {"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "4"}


def test_an_interrupted_launcher_leaves_no_job_running():
    """A job that stopped by itself (Ctrl-C reached it) is waited for; one that did not (the launcher
    alone was signalled) gets SIGTERM after the grace period."""
    import subprocess
    import sys
    import time

    from sweeps.executors import stop_jobs
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.monotonic()
    stop_jobs([quick, stuck], grace_seconds=0.5)
    assert time.monotonic() - start < 30
    assert quick.returncode == 0 and stuck.returncode == -15  # SIGTERM


@pytest.mark.parametrize("launcher_code,table_built", [(0, True), (1, True), (2, False), (130, False)])
def test_sweep_sh_builds_the_table_unless_the_input_was_bad_or_the_sweep_interrupted(tmp_path, launcher_code,
                                                                                        table_built):
    """sh/sweep.sh with a stand-in ``python`` on PATH that logs its arguments and exits as told for the
    launcher: the table follows a finished or partly failed sweep, not bad input or an interruption."""
    import subprocess
    stub, calls = tmp_path / "bin" / "python", tmp_path / "calls"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$1" in *launch.py) exit {launcher_code};; esac\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "RECORD_DIR": str(tmp_path),
           "PRESET": "cpu"}
    done = subprocess.run(["bash", str(ROOT / "sh" / "sweep.sh"), "--preset", "smoke"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == launcher_code, done.stderr
    lines = calls.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == \
        ["sweeps/launch.py"] + (["sweeps/results_table.py"] if table_built else [])
    assert lines[0].endswith("--preset smoke")  # the arguments win over PRESET, for the launcher ...
    assert not table_built or "--preset smoke" in lines[1]  # ... and for the table's caption


def test_submitit_local_executor_orders_and_reports_failures(tiny_data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the launcher extends it
    records = tmp_path / "records"
    records.mkdir()
    (records / "t_sig_s0").write_text("in the way")  # makes the sig attack fail
    code, lines = launched(capsys, sweep_argv(tiny_data, records, "--attacks", "badnet,sig", "--executor", "local"))
    assert code == 1, lines
    parsed = [re.match(r"\[\s*\d+/\d+\] (\S+)\s+(attack \S+|\S+ on \S+)", ln).groups() for ln in lines]
    status = {label: state for state, label in parsed}
    assert status == {"attack t_badnet_s0": "done", "attack t_sig_s0": "FAILED", "ft on t_badnet_s0": "done",
                      "ft on t_sig_s0": "FAILED"}
    assert f"log: {records / '_logs' / 't_sig_s0.log'}" in next(ln for ln in lines if "attack t_sig_s0" in ln)
    assert "not started: its attack t_sig_s0 failed" in next(ln for ln in lines if "ft on t_sig_s0" in ln)
    # the defense ran after its attack had finished
    assert ((records / "t_badnet_s0" / "defense" / "ft" / "record.json").stat().st_mtime
            > (records / "t_badnet_s0" / "record.json").stat().st_mtime)
    order = [label for _, label in parsed]
    assert order.index("ft on t_badnet_s0") > order.index("attack t_badnet_s0")


def test_slurm_submits_the_attack_array_then_the_defense_array_after_it(tiny_data, tmp_path, capsys, monkeypatch):
    """submitit's SLURM executor against stand-in sbatch / srun commands: the attacks go as one job
    array, the defenses as a second one that waits for the first (afterany)."""
    pytest.importorskip("submitit")
    bin_dir, sent = tmp_path / "bin", tmp_path / "sent"
    bin_dir.mkdir()
    sent.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nn=$(ls {sent} | wc -l); n=$((n + 700))\n'
                                    f'for last; do :; done; cp "$last" {sent}/$n.sh; echo "Submitted batch job $n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    code = launch.main(sweep_argv(tiny_data, tmp_path / "records", "--attacks", "badnet,sig", "--defenses", "ft,d3",
                                  "--executor", "slurm", "--slurm_partition", "gpu", "--no_wait"))
    out = capsys.readouterr().out
    assert code == 0 and "job 700_1" in out and "job 701_3" in out
    attacks, defenses = (sent / "700.sh").read_text(), (sent / "701.sh").read_text()
    assert "#SBATCH --array=0-1%" in attacks and "--dependency" not in attacks and "#SBATCH --partition=gpu" in attacks
    assert "#SBATCH --array=0-3%" in defenses and "#SBATCH --dependency=afterany:700" in defenses
    assert "#SBATCH --gpus-per-node=1" in defenses
