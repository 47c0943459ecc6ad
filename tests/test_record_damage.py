"""The damage matrix of records: every file of an attack record, of a defense output and an interrupted
run's checkpoint, damaged each way (missing, empty, truncated, a byte flipped, valid content of the wrong
shape with its hash re-sealed, a pickle payload), through the consumer that reads it. Each cell must be
refused in one ``error:`` line (exit 2; a ``UserError`` for a library call) that names the file, with no
traceback, nothing written and no pickle run. The tables are data: a row is file x damage -> the
expected words of the message. tests/test_record.py holds the field-by-field damage of record.json."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_record, interrupt_after_saves, run_args
from safetensors.torch import save_file

import defense.ft as ft
from attack.record import load_attack_record, load_model
from utils.cli import cli_main
from utils.errors import UserError
from utils.record import sha256_file


class Payload:
    """Unpickled, it would create the sentinel file: the test that it never runs."""
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


# Damages. A byte-level damage is a name; a content damage writes the file anew and re-seals its
# SHA-256 in record.json (as a user who knows the format might), so the hash check does not catch it.
def _flip(path, _):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


BYTES = {
    "missing": lambda path, _: path.unlink(),
    "empty": lambda path, _: path.write_bytes(b""),
    "truncated": lambda path, _: path.write_bytes(path.read_bytes()[:path.stat().st_size // 2]),
    "flipped": _flip,
    "pickle": lambda path, sentinel: torch.save({"model": Payload(sentinel)}, path),
}


def text(content):
    return lambda path, _: path.write_text(content)


def json_edit(change):
    def damage(path, _):
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj))
    return damage


def yaml_edit(change):
    def damage(path, _):
        obj = yaml.safe_load(path.read_text())
        change(obj)
        path.write_text(yaml.safe_dump(obj))
    return damage


def tensors(**values):
    return lambda path, _: save_file(values, str(path))


def torch_edit(change):
    def damage(path, _):
        obj = torch.load(path, weights_only=True)
        torch.save(change(obj), path)
    return damage


def _setitem(key, value):
    def change(obj):
        obj[key] = value
    return change


def _stage_epochs_as_text(state):
    for stage in state["stages"].values():
        stage["epoch"] = str(stage["epoch"])
    return state


HASH = "does not match the SHA-256 in"
NOT_JSON = "is not valid JSON"
FIT = "do not fit model PreActResNet"
PICKLED = "is a torch pickle, not a safetensors file: refused unread"
U8 = torch.zeros(3, 32, 32, dtype=torch.uint8)


def _hashed(name, missing=None):
    """The byte-level rows of a file record.json lists: its hash refuses each."""
    return [(name, "missing", missing or f"{name} is missing; the record is incomplete"),
            *[(name, d, f"{name} {HASH}") for d in ("empty", "truncated", "flipped")]]


# An attack record, defended by ``defense/ft.py`` (the real CLI entry, in-process).
ATTACK_MATRIX = [
    ("record.json", "missing", "record.json, written last by a finished run, is missing"),
    *[("record.json", d, f"record.json {NOT_JSON}") for d in ("empty", "truncated", "flipped", "pickle")],
    ("record.json", ("a list", text("[1, 2]")), "record.json is not a record manifest"),
    ("record.json", ("version a string", json_edit(_setitem("format_version", "2"))),
     "has record format version '2', this toolkit reads version 2 only"),
    *_hashed("config.yaml"),
    ("config.yaml", ("model a list", text("dataset: cifar10\nmodel: [preactresnet18_w8]\n")),
     "names 'preactresnet18_w8' where config.yaml's model is ['preactresnet18_w8']"),
    ("config.yaml", ("padding a string", yaml_edit(_setitem("random_crop_padding", "four"))), "random_crop_padding"),
    ("config.yaml", "pickle", "config.yaml is not plain YAML"),
    *_hashed("summary.json"),
    ("summary.json", ("a list", text("[0.9, 1.0]")), "summary.json holds a list, not a mapping of results"),
    ("summary.json", ("asr a string", json_edit(_setitem("asr", "high"))), "summary.json: 'asr' is str, not a number"),
    ("summary.json", "pickle", f"summary.json {NOT_JSON}"),
    *_hashed("metrics.csv"),  # read by no consumer: only its hash guards it (NOT_READ below)
    *_hashed("model.safetensors"),
    ("model.safetensors", ("other tensors", tensors(x=torch.zeros(2))), FIT),
    ("model.safetensors", "pickle", f"model.safetensors {PICKLED}"),
    *_hashed("trigger.safetensors"),
    ("trigger.safetensors", ("no mask", tensors(patch=U8)), "cannot apply the badnet trigger stored in"),
    ("trigger.safetensors", ("mask 8x8", tensors(patch=U8, mask=torch.ones(3, 8, 8, dtype=torch.uint8))),
     "cannot apply the badnet trigger stored in"),
    ("trigger.safetensors", "pickle", f"trigger.safetensors {PICKLED}"),
    *_hashed("indices.safetensors"),
    ("indices.safetensors", ("float index", tensors(train_poison_index=torch.zeros(3),
                                                    test_backdoor_index=torch.zeros(3, dtype=torch.long))),
     "holds no train_poison_index as a 1-D integer tensor"),
    ("indices.safetensors", "pickle", f"indices.safetensors {PICKLED}"),
]

# A defense output, read by ``attack.record.load_model`` (its only reader in the toolkit: NAD's
# --teacher_model_loc, the tests' and users' scripts); record.json's manifest guards the files it skips.
DEFENSE_MATRIX = [
    ("record.json", "missing", "holds no finished attack record or defense output"),
    *[("record.json", d, f"record.json {NOT_JSON}") for d in ("empty", "truncated", "flipped", "pickle")],
    ("record.json", ("a list", text("[1, 2]")), "record.json is not a record manifest"),
    ("record.json", ("model a number", json_edit(_setitem("model", 18))), "'model' is int, not str"),
    ("record.json", ("wrapper a list", json_edit(_setitem("model_wrapper", ["pdb"]))),
     "names the model wrapper ['pdb']"),
    *[row for name in ("config.yaml", "summary.json", "metrics.csv", "reserved_index.safetensors")
      for row in _hashed(name)],
    *_hashed("model.safetensors"),
    ("model.safetensors", ("other tensors", tensors(x=torch.zeros(2))), FIT),
    ("model.safetensors", "pickle", f"model.safetensors {PICKLED}"),
]

# checkpoint.pt of an interrupted ``defense/ft.py`` run, read by the same command with --resume.
# (Missing, it is no error: --resume then starts from epoch 0 with a note; see the test below.)
CHECKPOINT_MATRIX = [
    ("checkpoint.pt", "empty", "checkpoint.pt as a PyTorch weights file"),
    ("checkpoint.pt", "truncated", "checkpoint.pt as a PyTorch weights file"),
    ("checkpoint.pt", "flipped", "checkpoint.pt as a PyTorch weights file (Bad CRC-32"),
    ("checkpoint.pt", ("a list", torch_edit(lambda state: [state])),
     "checkpoint.pt is not a checkpoint of this toolkit (it holds a list, not a mapping)"),
    ("checkpoint.pt", ("epoch a string", torch_edit(_stage_epochs_as_text)), "'epoch' is '0', not a count"),
    ("checkpoint.pt", "pickle", "refused to load"),
]

# Content damage, hash re-sealed, to files the consumers above do not parse: accepted, and no pickle
# runs (byte damage to them is refused by the hash: the rows above). An attack record's metrics.csv is
# read by nothing; a defense output's summary.json is read by the tables too (sweeps/collect.py, through
# utils.record.read_summary, which refuses a wrong shape), its other files by nothing.
NOT_READ = [("attack", "metrics.csv", "pickle"), ("attack", "metrics.csv", ("a list", text("[1, 2]\n"))),
            *[("defense", name, damage) for name in ("config.yaml", "summary.json", "metrics.csv")
              for damage in ("pickle", ("a list", text("[1, 2]\n")))],
            ("defense", "reserved_index.safetensors", "pickle"),
            ("defense", "reserved_index.safetensors", ("other tensors", tensors(x=torch.zeros(2))))]


def _id(row):
    return f"{row[0]}-{row[1] if isinstance(row[1], str) else row[1][0]}"


def damage(folder: Path, name: str, how, sentinel: Path) -> None:
    path = folder / name
    if isinstance(how, str):
        BYTES[how](path, sentinel)
        resealed = how == "pickle"
    else:
        how[1](path, sentinel)
        resealed = True
    manifest = folder / "record.json"
    if resealed and name != "record.json" and manifest.is_file():
        meta = json.loads(manifest.read_text())
        if name in meta["files"]:
            meta["files"][name] = sha256_file(path)
            manifest.write_text(json.dumps(meta))


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, main, argv, pattern: str, name: str) -> str:
    """``main(argv)`` through the CLI: exit 2, one ``error:`` line (the last on stderr: logs may precede
    it) holding ``pattern`` and the file's name, and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2, err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert "Traceback" not in err, err
    assert pattern in lines[-1] and name in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def defended(tiny_data, tiny_record, tmp_path_factory) -> Path:
    """A finished ``defense/ft`` output (1 epoch) of the shared record."""
    root = tmp_path_factory.mktemp("defended")
    rec = copy_record(tiny_record, root)
    ft.main(["--result_file", rec.name, *run_args(tiny_data, root), "--epochs", "1"])
    return rec / "defense" / "ft"


