"""BackdoorBench records in and out (attack/backdoorbench.py, attack/import_backdoorbench.py,
attack/export_backdoorbench.py): a record built here in BackdoorBench's documented structure is
imported, defended and tabled; a malicious look-alike runs nothing; a wrong dataset, an escaping path
and an unknown model are refused in one line; export then import keeps everything bit for bit."""
from __future__ import annotations

import copy
import json
import pickle
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attack.import_backdoorbench as imp
from conftest import expect_error
from models import create_model
from utils.record import load_tensors

PATCH = 3  # a white square in the bottom-right corner: the poisoned images


def _poison(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, -PATCH:, -PATCH:] = 255
    return x


def _split(root: Path, name: str, split: str, images, labels, indicator, target, order=None) -> dict:
    """A BackdoorBench dataset state (bd_dataset_v2.retrieve_state) with its PNGs written."""
    base = f"./record/{name}/bd_{split}_dataset"
    data = {}
    for i in np.flatnonzero(indicator == 1):
        label = int(labels[i])
        png = root / f"bd_{split}_dataset" / str(label) / f"{i}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_poison(images[i]).transpose(1, 2, 0)).save(png)
        data[np.int64(i)] = {"path": f"{base}/{label}/{i}.png", "other_info": [target, label]}
    return {"bd_data_container": {"save_folder_path": base, "data_dict": data, "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": np.arange(len(labels), dtype=np.int64) if order is None else order,
            "poison_indicator": indicator, "save_folder_path": base}


def make_bb_record(tiny_data, root: Path, name: str = "badnet_bb", target: int = 0, defense: bool = True) -> Path:
    """record/<name>/ as BackdoorBench's save_attack_result writes it (pickle protocol 2, numpy arrays)."""
    folder = root / "record" / name
    folder.mkdir(parents=True)
    y_train, y_test = tiny_data["y_train"], tiny_data["y_test"]
    train_ind = np.zeros(len(y_train), dtype=np.float64)
    train_ind[np.random.default_rng(0).choice(len(y_train), 20, replace=False)] = 1
    test_ind = (y_test != target).astype(np.float64)
    torch.manual_seed(0)
    model = create_model("preactresnet18", 10, pretrained=False)
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": state, "data_path": "./data/cifar10",
                "img_size": [32, 32, 3], "clean_data": "cifar10",
                "bd_train": _split(folder, name, "train", tiny_data["x_train"], y_train, train_ind, target),
                "bd_test": _split(folder, name, "test", tiny_data["x_test"], y_test, test_ind, target,
                                  np.flatnonzero(test_ind).astype(np.int64))}, folder / "attack_result.pt")
    torch.save({"attack": "badnet", "attack_target": target}, folder / "info.pickle")
    (folder / "attack_df.csv").write_text("epoch,test_acc,test_asr,test_ra\n0,0.1,0.2,0.3\n")
    if defense:
        (folder / "defense" / "ft").mkdir(parents=True)
        torch.manual_seed(1)
        other = create_model("preactresnet18", 10, pretrained=False).state_dict()
        torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": other},
                   folder / "defense" / "ft" / "defense_result.pt")
        # the per-epoch table BackdoorBench's trainer writes beside it (pandas' index column first)
        (folder / "defense" / "ft" / "ft_df.csv").write_text(
            ",epoch,batch,train_acc,test_acc,test_asr,test_ra\n0,0,2,0.5,0.41,0.07,0.45\n1,1,2,0.6,0.46,0.05,0.49\n")
    return folder


def _args(tiny_data, bb: Path, records: Path, name: str, *extra) -> list[str]:
    return ["--bb_record", str(bb), "--dataset_path", str(tiny_data["pickles"]), "--save_folder_name", name,
            "--record_dir", str(records), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def imported(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bb")
    bb = make_bb_record(tiny_data, root)
    records = root / "records"
    imp.main(_args(tiny_data, bb, records, "bb"))
    return bb, records / "bb"


def test_import_is_a_native_record_that_defenses_and_tables_read(imported, tiny_data, capsys):
    import defense.ft as ft
    from attack.record import load_attack_record, rebuild_backdoor_test
    from sweeps.collect import collect
    from utils.sources import load_dataset
    bb, record = imported
    meta = json.loads((record / "record.json").read_text())
    assert meta["attack"] == "backdoorbench" and meta["attack_label_trans"] == "all2one" and meta["attack_target"] == 0
    assert meta["source"]["attack"] == "badnet" and len(meta["source"]["sha256"]) == 64
    load_attack_record(record)
    dataset = load_dataset("cifar10", tiny_data["pickles"], None)
    bd = rebuild_backdoor_test(meta, record, dataset)
    assert torch.equal(bd.index, torch.from_numpy(np.flatnonzero(tiny_data["y_test"] != 0)))
    expected = torch.from_numpy(np.stack([_poison(x) for x in tiny_data["x_test"][bd.index.numpy()]]))
    assert torch.equal(bd.images, expected) and torch.equal(bd.true_labels, dataset.test.labels[bd.index])
    index = load_tensors(record / "indices.safetensors")["train_poison_index"]
    assert len(index) == 20
    torch.manual_seed(0)
    model = create_model("preactresnet18", 10, pretrained=False)
    stored = load_tensors(record / "model.safetensors")
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    summary = json.loads((record / "defense" / "bb_ft" / "summary.json").read_text())
    assert 0 <= summary["asr"] <= 1
    # where it came from, without the machine's paths (records copy to other machines)
    assert summary["imported_from"] == f"{bb.name}/defense/ft/defense_result.pt"
    assert json.loads((record / "summary.json").read_text())["imported_from"] == f"{bb.name}/attack_result.pt"
    # BackdoorBench's own figures of its defense (the last row of ft_df.csv) are kept beside ours
    assert {k: summary[f"backdoorbench_{k}"] for k in ("test_acc", "test_asr", "test_ra")} == \
        {"test_acc": 0.46, "test_asr": 0.05, "test_ra": 0.49}
    ft.main(["--result_file", "bb", "--record_dir", str(record.parent), "--dataset_path", str(tiny_data["pickles"]),
             "--epochs", "1", "--ratio", "0.05", "--device", "cpu"])
    rows = collect(record.parent)
    assert {r.defense for r in rows} == {"-", "bb_ft", "ft"} and not any(r.problem for r in rows)
    assert {r.attack for r in rows} == {"badnet"}


def test_a_malicious_look_alike_runs_nothing(tiny_data, tmp_path, capsys):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {sentinel}",))
    bb = tmp_path / "record" / "evil"
    bb.mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "model": Evil()}, bb / "attack_result.pt")
    err = expect_error(capsys, imp.main, _args(tiny_data, bb, tmp_path / "records", "evil"), "refused")
    assert "system" in err
    assert not sentinel.exists() and not (tmp_path / "records" / "evil").exists()
    with open(bb / "x.pkl", "wb") as f:  # a legacy (non-zip) pickle calling exec
        pickle.dump(type("E", (), {"__reduce__": lambda s: (exec, (f"open({str(sentinel)!r}, 'w')",))})(), f,
                    protocol=2)
    shutil.move(bb / "x.pkl", bb / "attack_result.pt")
    expect_error(capsys, imp.main, _args(tiny_data, bb, tmp_path / "records", "evil"), "exec")
    assert not sentinel.exists() and not (tmp_path / "records").exists()


