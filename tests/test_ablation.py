"""Ablation axes (sweeps/axes.py, the launcher's lists of values) and ablation tables (sweeps/ablation.py,
``results_table.py --ablation``): one job per value under its own name, finished values skipped and
interrupted ones resumed, one value planned as before, lists of nargs and string flags never split,
bad lists refused; the paper's Tables 2/3/6/7 layout from hand-written records; sh/ablations.sh's
commands."""
from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT, expect_error
from test_tables import fake_record

import sweeps.launch as launch
import sweeps.results_table as results_table
from sweeps.ablation import ablation_series, build_ablation, paper_ablation
from sweeps.collect import collect
from sweeps.jobs import command
from utils.record import write_manifest


def argv(records, *extra, attack_args="", defense_args="") -> list[str]:
    return ["--attacks", "badnet", "--defenses", "d3", "--preset", "paper", "--model", "preactresnet18",
            "--epochs", "100", "--device", "cpu", "--record_dir", str(records), "--prefix", "t_",
            "--attack_args", attack_args, "--defense_args", defense_args, *extra]


def planned(records, **kw):
    return launch.sweep_from(launch.parser().parse_args(argv(records, **kw))).jobs()


def flags(job) -> dict:
    return {a[2:]: b for a, b in zip(job.args, job.args[1:]) if a.startswith("--") and not b.startswith("--")}


# ----------------------------------------------------------------------------- the axes in the launcher

