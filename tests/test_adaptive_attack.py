"""The adaptive attack of the D3 paper's Sec. 4.4 (``--sam_rho``): every attack can train its classifier
with FT-SAM's adaptive SAM; the record keeps the budget, resumes bit for bit, and tables tell it apart."""
from __future__ import annotations

import importlib

import pytest
import torch
from conftest import TINY, expect_error, interrupt_after_saves, run_args

import attack.badnet as badnet
import attack.inputaware as inputaware
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