def test_refusals_are_one_line_and_write_nothing(tiny_data, tmp_path, capsys):
    bb = make_bb_record(tiny_data, tmp_path / "a", defense=False)
    records = tmp_path / "records"
    orig = torch.load(bb / "attack_result.pt", weights_only=False)
    obj = copy.deepcopy(orig)
    obj["bd_train"]["poison_indicator"] = np.zeros(5000, dtype=np.float64)  # a dataset of another size
    obj["bd_train"]["bd_data_container"]["data_dict"] = {}
    torch.save(obj, bb / "attack_result.pt")
    expect_error(capsys, imp.main, _args(tiny_data, bb, records, "x"), "not the data of")
    obj = copy.deepcopy(orig)
    obj["img_size"] = [64, 64, 3]
    torch.save(obj, bb / "attack_result.pt")
    expect_error(capsys, imp.main, _args(tiny_data, bb, records, "x"), "img_size")
    obj = copy.deepcopy(orig)
    key = next(iter(obj["bd_test"]["bd_data_container"]["data_dict"]))
    obj["bd_test"]["bd_data_container"]["data_dict"][key]["path"] = "./record/badnet_bb/bd_test_dataset/../../x.png"
    torch.save(obj, bb / "attack_result.pt")
    expect_error(capsys, imp.main, _args(tiny_data, bb, records, "x"), "leaves the record folder")
    obj["model_name"] = "resnet50"
    torch.save(obj, bb / "attack_result.pt")
    expect_error(capsys, imp.main, _args(tiny_data, bb, records, "x"), "preactresnet18")
    assert not (records / "x").exists()


def test_a_defense_on_a_bare_backdoorbench_folder_says_how_to_import(tiny_data, tmp_path, capsys):
    import defense.ft as ft
    bb = make_bb_record(tiny_data, tmp_path, defense=False)
    expect_error(capsys, ft.main, ["--result_file", bb.name, "--record_dir", str(bb.parent), "--dataset_path",
                                   str(tiny_data["pickles"])], "import_backdoorbench.py")


def test_export_then_import_keeps_weights_images_and_indices(imported, tiny_data, tmp_path):
    import attack.export_backdoorbench as exp
    from attack.backdoorbench import read_bb_file
    _, record = imported
    out = tmp_path / "record" / "bb_out"
    exp.main(["--result_file", record.name, "--record_dir", str(record.parent), "--out", str(out),
              "--dataset_path", str(tiny_data["pickles"])])
    obj = read_bb_file(out / "attack_result.pt")
    assert isinstance(read_bb_file(out / "defense" / "bb_ft" / "defense_result.pt")["model"], dict)
    # BackdoorBench's load_attack_result gives the file's tensors the names of its model's state_dict() by
    # position: the exported state dicts must be in the model's own order (not safetensors' sorted one)
    model = create_model("preactresnet18", 10, pretrained=False)
    stored = load_tensors(record / "model.safetensors")
    for state in (obj["model"], read_bb_file(out / "defense" / "bb_ft" / "defense_result.pt")["model"]):
        by_position = dict(zip(model.state_dict(), state.values()))
        assert list(state) == list(model.state_dict())
        assert all(torch.equal(by_position[k], state[k]) for k in state)
    assert all(torch.equal(obj["model"][k], stored[k]) for k in stored)
    assert sorted(p.name for p in (out / "bd_test_dataset").iterdir()) == [str(k) for k in range(1, 10)]
    with zipfile.ZipFile(out / "attack_result.pt") as z:  # plain data only: no class of ours
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"attack." not in pkl and b"utils." not in pkl and b"models." not in pkl
    records = tmp_path / "again"
    imp.main(_args(tiny_data, out, records, "again"))
    for name in ("model.safetensors", "trigger.safetensors", "indices.safetensors"):
        a, b = load_tensors(record / name), load_tensors(records / "again" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    again = load_tensors(records / "again" / "defense" / "bb_bb_ft" / "model.safetensors")
    first = load_tensors(record / "defense" / "bb_ft" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
