"""The attack runner (attack/runner.py): the class-balanced training subset, recorded and inherited,
and BackdoorBench's drop_last for data-poisoning attacks."""
import json

import pytest
import torch
from conftest import TINY, run_args

import attack.badnet as badnet
import defense.ft as ft
from utils.loader import BatchLoader
from utils.record import load_tensors


def test_train_subset_is_balanced_seeded_recorded_and_inherited(tiny_data, tmp_path):
    argv = [*run_args(tiny_data, tmp_path), *TINY, "--epochs", "1", "--train_subset", "50"]
    badnet.main(["--save_folder_name", "sub", *argv])
    rec = tmp_path / "sub"
    meta = json.loads((rec / "record.json").read_text())
    assert meta["dataset"]["train_subset"] == 50 and meta["dataset"]["train_size"] == 50
    index = load_tensors(rec / "indices.safetensors")["train_subset_index"]
    labels = torch.from_numpy(tiny_data["y_train"])[index]
    assert len(index) == 50 and torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 5))
    assert len(load_tensors(rec / "indices.safetensors")["train_poison_index"]) == 5
    badnet.main(["--save_folder_name", "sub2", *argv])
    assert torch.equal(index, load_tensors(tmp_path / "sub2" / "indices.safetensors")["train_subset_index"])
    ft.main(["--result_file", "sub", *run_args(tiny_data, tmp_path), "--epochs", "1", "--ratio", "0.5"])
    out = rec / "defense" / "ft"
    assert json.loads((out / "summary.json").read_text())["reserved_size"] == 25
    assert load_tensors(out / "reserved_index.safetensors")["reserved_index"].max() < 50


def test_data_poisoning_attacks_drop_the_last_partial_batch(monkeypatch, tiny_data, tmp_path):
    """BackdoorBench trains data-poisoning attacks and the prototype with ``drop_last=True``; WaNet and
    Input-aware (poisoning inside each batch, their own loaders) keep the last partial batch. 200 tiny
    training images in batches of 64: 3 batches, or 4."""
    import attack.prototype as prototype
    import attack.runner
    import attack.wanet as wanet

    class Seen(Exception):
        pass

    class Spy(BatchLoader):  # records the training loader's length, then stops the run before training
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            raise Seen(len(self))

    monkeypatch.setattr(attack.runner, "BatchLoader", Spy)
    for main, batches in ((badnet.main, 3), (prototype.main, 3), (wanet.main, 4)):
        with pytest.raises(Seen) as seen:
            main(["--save_folder_name", main.__module__, *run_args(tiny_data, tmp_path), *TINY])
        assert seen.value.args == (batches,), main.__module__
