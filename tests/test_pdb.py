"""PDB: the reversible label map, the wrapper that stamps the defensive trigger inside the model, its
save and reload as a plain classifier, the in-training threat model, and the CLI on a tiny record."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_record, expect_error, leaks, run_args

import defense.pdb as pdb
from attack.record import load_model
from models import create_model
from models.defensive import DefensiveTriggerModel, shifted_label_map
from utils.datasets import DATASETS
from utils.evaluate import predict
from utils.loader import Normalizer
from utils.record import load_tensors
from utils.sources import load_dataset

CIFAR10_MEAN, CIFAR10_STD = DATASETS["cifar10"].mean, DATASETS["cifar10"].std


def test_label_map_inverts_the_defensive_shift_on_every_class():
    for k, shift in ((10, 1), (43, 1), (10, 3)):
        label_map = shifted_label_map(k, shift)
        trained_as = (torch.arange(k) + shift) % k          # y -> (y + shift) mod K at training time
        assert torch.equal(label_map[torch.arange(k)], trained_as)
        # an inner model that answers the shifted label: the wrapper's map gives back every class
        inner_logits = torch.nn.functional.one_hot(trained_as, k).float()
        assert torch.equal(inner_logits[:, label_map].argmax(1), torch.arange(k))


def test_wrapper_is_the_inner_model_on_the_stamped_batch_mapped_back():
    torch.manual_seed(0)
    inner = create_model("preactresnet18_w8", 10).eval()
    mask = pdb.trigger_mask(1, 32, "cifar10")
    wrapped = DefensiveTriggerModel(inner, mask, 2.0, shifted_label_map(10, 1), CIFAR10_MEAN, CIFAR10_STD).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = Normalizer(CIFAR10_MEAN, CIFAR10_STD, "cpu")(images)
    by_hand = images.float() / 255
    by_hand[:, :, :7, :7] = 2.0                                   # the 7x7 corner, outside [0, 1] on purpose
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = inner((by_hand - mean) / std)
        got = wrapped(x)
    torch.testing.assert_close(got, expected[:, (torch.arange(10) + 1) % 10], atol=1e-5, rtol=1e-5)
    assert mask.sum() == 49 and pdb.trigger_mask(0, 32, "cifar10").sum() == 124


def test_epoch_size_for_the_time_estimate_counts_the_defensive_copies():
    from types import SimpleNamespace
    cfg = SimpleNamespace(ratio=0.1, sample_frequency=5)
    labels = torch.arange(10).repeat(2500)  # 25,000 images, 2,500 per class
    picked = pdb.defensive_index(labels, cfg.ratio, 10, seed=0)
    assert pdb.epoch_images(cfg, len(labels), 10) == len(labels) + 5 * len(picked) == 37_500


def test_defensive_batches_stamp_only_defensive_samples():
    images = torch.full((6, 3, 32, 32), 100, dtype=torch.uint8)
    defensive = torch.tensor([False, False, False, True, True, True])
    mask = pdb.trigger_mask(1, 32, "cifar10")

    def stamp(x):
        return x * (1 - mask) + 510.0 * mask

    class Cfg:
        aug, lmd_2, lmd_3 = 0.0, 1.0, 1.0
    loader = pdb.DefensiveBatches(pdb.ImageSet(images, torch.arange(6)), defensive, stamp, Cfg, batch_size=6,
                                  normalizer=lambda x: x, device="cpu", shuffle=False, channels_last=False)
    x, y = next(iter(loader))
    assert torch.equal(x[:3], images[:3].float())                # the training set: untouched (no crop/flip here)
    corner = x[3:, :, :7, :7]                                     # brightness 0.5..1 (p 0.2) and rotation may move it
    assert (corner >= 255).float().mean() > 0.5 and x[3:].max() > 255


@pytest.fixture(scope="module")
def defended(tiny_data, tiny_record, tmp_path_factory):
    root = tmp_path_factory.mktemp("pdb")
    copy_record(tiny_record, root)
    pdb.main(["--result_file", "badnet", *run_args(tiny_data, root), "--epochs", "1", "--batch_size", "64"])
    return root / "badnet" / "defense" / "pdb"


def test_cli_writes_a_wrapped_model_that_reloads_as_a_plain_classifier(defended, tiny_data):
    meta = json.loads((defended / "record.json").read_text())
    summary = json.loads((defended / "summary.json").read_text())
    assert meta["model_wrapper"] == "pdb" and "reserved_index.safetensors" not in meta["files"]
    assert summary["training_set_size"] == 200 and summary["defensive_samples"] == 20
    assert {"without_wrapper_clean_acc", "without_wrapper_asr", "der"} <= set(summary)
    weights = load_tensors(defended / "model.safetensors")
    assert torch.equal(weights["label_map"], (torch.arange(10) + 1) % 10) and float(weights["trigger_value"]) == 2.0
    model = load_model(defended)                                  # data only: names from record.json, safetensors
    dataset = load_dataset("cifar10", str(tiny_data["pickles"]), None)
    logits = predict(model, dataset.test.images, Normalizer(CIFAR10_MEAN, CIFAR10_STD, "cpu"), device="cpu")
    accuracy = (logits.argmax(1) == dataset.test.labels).float().mean().item()
    assert accuracy == pytest.approx(summary["clean_acc"], abs=1e-6)


def test_pdb_receives_the_poisoned_set_but_no_index_trigger_or_test_data(tiny_data, tiny_record, tmp_path):
    from attack.record import load_attack_record, load_train_set, poisoned_train_set
    from defense.base import Defense
    from defense.runner import run_defense
    copy_record(tiny_record, tmp_path)
    secrets = [torch.from_numpy(tiny_data["x_test"])]
    secrets += list(load_tensors(tmp_path / "badnet" / "indices.safetensors").values())
    secrets += list(load_tensors(tmp_path / "badnet" / "trigger.safetensors").values())
    record = load_attack_record(tmp_path / "badnet")
    dataset = load_dataset("cifar10", str(tiny_data["pickles"]), None)
    poisoned = poisoned_train_set(record, load_train_set(record, dataset))
    seen = {}

    def spy(model, held, cfg, report):
        seen.update(leaks=leaks((model, held, cfg, report), secrets), held=held, model=model)
        return model
    run_defense(Defense("spy", spy, "spy defense", holds="poisoned_train"),
                ["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "1", "--ratio", "0.1",
                 "--random_seed", "0"])
    assert seen["leaks"] == [] and seen["held"].clean_train is None
    assert torch.equal(seen["held"].data.images.cpu(), poisoned.images)   # the set as the victim held it
    attacked = load_tensors(tmp_path / "badnet" / "model.safetensors")
    fresh = seen["model"].state_dict()
    assert not torch.equal(fresh["linear.weight"].cpu(), attacked["linear.weight"])  # a new model, not the attacked one


def test_bad_settings_are_one_clear_line(capsys, tiny_data, tiny_record, tmp_path):
    copy_record(tiny_record, tmp_path)
    argv = ["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "1"]
    expect_error(capsys, pdb.main, argv + ["--trigger_type", "7"], "--trigger_type 7")
    expect_error(capsys, pdb.main, argv + ["--defensive_source", "oracle"], "--defensive_source 'oracle'")
    expect_error(capsys, pdb.main, argv + ["--ratio", "0.99"], "lower --ratio")
    assert not (tmp_path / "badnet" / "defense" / "pdb").exists()
