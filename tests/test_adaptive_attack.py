"""The adaptive attack of the D3 paper's Sec. 4.4 (``--sam_rho``): every attack can train its classifier
with FT-SAM's adaptive SAM; the record keeps the budget, resumes bit for bit, and tables tell it apart,
in the paper's Table 5 layout too (``results_table.py --by_budget``)."""
from __future__ import annotations

import csv
import importlib

import pytest
import torch
from conftest import TINY, expect_error, interrupt_after_saves, run_args
from test_tables import fake_record

import attack.badnet as badnet
import attack.inputaware as inputaware
import sweeps.results_table as results_table
import utils.sam
from sweeps.collect import collect
from sweeps.grouping import build_tables
from utils.cli import cli_main
from utils.record import load_tensors, read_yaml

ONE_EPOCH = [*TINY, "--epochs", "1"]  # 200 images, batch 64, last partial batch dropped: 3 steps


@pytest.fixture(scope="module")
def records(tiny_data, tmp_path_factory):
    """A plain BadNets record and the same run with ``--sam_rho 1.5``, each step of the latter watched:
    the closure's calls per step, and, at the first step, the weights of its second pass."""
    root = tmp_path_factory.mktemp("adaptive")
    argv = [*run_args(tiny_data, root), "--random_seed", "3", *ONE_EPOCH]
    badnet.main(["--save_folder_name", "plain", *argv])
    seen = {"steps": 0, "calls": 0, "rho": [], "adaptive": [], "ascent_error": None}
    real = utils.sam.SAM.step

    def watched(self, closure):
        seen["steps"] += 1
        seen["rho"].append(self.rho)
        seen["adaptive"].append(self.adaptive)
        params = [p for p in self.model.parameters() if p.requires_grad]
        start = []

        def counted():
            seen["calls"] += 1
            if seen["steps"] == 1 and seen["calls"] == 2:  # the weights SAM evaluates: w + e_w, by hand
                w, g = start
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a.abs() * b)
                                                             for a, b in zip(w, g)]))
                expected = [a + self.rho * a * a * b / (norm + utils.sam.PERTURB_EPS) for a, b in zip(w, g)]
                seen["ascent_error"] = max((p.detach() - e).abs().max().item() for p, e in zip(params, expected))
            out = closure()
            if seen["steps"] == 1 and seen["calls"] == 1:
                start.extend([[p.detach().clone() for p in params], [p.grad.clone() for p in params]])
            return out
        return real(self, counted)

    mp = pytest.MonkeyPatch()
    mp.setattr(utils.sam.SAM, "step", watched)
    try:
        badnet.main(["--save_folder_name", "sam", *argv, "--sam_rho", "1.5"])
    finally:
        mp.undo()
    return root, seen


def test_sam_trains_the_classifier(records):
    root, seen = records
    assert seen["steps"] == 3 and seen["calls"] == 2 * seen["steps"]  # two passes per step
    assert set(seen["rho"]) == {1.5} and set(seen["adaptive"]) == {True}  # FT-SAM's adaptive form
    assert seen["ascent_error"] is not None and seen["ascent_error"] < 1e-5  # e_w = rho w^2 g / || |w| g ||
    plain, sam = (load_tensors(root / n / "model.safetensors") for n in ("plain", "sam"))
    assert plain.keys() == sam.keys()
    assert any(not torch.equal(plain[k], sam[k]) for k in plain if plain[k].is_floating_point())
    assert "adaptive SAM, rho 1.5" in (root / "sam" / "attack.log").read_text()


def test_the_record_keeps_the_budget(records):
    root, _ = records
    assert read_yaml(root / "sam" / "config.yaml")["sam_rho"] == 1.5
    assert "sam_rho" not in read_yaml(root / "plain" / "config.yaml")  # an attack without it is unchanged


def test_tables_tell_budgets_apart(records):
    root, _ = records
    tables = build_tables(collect(root))
    assert len(tables) == 2  # sam_rho is a training setting all attacks share: one table per budget
    by_setting = {t.settings.get("sam_rho"): t for t in tables}
    assert set(by_setting) == {None, 1.5}
    assert "sam_rho=1.5" in by_setting[1.5].title
    assert all(len(t.rows) == 1 and t.rows[0].attack == "badnet" for t in tables)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_budget_is_refused_before_anything_is_written(capsys, tiny_data, tmp_path, value):
    argv = ["--save_folder_name", "bad", *run_args(tiny_data, tmp_path / "records"), *ONE_EPOCH, "--sam_rho", value]
    expect_error(capsys, badnet.main, argv, "--sam_rho")
    assert not (tmp_path / "records").exists()


