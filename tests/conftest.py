"""Shared fixtures: a tiny CIFAR-10-shaped dataset the tests write themselves, in the pickle layout
and as a zipped PNG image-folder tree (the same pixels, so both give the same fingerprint)."""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from models import create_model

ROOT = Path(__file__).resolve().parents[1]

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_PER_BATCH, TEST_SIZE = 40, 100  # 200 training images in 5 batches


def _images(rng: np.random.Generator, n: int):
    """Class-dependent colours plus noise: learnable, so the tiny end-to-end runs move."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    base = (labels * 23 + 20).astype(np.int64)[:, None, None, None]
    noise = rng.integers(0, 40, (n, 3, 32, 32))
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pickles = root / "pickles" / "cifar-10-batches-py"
    pickles.mkdir(parents=True)
    splits = {"train": [], "test": []}
    for i in range(1, 6):
        x, y = _images(rng, TRAIN_PER_BATCH)
        splits["train"].append((x, y))
        with open(pickles / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1), "labels": y.tolist()}, f)
    x, y = _images(rng, TEST_SIZE)
    splits["test"].append((x, y))
    with open(pickles / "test_batch", "wb") as f:
        pickle.dump({"data": x.reshape(len(x), -1), "labels": y.tolist()}, f)

    zip_path = root / "tiny-png.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for split, parts in splits.items():
            xs = np.concatenate([p[0] for p in parts])
            ys = np.concatenate([p[1] for p in parts])
            for k in range(10):
                for j, img in enumerate(xs[ys == k]):
                    buf = io.BytesIO()
                    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")
                    zf.writestr(f"tiny/{split}/{CLASSES[k]}/{j:04d}.png", buf.getvalue())
    x_train = np.concatenate([p[0] for p in splits["train"]])
    y_train = np.concatenate([p[1] for p in splits["train"]])
    return {"pickles": root / "pickles", "zip": zip_path, "x_train": x_train, "y_train": y_train,
            "x_test": x, "y_test": y}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BACKDOOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


# A tiny attack for end-to-end runs: the narrow test model, 2 epochs of 200 images.
TINY = ["--model", "preactresnet18_w8", "--epochs", "2", "--batch_size", "64"]


def run_args(tiny_data: dict, record_dir) -> list[str]:
    return ["--dataset_path", str(tiny_data["pickles"]), "--record_dir", str(record_dir)]


@pytest.fixture(scope="session")
def tiny_record(tiny_data, tmp_path_factory) -> Path:
    """One finished BadNets record (``<records>/badnet``), made in-process once for the session and
    shared read-only: a test that changes a record copies it first (:func:`copy_record`)."""
    import attack.badnet as badnet
    records = tmp_path_factory.mktemp("shared-records")
    badnet.main(["--save_folder_name", "badnet", *run_args(tiny_data, records), "--random_seed", "1", *TINY])
    return records / "badnet"


def copy_record(record: Path, dest_root: Path, name: str | None = None) -> Path:
    """A private copy of a record (without its defenses) to change or defend."""
    import shutil
    dest = dest_root / (name or record.name)
    shutil.copytree(record, dest, ignore=shutil.ignore_patterns("defense"))
    return dest


def expect_error(capsys, main, argv, pattern: str = "") -> str:
    """Run ``main(argv)`` as the CLI does: it must exit 2 with exactly one ``error:`` line, the last
    (log lines may precede it), holding ``pattern``, and no traceback. Returns that line."""
    from utils.cli import cli_main
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    output = capsys.readouterr().err
    assert exc.value.code == 2, output
    lines = output.strip().splitlines()
    err = lines[-1] if lines else ""
    assert err.startswith("error: "), output
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in output, output
    assert pattern in err, err
    return err


def rebuild_and_defend(record: Path, dataset_path: str, attack):
    """The shared end of every attack's end-to-end test: the record rebuilds its backdoor test set
    (fingerprint-checked) as ``attack.apply_trigger`` of the non-target test images, and D3 runs on
    it. Returns the rebuilt set and the dataset."""
    import json

    import torch

    import defense.d3 as d3
    from attack.record import rebuild_backdoor_test
    from utils.record import load_tensors
    from utils.sources import load_dataset
    meta = json.loads((record / "record.json").read_text())
    dataset = load_dataset("cifar10", dataset_path, None)
    bd = rebuild_backdoor_test(meta, record, dataset)
    index = load_tensors(record / "indices.safetensors")["test_backdoor_index"]
    assert torch.equal(bd.index, index)
    trigger = load_tensors(record / "trigger.safetensors")
    assert torch.equal(bd.images, attack.apply_trigger(dataset.test.images[bd.index], trigger))
    assert (bd.target_labels == meta["attack_target"]).all() and (bd.true_labels != meta["attack_target"]).all()
    d3.main(["--result_file", record.name, "--record_dir", str(record.parent), "--dataset_path", str(dataset_path),
             "--epochs", "1", "--ratio", "0.5"])
    summary = json.loads((record / "defense" / "d3" / "summary.json").read_text())
    assert 0.0 <= summary["asr"] <= 1.0
    return bd, dataset


def interrupt_after_saves(monkeypatch, count: int):
    """Ctrl-C in the epoch after the ``count``-th checkpoint was written (the end of epoch count + 1)."""
    import utils.report
    real, calls = utils.report.EpochReporter.__call__, []

    def report_or_interrupt(self, epoch, stats):
        calls.append(epoch)
        if len(calls) == count + 1:
            raise KeyboardInterrupt
        return real(self, epoch, stats)
    monkeypatch.setattr(utils.report.EpochReporter, "__call__", report_or_interrupt)
    return lambda: monkeypatch.setattr(utils.report.EpochReporter, "__call__", real)


def leaks(root, secrets: list) -> list:
    """The tensors among ``secrets`` (test images, poison indices, trigger artifacts) reachable from
    ``root`` through attributes, containers and module state: what a defense could read."""
    import torch
    import torch.nn as nn
    found, seen = [], set()

    def walk(obj, depth=0):
        if id(obj) in seen or depth > 12:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.extend(s for s in secrets if s.shape == obj.shape and torch.equal(s.to(obj.device), obj.detach()))
            return
        if isinstance(obj, dict):
            children = list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            children = list(obj)
        elif isinstance(obj, nn.Module):
            children = list(obj.state_dict().values()) + [vars(obj)]
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            children = [vars(obj)]
        else:
            return
        for child in children:
            walk(child, depth + 1)
    walk(root)
    return found


def shapes(model: nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def on_meta(name: str, **kw) -> nn.Module:
    """Layout only: no memory, no initialisation."""
    with torch.device("meta"):
        return create_model(name, 10, **kw)


def linear_names(model: nn.Module) -> list[str]:
    """What D3's ``all_linear`` selects."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def d3_args(tiny_data, root, *extra):
    return ["--result_file", "badnet", *run_args(tiny_data, root), "--ratio", "0.5", *extra]


def pytest_configure(config):
    """A torch/torchvision pair that does not match stops the suite with one line, not a traceback at
    collection (utils/vision.py)."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        from utils.vision import mismatch_message
        pytest.exit(mismatch_message(e), returncode=2)