@pytest.fixture(scope="module")
def interrupted(tiny_data, tiny_record, tmp_path_factory) -> Path:
    """A record whose ``defense/ft`` run (2 epochs) was interrupted after its first checkpoint."""
    root = tmp_path_factory.mktemp("interrupted")
    rec = copy_record(tiny_record, root)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit):
        interrupt_after_saves(mp, 1)
        cli_main(ft.main, ["--result_file", rec.name, *run_args(tiny_data, root), "--epochs", "2"])
    assert (rec / "defense" / "ft" / "checkpoint.pt").is_file()
    return rec


@pytest.mark.parametrize("name,how,message", ATTACK_MATRIX, ids=[_id(r) for r in ATTACK_MATRIX])
def test_damaged_attack_record_is_refused(capsys, tiny_data, tiny_record, tmp_path, name, how, message):
    rec = copy_record(tiny_record, tmp_path)
    sentinel = tmp_path / "sentinel"
    damage(rec, name, how, sentinel)
    before = files(rec)
    refused(capsys, ft.main, ["--result_file", rec.name, *run_args(tiny_data, tmp_path), "--epochs", "1"],
            message, name)
    assert files(rec) == before  # no defense output, nothing changed
    assert not sentinel.exists()


@pytest.mark.parametrize("name,how,message", DEFENSE_MATRIX, ids=[_id(r) for r in DEFENSE_MATRIX])
def test_damaged_defense_output_is_refused(defended, tmp_path, name, how, message):
    out = shutil.copytree(defended, tmp_path / "ft")
    sentinel = tmp_path / "sentinel"
    damage(out, name, how, sentinel)
    before = files(out)
    with pytest.raises(UserError) as exc:
        load_model(out)
    line = str(exc.value)
    assert "\n" not in line and message in line and name in line, line
    assert files(out) == before and not sentinel.exists()


