"""Sweeps and tables: the table builder on hand-written summaries, and the launcher's scheduling
(order, skip-if-done, resume, refusal of a record made otherwise, failure reporting) on tiny real
runs, in its own pool and through submitit's local executor."""
from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import os
import re

import pytest
import yaml
from conftest import ROOT, copy_record, expect_error, interrupt_after_saves, run_args

import attack.badnet as badnet
import defense.ft as ft
from sweeps.collect import collect
from sweeps.formats import CSV_COLUMNS, format_runs, format_text, rank_marks
from sweeps.grouping import build_tables
from sweeps.presets import PRESETS, preset_made
from sweeps.table_files import write_tables
from utils.cli import cli_main
from utils.record import sha256_file


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch, results_table = _script("launch"), _script("results_table")


# ----------------------------------------------------------------------------- tables on hand-written records

def _run(folder, summary: dict, meta: dict, config: dict | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    files = {"summary.json": sha256_file(folder / "summary.json")}
    (folder / "record.json").write_text(json.dumps({**meta, "files": files, "format_version": 2}))


def fake_record(root, name, attack, seed, none, defenses, epochs=100, model="preactresnet18", lr=0.01, **settings):
    """An attack record with its figures in % (ACC, ASR) and each defense's (ACC, ASR, DER, wall s)."""
    folder = root / name
    _run(folder, {"clean_acc": none[0] / 100, "asr": none[1] / 100, "ra": 0.05, "wall_seconds": 1000.0},
         {"kind": "attack", "attack": attack, "model": model, "dataset": {"name": "cifar10"}},
         {"attack": attack, "model": model, "dataset": "cifar10", "epochs": epochs, "lr": lr,
          "random_seed": seed, "pratio": 0.1, "device": "cuda", "save_folder_name": name, **settings})
    for defense, (acc, asr, der, wall) in defenses.items():
        _run(folder / "defense" / defense,
             {"clean_acc": acc / 100, "asr": asr / 100, "ra": 0.5, "der": der / 100, "wall_seconds": wall},
             {"kind": "defense", "defense": defense, "attack_record_sha256": sha256_file(folder / "record.json")})


@pytest.fixture
def hand_records(tmp_path):
    root = tmp_path / "records"
    fake_record(root, "bn0", "badnet", 0, (90, 95), {"ft": (88, 2, 96, 100), "d3": (89, 1, 97, 100),
                                                     "anp": (87, 1, 96.5, 50)})
    fake_record(root, "bn1", "badnet", 1, (92, 97), {"ft": (90, 4, 95, 120), "d3": (91, 1, 98, 60),
                                                     "anp": (89, 3, 95.5, 60)})
    fake_record(root, "bl0", "blended", 0, (93, 99), {"ft": (92, 50, 74, 100), "d3": (92, 0.5, 99, 90)})
    fake_record(root, "short", "badnet", 0, (70, 90), {"ft": (60, 10, 80, 10)}, epochs=10)
    (root / "half").mkdir()
    (root / "half" / "checkpoint.pt").write_bytes(b"")  # an unfinished run: listed, left out
    return root


def _md_rows(text: str) -> dict[str, list[str]]:
    rows = [ln.split("|")[1:-1] for ln in text.splitlines() if ln.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_tables_from_hand_written_summaries(hand_records, tmp_path):
    tables = build_tables(collect(hand_records))
    assert [(t.model, t.setting) for t in tables] == [("preactresnet18", "epochs=100"),
                                                      ("preactresnet18", "epochs=10")]
    main = tables[0]
    assert [r.attack for r in main.rows] == ["badnet", "blended"] and main.defenses == ["ft", "anp", "d3"]
    d3 = main.rows[0].cells["d3"]
    assert d3.n_seeds == 2 and d3.mean("clean_acc") == pytest.approx(90)
    assert d3.std("clean_acc") == pytest.approx(2 ** 0.5)
    # The Average row averages each column over attacks, DER included; a missing cell makes it '-'.
    assert main.average("ft", "der") == pytest.approx((95.5 + 74) / 2)
    assert main.average("anp", "clean_acc") is None and main.average("none", "asr") == pytest.approx((96 + 99) / 2)
    assert main.cost("d3") == pytest.approx(((100 / 100 + 60 / 120) / 2 + 90 / 100) / 2)

    written = write_tables(tables, tmp_path / "out" / "table1")
    assert [p.name for p in written] == ["table1.csv", "table1.md", "table1.tex", "table1_cost.png"]
    md = _md_rows(written[1].read_text().split("\n\n")[1])
    # columns: none ACC ASR | ft ACC ASR DER | anp ACC ASR DER | d3 ACC ASR DER
    bn, bl, avg = md["badnet"], md["blended"], md["Average"]
    assert bn[0] == "91.00 ± 1.41" and bn[2] == "<u>89.00 ± 1.41</u>" and bn[8] == "**90.00 ± 1.41**"
    assert bn[6] == "<u>2.00 ± 1.41</u>" and bn[9] == "**1.00 ± 0.00**" and bn[10] == "**97.50 ± 0.71**"
    assert bl[5:8] == ["-", "-", "-"]                     # anp did not run on blended
    assert bl[2] == bl[8] == "**92.00**"                  # a tie shares the bold
    assert avg[4] == "<u>84.75</u>" and avg[5:8] == ["-", "-", "-"] and avg[10] == "**98.25**"
    tex = written[2].read_text()
    assert "\\textbf{90.00 $\\pm$ 1.41}" in tex and "\\underline{89.00 $\\pm$ 1.41}" in tex
    assert "\\multicolumn{3}{c}{d3}" in tex

    with open(written[0]) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:9] == ["dataset", "model", "attack", "defense", "clean_acc", "asr", "ra", "der",
                                         "n_seeds"] == CSV_COLUMNS[:9]
        rows = list(reader)
    by = {(r["setting"], r["attack"], r["defense"]): r for r in rows}
    d3_row = by[("epochs=100", "badnet", "d3")]
    assert d3_row["clean_acc"] == "90.00" and d3_row["n_seeds"] == "2"
    assert by[("epochs=100", "badnet", "none")]["der"] == "" and by[("epochs=100", "badnet", "none")]["asr"] == "96.00"
    assert by[("epochs=100", "Average", "ft")]["der"] == "84.75" and by[("epochs=100", "Average", "anp")]["asr"] == ""
    assert by[("epochs=10", "badnet", "ft")]["clean_acc"] == "60.00"


def test_attacks_with_their_own_training_schedule_share_the_table(tmp_path):
    """WaNet and Input-aware set their own lr_scheduler (BackdoorBench's configs): they are rows of the
    one (dataset, model) table beside BadNets, not tables of their own; BadNets records that differ in
    that key are two rows there, never averaged as seeds."""
    root = tmp_path / "records"
    fake_record(root, "bn", "badnet", 0, (90, 95), {"d3": (89, 1, 97, 100)}, lr_scheduler="CosineAnnealingLR")
    fake_record(root, "wa", "wanet", 0, (91, 90), {"d3": (90, 2, 94, 100)}, lr_scheduler="MultiStepLR",
                steplr_milestones=[100, 200])
    fake_record(root, "ia", "inputaware", 0, (89, 92), {"d3": (88, 3, 93, 100)}, lr_scheduler="MultiStepLR")
    tables = build_tables(collect(root))
    assert [(t.model, t.setting) for t in tables] == [("preactresnet18", "")]
    assert [(r.attack, r.variant) for r in tables[0].rows] == [("badnet", ""), ("wanet", ""), ("inputaware", "")]
    fake_record(root, "bn_step", "badnet", 1, (80, 85), {"d3": (79, 1, 92, 100)}, lr_scheduler="MultiStepLR")
    (table,) = build_tables(collect(root))
    assert [(r.attack, r.variant) for r in table.rows][:2] == [("badnet", "lr_scheduler=CosineAnnealingLR"),
                                                               ("badnet", "lr_scheduler=MultiStepLR")]
    assert all(r.cells["d3"].n_seeds == 1 for r in table.rows)


def test_records_with_one_seed_are_repeats_not_seeds(tmp_path):
    """A copied record (here with another NC run in it) has the seed of its original: the two are two
    rows named by their folders, never a mean ± std over '2 seeds'."""
    root = tmp_path / "records"
    fake_record(root, "bn", "badnet", 0, (90, 95), {"nc": (90, 95, 50, 100)})
    fake_record(root, "bn_nc80", "badnet", 0, (90, 95), {"nc": (88, 2, 96, 400)})
    (table,) = build_tables(collect(root))
    assert [r.label for r in table.rows] == ["badnet (record bn)", "badnet (record bn_nc80)"]
    assert [r.cells["nc"].n_seeds for r in table.rows] == [1, 1]
    assert [r.cells["nc"].mean("asr") for r in table.rows] == [pytest.approx(95), pytest.approx(2)]
    fake_record(root, "bn1", "badnet", 1, (92, 97), {"nc": (91, 3, 95, 100)})
    assert len(build_tables(collect(root))[0].rows) == 3   # a repeat in the row: every record on its own


def test_rank_marks_ties_and_direction():
    assert rank_marks({"a": 1.0, "b": 2.0, "c": 3.0}, min) == {"a": "best", "b": "second"}
    assert rank_marks({"a": 1.0, "b": 3.0, "c": 3.001, "d": 2.0}, max) == {"b": "best", "c": "best", "d": "second"}
    assert rank_marks({"a": 5.0, "b": None}, max) == {}  # one value: nothing to compare


def test_results_table_command(hand_records, tmp_path, capsys):
    text = results_table.main(["--record_dir", str(hand_records), "--out", str(tmp_path / "t"), "--paper"])
    assert "cifar10, preactresnet18 (epochs=100), in %; mean ± std over 1/2 seeds" in text
    assert "the D3 paper's Table 1" in text and "90.77" in text  # the paper's D3 on BadNets
    assert "left out:\n  half: unfinished" in text and (tmp_path / "t.md").is_file()
    assert format_text(build_tables(collect(hand_records))[0]).splitlines()[4].startswith("blended")
    # --preset describes only the tables its records make: a smoke record beside the others.
    fake_record(hand_records, "smoke_bn", "badnet", 0, (50, 10), {"ft": (50, 5, 52, 10)}, epochs=6,
                model="preactresnet18_w16", lr=0.05, train_subset=10000)
    text = results_table.main(["--record_dir", str(hand_records), "--out", str(tmp_path / "s"), "--preset", "smoke"])
    assert "preactresnet18_w16; preset smoke: SMOKE RUN: narrow PreAct-ResNet18 (width 16), 6 attack epochs" in text
    assert text.count("SMOKE RUN") == 1 and "cifar10, preactresnet18 (epochs=100), in %" in text
    assert "preset smoke: SMOKE RUN" in (tmp_path / "s.md").read_text()
    assert "SMOKE RUN" in (tmp_path / "s.tex").read_text()
    assert not preset_made(PRESETS["cpu"], "preactresnet18_w16", {"epochs": 18, "lr": 0.05, "train_subset": 25000})
    assert preset_made(PRESETS["cpu_small"], "preactresnet18_w16", {"epochs": 18, "lr": 0.05, "train_subset": 25000})


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


def test_results_table(capsys, tiny_data, tiny_record, tmp_path):
    import importlib.util

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "sweeps" / "results_table.py")
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