def test_one_job_per_value_with_names_that_do_not_collide(tmp_path, capsys):
    jobs = planned(tmp_path, attack_args="--pratio 0.01,0.1 --batch_size 64", defense_args="--lmd 1,10,20")
    attacks = [j for j in jobs if j.kind == "attack"]
    assert [(j.record, flags(j)["pratio"]) for j in attacks] == [("t_badnet_pratio0.01_s0", "0.01"),
                                                                 ("t_badnet_pratio0.1_s0", "0.1")]
    defenses = [j for j in jobs if j.kind == "defense"]
    assert [(j.record, flags(j)["lmd"], flags(j)["save_name"]) for j in defenses[:3]] == \
        [("t_badnet_pratio0.01_s0", "1", "d3_lmd1"), ("t_badnet_pratio0.01_s0", "10", "d3_lmd10"),
         ("t_badnet_pratio0.01_s0", "20", "d3_lmd20")]
    assert len(defenses) == 6 and all(flags(j)["batch_size"] == "64" for j in attacks)
    assert len({j.output for j in jobs}) == len(jobs) and len({j.log for j in jobs}) == len(jobs)
    assert defenses[1].output == tmp_path.resolve() / "t_badnet_pratio0.01_s0" / "defense" / "d3_lmd10"
    # two axes are crossed; the user's --save_name is the base of the variants' names
    jobs = planned(tmp_path, defense_args="--save_name mine --lmd 1,10 --eps=0,0.1")
    names = [flags(j)["save_name"] for j in jobs if j.kind == "defense"]
    assert names == ["mine_lmd1_eps0", "mine_lmd1_eps0.1", "mine_lmd10_eps0", "mine_lmd10_eps0.1"]
    assert all(j.args.count("--save_name") == 1 for j in jobs if j.kind == "defense")
    assert "--eps=0.1" in jobs[-1].args
    # --dry_run prints one command per value
    assert launch.main(argv(tmp_path, "--dry_run", defense_args="--ratio 0.01,0.05,0.1")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and [shlex.split(ln)[-1] for ln in lines[1:]] == ["d3_ratio0.01", "d3_ratio0.05",
                                                                             "d3_ratio0.1"]


def test_one_value_and_lists_of_nargs_or_string_flags_are_planned_as_before(tmp_path):
    plain = planned(tmp_path, attack_args="--pratio 0.1", defense_args="--lmd 20")
    assert [j.record for j in plain] == ["t_badnet_s0", "t_badnet_s0"]
    assert plain[1].args[-2:] == ("--lmd", "20") and "--save_name" not in plain[1].args
    assert plain[1].output.name == "d3" and plain[1].log.endswith("t_badnet_s0.d3.log")
    # a list flag (nargs) keeps its several values; a string flag keeps its commas
    jobs = planned(tmp_path, attack_args="--steplr_milestones 50 75",
                   defense_args="--select_layer_name layer4,linear")
    assert len(jobs) == 2 and jobs[0].args[-3:] == ("--steplr_milestones", "50", "75")
    assert jobs[1].args[-2:] == ("--select_layer_name", "layer4,linear") and jobs[1].output.name == "d3"
    jobs = planned(tmp_path, attack_args="--steplr_milestones 50,75")  # never an axis (the script refuses it)
    assert len(jobs) == 2 and jobs[0].args[-1] == "50,75"


@pytest.mark.parametrize("args,message", [("--lmd 1,,10", "--lmd 1,,10 has an empty value"),
                                          ("--lmd 1,", "has an empty value"),
                                          ("--lmd 1,x", "'x' is not a valid value for --lmd"),
                                          ("--eps 0.1,0.10", "gives one value twice")])
def test_bad_lists_are_refused_before_anything_is_written(tmp_path, capsys, args, message):
    records = tmp_path / "records"
    err = expect_error(capsys, launch.main, argv(records, defense_args=args), message)
    assert err.startswith("error: --defense_args: ") and not records.exists()


def _finish(root, name, pratio, variants):
    """A finished attack record at ``pratio`` with a finished D3 run per (folder, lmd)."""
    fake_record(root, name, "badnet", 0, (90, 95), {folder: (89, 1, 97, 100) for folder, _ in variants},
                pratio=pratio)
    for folder, lmd in variants:
        set_defense_config(root / name, folder, {"defense": "d3", "lmd": lmd, "eps": 0.1, "ratio": 0.05,
                                                 "random_seed": 0})


def test_finished_values_are_skipped_and_interrupted_ones_resumed(tmp_path, capsys):
    records = tmp_path / "records"
    kw = dict(attack_args="--pratio 0.01,0.1", defense_args="--lmd 1,10")
    _finish(records, "t_badnet_pratio0.1_s0", 0.1, [("d3_lmd1", 1.0)])
    (records / "t_badnet_pratio0.01_s0").mkdir()
    (records / "t_badnet_pratio0.01_s0" / "checkpoint.pt").write_bytes(b"")  # an interrupted attack
    todo = {j.output.relative_to(records.resolve()).as_posix(): command(j) for j in planned(records, **kw)
            if j.kind == "attack" or j.record.endswith("0.1_s0")}
    assert todo["t_badnet_pratio0.1_s0"] is None and todo["t_badnet_pratio0.1_s0/defense/d3_lmd1"] is None
    assert todo["t_badnet_pratio0.01_s0"][-1] == "--resume"
    assert todo["t_badnet_pratio0.1_s0/defense/d3_lmd10"][-2:] == ["--save_name", "d3_lmd10"]
    # every value finished: the rerun of the same sweep skips every job
    for pratio in (0.01, 0.1):
        shutil.rmtree(records / f"t_badnet_pratio{pratio}_s0")
        _finish(records, f"t_badnet_pratio{pratio}_s0", pratio, [("d3_lmd1", 1.0), ("d3_lmd10", 10.0)])
    assert launch.main(argv(records, **kw)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    assert len(lines) == 6 and all(ln.split()[1] == "skipped" for ln in lines)


def set_defense_config(record, folder, config: dict) -> None:
    """Give a hand-written defense run (test_tables.fake_record's) the config.yaml a real one has,
    its record.json rewritten to list the new file's SHA-256."""
    path = record / "defense" / folder
    meta = json.loads((path / "record.json").read_text())
    files = list(meta.pop("files"))
    meta.pop("format_version")
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    write_manifest(path, meta, files)



# ----------------------------------------------------------------------------- the ablation tables

D3 = {"defense": "d3", "lmd": 10.0, "eps": 0.1, "ratio": 0.05, "epochs": 100}


def _md_rows(path) -> dict[str, list[str]]:
    rows = [ln.split("|")[1:-1] for ln in path.read_text().splitlines() if ln.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


@pytest.fixture
def lmd_records(tmp_path):
    """BadNets (two seeds) and Blended, each with D3 at lmd 1 and 10 (named by the launcher), the plain
    d3 run (lmd 10 too: a repeat), a d3_eps0 of another ablation and an FT run without lmd."""
    root = tmp_path / "records"
    figures = {"badnet": [{1: (88, 0.2), 10: (90, 0.8)}, {1: (89, 0.4), 10: (92, 1.0)}],
               "blended": [{1: (90, 0.1), 10: (92, 0.3)}]}
    for attack, seeds in figures.items():
        for seed, by_lmd in enumerate(seeds):
            name = f"{attack}_s{seed}"
            runs = {f"d3_lmd{lmd:g}": (*fig, 97, 100) for lmd, fig in by_lmd.items()}
            runs.update({"d3": (50, 50, 0, 100), "d3_eps0": (70, 70, 0, 100), "ft": (60, 60, 0, 100)})
            fake_record(root, name, attack, seed, (91, 96), runs)
            for lmd in by_lmd:
                set_defense_config(root / name, f"d3_lmd{lmd:g}", {**D3, "lmd": float(lmd), "random_seed": seed})
            set_defense_config(root / name, "d3_eps0", {**D3, "eps": 0.0, "random_seed": seed})
            set_defense_config(root / name, "d3", {**D3, "random_seed": seed})
            set_defense_config(root / name, "ft", {"defense": "ft", "epochs": 100, "random_seed": seed})
    return root


def test_defense_flag_ablation_has_the_papers_layout(lmd_records, tmp_path, capsys):
    # the plain d3 run has lmd 10 as d3_lmd10 does: a repeat, and d3 comes first by name
    for name in ("badnet_s0", "badnet_s1", "blended_s0"):
        shutil.rmtree(lmd_records / name / "defense" / "d3")
    out = tmp_path / "out" / "table7"
    text = results_table.main(["--record_dir", str(lmd_records), "--ablation", "lmd", "--out", str(out)])
    assert "Ablation over lmd (defense flag): d3 on cifar10, preactresnet18" in text
    assert "not in the ablation (other settings than its rows'): " in text and "blended_s0/defense/d3_eps0" in text
    md = _md_rows(out.with_suffix(".md"))
    assert list(md)[0].startswith("lmd ↓") and md[list(md)[0]] == ["badnet ACC", "badnet ASR", "blended ACC",
                                                                   "blended ASR", "Average ACC", "Average ASR"]
    assert md["1"] == ["88.50 ± 0.71", "0.30 ± 0.14", "90.00", "0.10", "89.25", "0.20"]
    assert md["10"] == ["91.00 ± 1.41", "0.90 ± 0.14", "92.00", "0.30", "91.50", "0.60"]
    assert list(md)[1:] == ["1", "10"]
    with open(out.with_suffix(".csv")) as f:
        rows = {(r["value"], r["attack"]): r for r in csv.DictReader(f)}
    assert rows[("10", "Average")]["clean_acc"] == "91.50" and rows[("1", "badnet")]["n_seeds"] == "2"
    assert rows[("1", "blended")]["records"] == "blended_s0" and rows[("1", "badnet")]["defense"] == "d3"
    assert out.with_suffix(".png").stat().st_size > 0 and f"{out}.png" in text
    # the figure's curves are the table's cells, value by value, and the Average
    (table,), _ = build_ablation(collect(lmd_records), lmd_records, "lmd")
    assert ablation_series(table, "clean_acc") == {"badnet": [88.5, 91.0], "blended": [90.0, 92.0],
                                                   "Average": [89.25, 91.5]}
    assert ablation_series(table, "asr")["badnet"] == pytest.approx([0.3, 0.9])


def test_the_papers_ablation_is_printed_below(lmd_records):
    text = results_table.main(["--record_dir", str(lmd_records), "--ablation", "lmd", "--paper"])
    paper = text[text.index("the D3 paper's Table 7: Ablation over lmd (defense flag): d3 on cifar10"):]
    rows = {ln.split()[0]: ln.split()[1:] for ln in paper.splitlines()[3:]}
    # the paper's Table 7 as printed, its Average recomputed over the three attacks
    assert rows["40"] == ["91.34", "2.01", "92.78", "23.36", "93.35", "2.84", "92.49", "9.40"]
    assert rows["1"][:2] == ["88.66", "0.19"] and list(rows) == ["1", "10", "20", "30", "40"]
    for flag, table in (("pratio", "Table 2"), ("ratio", "Table 3"), ("eps", "Table 6")):
        assert paper_ablation(flag).source == f"the D3 paper's {table}"
    assert paper_ablation("pratio").attacks == ["badnet", "blended", "lf"]
    assert paper_ablation("epochs") is None


def test_a_repeat_of_one_value_counts_once(lmd_records):
    text = results_table.main(["--record_dir", str(lmd_records), "--ablation", "lmd"])
    assert "badnet_s0/defense/d3_lmd10 (a repeat of one value and seed)" in text  # d3 (lmd 10) is first by name
    row = next(ln for ln in text.splitlines() if ln.startswith("10 "))
    assert row.split()[1:3] == ["50.00", "±"]


def test_attack_flag_ablation(tmp_path):
    root = tmp_path / "records"
    for pratio, (acc, asr) in {0.01: (92, 0.7), 0.1: (90, 0.8), 0.2: (89, 0.9)}.items():
        for attack, shift in (("badnet", 0), ("blended", 2)):
            fake_record(root, f"{attack}_pratio{pratio}_s0", attack, 0, (93, 99),
                        {"d3": (acc + shift, asr, 97, 100)}, pratio=pratio)
    text = results_table.main(["--record_dir", str(root), "--ablation", "pratio"])
    lines = text.splitlines()
    assert lines[0].startswith("Ablation over pratio (attack flag): d3 on cifar10")
    assert lines[2].split() == ["pratio", "↓", *["ACC", "ASR"] * 3]
    assert [ln.split() for ln in lines[3:6]] == [["0.01", "92.00", "0.70", "94.00", "0.70", "93.00", "0.70"],
                                                 ["0.1", "90.00", "0.80", "92.00", "0.80", "91.00", "0.80"],
                                                 ["0.2", "89.00", "0.90", "91.00", "0.90", "90.00", "0.90"]]
    none = results_table.main(["--record_dir", str(root), "--ablation=--pratio", "--defense", "none"])
    assert "the attacked models (no defense)" in none and none.splitlines()[3].split()[1:3] == ["93.00", "99.00"]


def test_bad_ablations_are_refused_and_write_nothing(lmd_records, tmp_path, capsys):
    out = tmp_path / "out" / "t"
    base = ["--record_dir", str(lmd_records), "--out", str(out)]
    expect_error(capsys, results_table.main, [*base, "--ablation", "nope"], "--ablation nope: no finished record")
    expect_error(capsys, results_table.main, [*base, "--ablation", "lmd", "--defense", "ft"],
                 "--defense ft: no defense of that name varies lmd here; choose from d3")
    expect_error(capsys, results_table.main, [*base, "--defense", "d3"], "--defense goes with --ablation")
    # the full tables' --preset is refused with --ablation, not ignored
    expect_error(capsys, results_table.main, [*base, "--ablation", "lmd", "--preset", "cpu_small"],
                 "leave it out with --ablation")
    assert not out.parent.exists()
    # --runs lists every run under the ablation too
    text = results_table.main(["--record_dir", str(lmd_records), "--ablation", "lmd", "--runs"])
    assert any(ln.startswith("badnet_s0 ") and " d3_lmd1 " in ln for ln in text.splitlines())


# ----------------------------------------------------------------------------- sh/ablations.sh

def test_ablations_sh_plans_the_papers_four_ablations(tmp_path):
    """sh/ablations.sh with --dry_run: each table's launcher command plans one job per value (the
    launcher's own --dry_run, run for real), and no table is built."""
    env = {**os.environ, "RECORD_DIR": str(tmp_path / "records"), "PRESET": "cpu_small", "DRY_RUN": "1"}
    done = subprocess.run(["bash", str(ROOT / "sh" / "ablations.sh"), "data.zip"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(ln) for ln in done.stdout.splitlines() if "attack/" in ln or "defense/" in ln]
    names = [c[c.index("--save_folder_name") + 1] for c in commands if "--save_folder_name" in c]
    pratio = sorted({n for n in names if "_pratio" in n})
    assert len(pratio) == 3 * 6 and "cifar10_preactresnet18_w16_cpu_small_badnet_pratio0.5_s0" in pratio
    saves = {c[c.index("--save_name") + 1] for c in commands if "--save_name" in c}
    assert saves == {"d3_ratio0.01", "d3_ratio0.05", "d3_ratio0.1", *(f"d3_eps{e}" for e in ("0", "0.1", "0.2",
                     "0.3", "0.4", "0.5")), *(f"d3_lmd{v}" for v in (1, 10, 20, 30, 40))}
    assert all("--dataset_path" in c and c[c.index("--dataset_path") + 1] == "data.zip" for c in commands)
    assert "results_table.py" not in done.stdout


def test_axes_on_tiny_real_runs(tiny_data, tmp_path, capsys):
    """Two attack values x two D3 values, for real (about 30 s): each finished once, every job skipped on
    the rerun (the real config.yaml of each value matches what its job asks), then both ablation tables."""
    records = tmp_path / "records"
    run = ["--attacks", "badnet", "--defenses", "d3", "--model", "preactresnet18_w8", "--epochs", "1",
           "--defense_epochs", "1", "--dataset_path", str(tiny_data["pickles"]), "--device", "cpu",
           "--record_dir", str(records), "--prefix", "t_", "--attack_args", "--batch_size 64 --pratio 0.1,0.2",
           "--defense_args", "--lmd 1,10"]
    for state in ("done", "skipped"):
        assert launch.main(run) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
        assert len(lines) == 6 and all(ln.split()[1] == state for ln in lines), lines
    assert sorted(p.name for p in (records / "t_badnet_pratio0.2_s0" / "defense").iterdir()) == ["d3_lmd1", "d3_lmd10"]
    lmd = results_table.main(["--record_dir", str(records), "--ablation", "lmd"]).splitlines()
    assert [ln.split()[0] for ln in lmd[3:5]] == ["1", "10"]
    # the pratio 0.2 record is another setting: its runs are another ablation's, named, not averaged in
    assert lmd[-1].startswith("not in the ablation") and "t_badnet_pratio0.2_s0/defense/d3_lmd10" in lmd[-1]
    expect_error(capsys, results_table.main, ["--record_dir", str(records), "--ablation", "pratio"],
                 "the records hold d3_lmd1, d3_lmd10; choose one with --defense NAME")
    pratio = results_table.main(["--record_dir", str(records), "--ablation", "pratio", "--defense", "d3_lmd10"])
    assert "d3_lmd10 on cifar10" in pratio and [ln.split()[0] for ln in pratio.splitlines()[3:5]] == ["0.1", "0.2"]