@pytest.mark.parametrize("name,how,message", CHECKPOINT_MATRIX, ids=[_id(r) for r in CHECKPOINT_MATRIX])
def test_damaged_checkpoint_is_refused(capsys, tiny_data, interrupted, tmp_path, name, how, message):
    rec = shutil.copytree(interrupted, tmp_path / interrupted.name)
    sentinel = tmp_path / "sentinel"
    damage(rec / "defense" / "ft", name, how, sentinel)
    before = files(rec)
    line = refused(capsys, ft.main, ["--result_file", rec.name, *run_args(tiny_data, tmp_path), "--epochs", "2",
                                     "--resume"], message, name)
    assert "--overwrite" in line  # how to go on
    assert files(rec) == before and not sentinel.exists()  # nothing resumed from it, nothing written


def test_missing_checkpoint_starts_again_with_a_note(capsys, tiny_data, interrupted, tmp_path):
    rec = shutil.copytree(interrupted, tmp_path / interrupted.name)
    (rec / "defense" / "ft" / "checkpoint.pt").unlink()
    capsys.readouterr()
    ft.main(["--result_file", rec.name, *run_args(tiny_data, tmp_path), "--epochs", "2", "--resume"])
    assert "no interrupted run to resume" in capsys.readouterr().err
    assert (rec / "defense" / "ft" / "record.json").is_file()


@pytest.mark.parametrize("kind,name,how", NOT_READ, ids=[f"{r[0]}-{_id(r[1:])}" for r in NOT_READ])
def test_content_the_consumers_do_not_read_is_accepted(tiny_record, defended, tmp_path, kind, name, how):
    folder = (copy_record(tiny_record, tmp_path) if kind == "attack"
              else shutil.copytree(defended, tmp_path / "ft"))
    sentinel = tmp_path / "sentinel"
    damage(folder, name, how, sentinel)
    if kind == "attack":
        load_attack_record(folder)  # all that a defense reads of the record before the data
    load_model(folder)
    assert not sentinel.exists()


def test_nad_teacher_pickle_is_refused_in_one_line(capsys, tiny_data, tiny_record, defended, tmp_path):
    """--teacher_model_loc takes a defense output or record folder or a .safetensors file; a .pt
    pickle (even of plain weights) is refused unread, since unpickling can run code."""
    import defense.nad as nad
    rec = copy_record(tiny_record, tmp_path)
    sentinel = tmp_path / "sentinel"
    argv = ["--result_file", rec.name, *run_args(tiny_data, tmp_path), "--epochs", "1", "--te_epochs", "1"]
    for payload in ({"model": Payload(sentinel)}, load_model(defended).state_dict()):
        torch.save(payload, tmp_path / "teacher.pt")
        line = refused(capsys, nad.main, [*argv, "--teacher_model_loc", str(tmp_path / "teacher.pt")],
                       "is a torch pickle (.pt): refused unread, since unpickling can run code; give a defense "
                       "output or attack record folder", "teacher.pt")
        assert "the record is damaged" not in line
    assert not sentinel.exists() and not (rec / "defense" / "nad").exists()
    nad.main([*argv, "--teacher_model_loc", str(defended)])  # the defense output as the teacher
    assert (rec / "defense" / "nad" / "record.json").is_file()
