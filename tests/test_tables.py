"""The table builder (sweeps/collect.py, grouping, formats, table_files, results_table.py): tables from
hand-written records and from the tiny real one; every record and defense output verified before it is
listed (damaged, deleted, of another format, unreadable: left out with the reason, the rest built); a
folder reached through a link counted once; records --overwrite replaced hidden unless asked for;
attacks too weak to compare defenses on marked; where --out writes, and its refusals."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import pytest
import yaml
from conftest import copy_record, expect_error, run_args

import defense.ft as ft
import sweeps.collect
import sweeps.results_table as results_table
from sweeps.collect import REPLACED_MARK, collect
from sweeps.formats import CSV_COLUMNS, format_runs, format_text, rank_marks
from sweeps.grouping import build_tables
from sweeps.presets import PRESETS, preset_made
from sweeps.table_files import write_tables
from sweeps.tables import MIN_BACKDOOR_ASR, WEAK_NOTE
from utils.cli import cli_main
from utils.record import REQUIRED_FILES, sha256_file, write_manifest

# ----------------------------------------------------------------------------- tables on hand-written records

DATASET = {"name": "cifar10", "fingerprint": "0" * 16, "num_classes": 10, "image_size": 32, "train_size": 50000,
           "test_size": 10000}


def _run(folder, kind: str, summary: dict, meta: dict, config: dict) -> None:
    """A finished run of ``kind`` as the toolkit writes one: every file its record.json must list (the
    weights and the like as placeholders), listed with its SHA-256."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    for name in REQUIRED_FILES[kind]:
        if not (folder / name).exists():
            (folder / name).write_text(f"{name} of {folder}")
    write_manifest(folder, {**meta, "kind": kind}, list(REQUIRED_FILES[kind]))


def fake_record(root, name, attack, seed, none, defenses, epochs=100, model="preactresnet18", lr=0.01, **settings):
    """An attack record with its figures in % (ACC, ASR) and each defense's (ACC, ASR, DER, wall s)."""
    folder = root / name
    _run(folder, "attack", {"clean_acc": none[0] / 100, "asr": none[1] / 100, "ra": 0.05, "wall_seconds": 1000.0},
         {"attack": attack, "model": model, "dataset": DATASET, "attack_label_trans": "all2one", "attack_target": 0,
          "poisoned_train_fingerprint": "1" * 16, "backdoor_test_fingerprint": "2" * 16},
         {"attack": attack, "model": model, "dataset": "cifar10", "epochs": epochs, "lr": lr,
          "random_seed": seed, "pratio": 0.1, "device": "cuda", "save_folder_name": name, **settings})
    for defense, (acc, asr, der, wall) in defenses.items():
        _run(folder / "defense" / defense, "defense",
             {"clean_acc": acc / 100, "asr": asr / 100, "ra": 0.5, "der": der / 100, "wall_seconds": wall},
             {"defense": defense, "model": model, "attack_record": name, "dataset": DATASET,
              "attack_record_sha256": sha256_file(folder / "record.json")}, {"defense": defense})


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


def test_results_table(capsys, tiny_data, tiny_record, tmp_path):
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


# ----------------------------------------------------------------------------- every record verified

@pytest.fixture(scope="module")
def defended(tiny_data, tiny_record, tmp_path_factory):
    """The tiny record with an FT output, made once for this module: tests copy it (:func:`_copy`)."""
    root = tmp_path_factory.mktemp("defended")
    copy_record(tiny_record, root)
    ft.main(["--result_file", "badnet", *run_args(tiny_data, root), "--epochs", "1"])
    return root / "badnet"


def _copy(defended, root, name: str):
    return shutil.copytree(defended, root / name)


def _reseal(folder, name: str) -> None:
    """Put ``name``'s new SHA-256 in record.json, so that only what the file holds is wrong."""
    meta = json.loads((folder / "record.json").read_text())
    meta["files"][name] = sha256_file(folder / name)
    (folder / "record.json").write_text(json.dumps(meta))


def _damage(run, name: str, change, reseal: bool) -> None:
    """``change``: bytes appended to the file, None to delete it, text written over it, or an edit of its JSON."""
    path = run / name
    if change is None:
        path.unlink()
    elif isinstance(change, bytes):
        path.write_bytes(path.read_bytes() + change)
    elif isinstance(change, str):
        path.write_text(change)
    else:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    if reseal:
        _reseal(run, name)


def _set(**values):
    return lambda data: data.update(values)