def test_input_aware_refuses_sam(capsys, tiny_data, tmp_path):
    argv = ["--save_folder_name", "ia", *run_args(tiny_data, tmp_path / "records"), *ONE_EPOCH, "--sam_rho", "1"]
    err = expect_error(capsys, inputaware.main, argv, "--sam_rho is not offered for inputaware")
    assert "generator" in err
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("script", ["badnet", "wanet"])  # a data-poisoning and a training-controlled attack
def test_a_sam_attack_resumes_bit_identically(capsys, monkeypatch, tiny_data, tmp_path, script):
    main = importlib.import_module(f"attack.{script}").main
    argv = [*run_args(tiny_data, tmp_path), *TINY, "--sam_rho", "2"]
    main(["--save_folder_name", "straight", *argv])
    restore = interrupt_after_saves(monkeypatch, 1)
    with pytest.raises(SystemExit) as exc:
        cli_main(main, ["--save_folder_name", "resumed", *argv])
    assert exc.value.code == 130
    restore()
    expect_error(capsys, main, ["--save_folder_name", "resumed", *argv, "--sam_rho", "3", "--resume"],
                 "settings changed (sam_rho)")
    main(["--save_folder_name", "resumed", *argv, "--resume"])
    a, b = (load_tensors(tmp_path / n / "model.safetensors") for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "resuming after epoch 1" in (tmp_path / "resumed" / "attack.log").read_text()


# ----------------------------------------------------------------------------- the paper's Table 5 layout

@pytest.fixture
def budget_records(tmp_path):
    """Plain and SAM-trained records (budgets 1.0 and 2.0) of one model, one of another model, and a
    lambda ablation run on the plain record, each with hand-written figures (ACC, ASR, DER, wall s)."""
    root = tmp_path / "records"
    fake_record(root, "bn", "badnet", 0, (90, 95), {"ft": (88, 40, 70, 100), "d3": (89, 1, 96, 100),
                                                     "d3_lmd1": (85, 0.5, 95, 100)})
    fake_record(root, "bn_sam2", "badnet", 0, (91, 96), {"ft": (90, 30, 80, 100), "ft-sam": (90, 35, 79, 200),
                                                         "d3": (89, 0.8, 97, 100)}, sam_rho=2.0)
    fake_record(root, "bl_sam2", "blended", 0, (92, 99), {"ft": (91, 80, 60, 100), "ft-sam": (91, 82, 58, 200),
                                                          "d3": (90, 2, 98, 100)}, sam_rho=2.0)
    fake_record(root, "bn_sam1", "badnet", 0, (90, 97), {"d3": (88, 0.6, 97, 100)}, sam_rho=1.0)
    fake_record(root, "w16", "badnet", 0, (80, 93), {"d3": (75, 5, 90, 100)}, model="preactresnet18_w16", sam_rho=2.0)
    return root


def _md_lines(path) -> list[list[str]]:
    return [[c.strip() for c in ln.split("|")[1:-1]] for ln in path.read_text().splitlines() if ln.startswith("| ")]


def test_by_budget_has_the_papers_table5_layout(budget_records, tmp_path):
    out = tmp_path / "out" / "table5"
    text = results_table.main(["--record_dir", str(budget_records), "--by_budget", "--out", str(out)])
    assert "Defenses against the adaptive attack (SAM budget sam_rho): cifar10, preactresnet18, in %" in text
    md = out.with_suffix(".md").read_text()
    assert md.count("**Defenses against the adaptive attack") == 2 and "cifar10, preactresnet18_w16**" in md
    lines = _md_lines(out.with_suffix(".md"))
    head = lines[0]
    assert head[:6] == ["attack", "defense", "ACC (no budget)", "ASR (no budget)", "paper ACC (no budget)",
                        "paper ASR (no budget)"]
    assert head[6:10] == ["ACC (1.0)", "ASR (1.0)", "paper ACC (1.0)", "paper ASR (1.0)"]
    assert head[10:] == ["ACC (2.0)", "ASR (2.0)", "paper ACC (2.0)", "paper ASR (2.0)"]
    body = lines[1:1 + 8]  # the first table: badnet and blended, each none / ft / ft-sam / d3
    # the rows are the attacked model and the defenses run on the SAM records: no d3_lmd1
    assert [(r[0], r[1]) for r in body] == [("badnet", "No Defense"), ("", "ft"), ("", "ft-sam"), ("", "d3"),
                                            ("blended", "No Defense"), ("", "ft"), ("", "ft-sam"), ("", "d3")]
    by = {(attack, r[1]): r[2:] for attack, r in zip(["badnet"] * 4 + ["blended"] * 4, body)}
    # ours beside the paper's: the plain attack's from Table 1, the budgets' from Table 5
    assert by[("badnet", "No Defense")] == ["90.00", "95.00", "91.32", "95.03", "90.00", "97.00", "90.42", "96.43",
                                            "91.00", "96.00", "90.71", "96.28"]
    assert by[("badnet", "ft")] == ["88.00", "40.00", "89.96", "1.48", "-", "-", "92.02", "26.30",
                                    "90.00", "30.00", "92.64", "33.01"]
    assert by[("badnet", "d3")][4:8] == ["88.00", "0.60", "90.90", "0.76"]
    assert by[("blended", "ft-sam")] == ["-", "-", "92.67", "11.61", "-", "-", "92.17", "72.71",
                                         "91.00", "82.00", "92.14", "82.80"]
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    got = {(r["model"], r["attack"], r["defense"], r["budget"]): (r["clean_acc"], r["asr"], r["paper_asr"])
           for r in rows}
    assert got[("preactresnet18", "blended", "d3", "2.0")] == ("90.00", "2.00", "1.22")
    assert got[("preactresnet18", "badnet", "ft", "")] == ("88.00", "40.00", "1.48")
    assert got[("preactresnet18_w16", "badnet", "d3", "2.0")] == ("75.00", "5.00", "0.72")
    assert len(rows) == 3 + 2 + 8 + 2  # plain badnet: none, ft, d3 (not d3_lmd1); budget 1.0: 2; 2.0: 8; w16: 2


def test_by_budget_refusals_write_nothing(budget_records, tmp_path, capsys):
    base = ["--record_dir", str(budget_records), "--out", str(tmp_path / "out" / "t")]
    expect_error(capsys, results_table.main, [*base, "--by_budget", "--ablation", "lmd"], "two layouts")
    expect_error(capsys, results_table.main, [*base, "--by_budget", "--paper"], "leave --paper out")
    plain = tmp_path / "plain"
    fake_record(plain, "bn", "badnet", 0, (90, 95), {"ft": (88, 40, 70, 100)})
    expect_error(capsys, results_table.main, ["--record_dir", str(plain), "--out", str(tmp_path / "out" / "t"),
                                              "--by_budget"], "no finished attack record here was trained with")
    assert not (tmp_path / "out").exists()