DAMAGE = {  # (the run: the record "bad" or its FT output; the file; the change; re-sealed; the reason listed)
    "model changed": ("", "model.safetensors", b"\0", False, "model.safetensors does not match record.json"),
    "trigger deleted": ("", "trigger.safetensors", None, False, "trigger.safetensors missing"),
    "indices changed": ("", "indices.safetensors", b"\0", False, "indices.safetensors does not match"),
    "config changed": ("", "config.yaml", b"lr: 5\n", False, "config.yaml does not match"),
    "metrics deleted": ("", "metrics.csv", None, False, "metrics.csv missing"),
    "format 1": ("", "record.json", _set(format_version=1), False,
                 "record.json has record format version 1, this toolkit reads version 2 only"),
    "format 3": ("", "record.json", _set(format_version=3), False, "record format version 3"),
    "format '2'": ("", "record.json", _set(format_version="2"), False, "record format version '2'"),
    "dataset a string": ("", "record.json", _set(dataset="cifar10"), False, "record.json: 'dataset' is str, not dict"),
    "record.json not JSON": ("", "record.json", "{", False, "record.json is not valid JSON"),
    "config unparseable": ("", "config.yaml", "lr: [1,\n", True, "config.yaml is not plain YAML"),
    "config a list": ("", "config.yaml", "- 1\n", True, "config.yaml holds no mapping of settings"),
    "summary of wrong type": ("", "summary.json", _set(clean_acc="high"), True,
                              "summary.json: 'clean_acc' is str, not a number"),
    "summary a list": ("", "summary.json", "[1]", True, "summary.json holds a list, not a mapping of results"),
    "defense model changed": ("defense/ft", "model.safetensors", b"\0", False,
                              "model.safetensors does not match record.json"),
    "defense format 1": ("defense/ft", "record.json", _set(format_version=1), False, "record format version 1"),
    "defense summary of wrong type": ("defense/ft", "summary.json", _set(clean_acc=True), True,
                                      "summary.json: 'clean_acc' is bool, not a number"),
    "defense der a string": ("defense/ft", "summary.json", _set(der="97%"), True,
                             "summary.json: 'der' is str, not a number"),
    "defense lists no model": ("defense/ft", "record.json", lambda m: m["files"].pop("model.safetensors"), False,
                               "it lists no model.safetensors"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_record_is_left_out_with_its_reason_and_the_rest_built(defended, tmp_path, capsys, damage):
    """Every file a record.json lists is checked, and record.json itself (format version, schema), for
    the attack record and each defense output: a broken one is listed with its reason under the
    table, which the healthy ones still make (exit 0)."""
    run, name, change, reseal, reason = DAMAGE[damage]
    root = tmp_path / "records"
    _copy(defended, root, "good")
    _damage(_copy(defended, root, "bad") / run, name, change, reseal)
    cli_main(results_table.main, ["--record_dir", str(root), "--runs"])  # no SystemExit: exit 0
    out = capsys.readouterr().out
    left_out = out.split("left out:\n")[1].split("\n\n")[0].splitlines()
    if run:
        assert len(left_out) == 1 and left_out[0].startswith(f"  bad/{run}: ")
        assert "badnet (record bad)" in out and "badnet (record good)" in out  # both attacked models shown
    else:
        assert left_out == [left_out[0], "  bad/defense/ft: its attack record is left out"]
        assert left_out[0].startswith("  bad: ")
        assert "\nbadnet " in out and "(record" not in out  # good alone: its row, named by the attack
    assert reason in left_out[0]
    rows = collect(root)
    assert {(r.record, r.defense) for r in rows if not r.problem} >= {("good", "-"), ("good", "ft")}
    assert [r.cells["ft"].records for t in build_tables(rows) for r in t.rows if "ft" in r.cells] == [["good"]]


def test_each_file_is_hashed_once_per_build(defended, tmp_path, monkeypatch):
    """Verifying a record costs one SHA-256 of each listed file (the weights included) and of the attack's
    record.json (what its defenses name) per table build, no more."""
    root = tmp_path / "records"
    rec = _copy(defended, root, "badnet")
    hashed = Counter()
    real = sweeps.collect.sha256_file
    monkeypatch.setattr(sweeps.collect, "sha256_file", lambda path: hashed.update([path]) or real(path))
    results_table.main(["--record_dir", str(root), "--out", str(tmp_path / "t")])
    listed = [folder / name for folder in (rec, rec / "defense" / "ft")
              for name in json.loads((folder / "record.json").read_text())["files"]]
    assert sorted(hashed) == sorted(listed + [rec / "record.json"])
    assert set(hashed.values()) == {1}


# ----------------------------------------------------------------------------- links, replaced records, weak attacks

def test_a_linked_record_is_counted_once_under_its_own_name(tmp_path, capsys):
    root = tmp_path / "records"
    fake_record(root, "real", "badnet", 0, (90, 95), {"d3": (89, 1, 97, 100)})
    fake_record(root, "other", "badnet", 1, (92, 97), {"d3": (91, 1, 98, 100)})
    (root / "a_link").symlink_to(root / "real", target_is_directory=True)  # sorts before the folder it names
    (table,) = build_tables(collect(root))
    assert [r.label for r in table.rows] == ["badnet"] and table.rows[0].cells["d3"].records == ["other", "real"]
    text = results_table.main(["--record_dir", str(root)])
    assert "mean ± std over 2 seeds" in text
    assert "left out:\n  a_link: the same folder as real (a link to it): counted once, as real" in text


def test_replaced_records_are_hidden_unless_asked_for(tiny_record, tmp_path):
    """--overwrite keeps the record it replaced beside it as <name>.replaced-<time>: not a record of the
    table unless --include_replaced, and then a row of its own, named by its folder."""
    root = tmp_path / "records"
    copy_record(tiny_record, root)
    old = copy_record(tiny_record, root, f"badnet{REPLACED_MARK}20260101-120000")
    text = results_table.main(["--record_dir", str(root)])
    assert "record badnet" not in text and old.name in text.split("not shown: ")[1]
    assert [r.record for r in collect(root)] == ["badnet"]
    text = results_table.main(["--record_dir", str(root), "--include_replaced"])
    assert f"badnet (record {old.name})" in text and "not shown" not in text
    assert [r.record for r in collect(root, include_replaced=True)] == ["badnet", old.name]
    # A replaced record of another seed is still no seed of its successor: never averaged with it.
    hand = tmp_path / "hand"
    fake_record(hand, "bn", "badnet", 0, (90, 95), {"d3": (89, 1, 97, 100)})
    fake_record(hand, f"bn{REPLACED_MARK}20260101-120000", "badnet", 1, (92, 97), {"d3": (91, 1, 98, 100)})
    (table,) = build_tables(collect(hand, include_replaced=True))
    assert [r.label for r in table.rows] == ["badnet", f"badnet (record bn{REPLACED_MARK}20260101-120000)"]
    assert [r.cells["d3"].n_seeds for r in table.rows] == [1, 1]


def test_an_attack_too_weak_to_compare_on_is_marked(tmp_path):
    """An attacked model with an ASR below MIN_BACKDOOR_ASR has no backdoor to remove: its rows carry a
    footnote in the text, Markdown and LaTeX tables and weak_attack=yes in the CSV."""
    assert MIN_BACKDOOR_ASR == 50.0
    root = tmp_path / "records"
    fake_record(root, "bn", "badnet", 0, (90, 95), {"ft": (88, 2, 96, 100)})
    fake_record(root, "bl", "blended", 0, (91, 30), {"ft": (90, 10, 60, 100)})
    fake_record(root, "sig", "sig", 0, (91, 50), {"ft": (90, 10, 70, 100)})  # at the threshold: not weak
    text = results_table.main(["--record_dir", str(root), "--out", str(tmp_path / "t")])
    lines = text.splitlines()
    assert next(ln for ln in lines if ln.startswith("blended")).startswith("blended †")
    assert "†" not in next(ln for ln in lines if ln.startswith("badnet"))
    assert "†" not in next(ln for ln in lines if ln.startswith("sig"))
    assert f"† {WEAK_NOTE}" in lines and WEAK_NOTE == ("attacked model's ASR below 50%: no backdoor to remove; "
                                                       "DER not meaningful")
    md = (tmp_path / "t.md").read_text()
    assert "| blended † |" in md and f"\n\n† {WEAK_NOTE}" in md and "| badnet |" in md
    tex = (tmp_path / "t.tex").read_text()
    assert "blended$^\\dagger$ &" in tex and "below 50\\%: no backdoor" in tex
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    flags = {(r["attack"], r["defense"]): r["weak_attack"] for r in rows}
    assert flags[("blended", "none")] == flags[("blended", "ft")] == "yes"
    assert flags[("badnet", "ft")] == flags[("sig", "ft")] == "no" and flags[("Average", "ft")] == ""


# ----------------------------------------------------------------------------- where --out writes

def test_out_that_cannot_be_written_is_one_line(hand_records, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    for out, says in [(f"{blocker}/t", f"{blocker} is a file, not a folder"), (f"{blocker}/sub/t", "is a file"),
                      ("/proc/nope/t", "is under /proc"), ("/proc/t", "is /proc"), ("/sys/t", "is /sys")]:
        err = expect_error(capsys, results_table.main, ["--record_dir", str(hand_records), "--out", out], says)
        assert f"--out {out}" in err and "give --out a prefix" in err
    assert sorted(tmp_path.rglob("*")) == before and blocker.read_text() == "not a folder"
    # A failure while writing (here a folder where the .md goes): one line, and no file of the set is left.
    (tmp_path / "w.md").mkdir()
    expect_error(capsys, results_table.main, ["--record_dir", str(hand_records), "--out", str(tmp_path / "w")],
                 "cannot write the table files")
    assert not (tmp_path / "w.csv").exists() and not (tmp_path / "w.tex").exists()


def test_out_naming_a_folder_writes_inside_it(hand_records, tmp_path, capsys):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    for out, folder in [(f"{fresh}/", fresh), (str(existing), existing)]:
        text = results_table.main(["--record_dir", str(hand_records), "--out", out])
        names = ["table.csv", "table.md", "table.tex", "table_cost.png"]
        assert sorted(p.name for p in folder.iterdir()) == names
        assert "wrote " + ", ".join(str(folder / n) for n in names) in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "fresh", "records"]
    with pytest.raises(SystemExit):
        results_table.main(["--help"])
    assert "DIR/table.csv" in " ".join(capsys.readouterr().out.split())  # the rule, in --help
