"""``--reserve_dataset_path``: the defender's clean data from another labelled set (the D3 paper's Table 4).
What the defense receives is exactly that set's drawn images with the record's class indices, the run
records the set's fingerprint (not its path), and every set that does not fit is one line, nothing written."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CLASSES, _images, copy_record, expect_error, interrupt_after_saves, run_args
from PIL import Image

import defense.d3 as d3
import defense.pdb as pdb
from defense.base import Defense
from defense.runner import run_defense
from utils.record import load_tensors

PER_CLASS = 6


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_set(root: Path, images: np.ndarray, labels: np.ndarray, names=CLASSES, prefix: str = "") -> Path:
    """``root/[prefix/]<class name>/<i>.png``."""
    for i, (img, k) in enumerate(zip(images, labels)):
        path = root / prefix / names[k] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(img))
    return root


@pytest.fixture(scope="module")
def reserve(tmp_path_factory):
    """60 new images (not of the tiny dataset), 6 per class, as a folder and as a zip of the same tree."""
    rng = np.random.default_rng(7)
    images, labels = _images(rng, 10 * PER_CLASS)
    root = tmp_path_factory.mktemp("reserve")
    folder = write_set(root / "generated", images, labels)
    zip_path = root / "generated.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, f"cifar_like/{p.relative_to(folder)}")
    # the order the reader gives: by class folder name, then file name
    order = sorted(range(len(labels)), key=lambda i: (CLASSES[labels[i]], i))
    return {"folder": folder, "zip": zip_path, "images": torch.from_numpy(images[order]),
            "labels": torch.from_numpy(labels[order]).long(), "rng": rng}


def spy_run(tiny_data, root, *extra):
    seen = {}

    def spy(model, clean, cfg, report):
        seen.update(images=clean.data.images.clone(), labels=clean.data.labels.clone())
        return model
    run_defense(Defense("spy", spy, "spy defense"), ["--result_file", "badnet", *run_args(tiny_data, root),
                                                     "--epochs", "1", "--batch_size", "8", "--random_seed", "0",
                                                     *extra])
    return seen, root / "badnet" / "defense" / "spy"


@pytest.mark.parametrize("source", ["folder", "zip"])
def test_the_defense_holds_the_drawn_images_of_the_reserve_set(source, reserve, tiny_data, tiny_record, tmp_path):
    copy_record(tiny_record, tmp_path)
    seen, out = spy_run(tiny_data, tmp_path, "--reserve_dataset_path", str(reserve[source]), "--ratio", "0.5")
    index = load_tensors(out / "reserved_index.safetensors")["reserved_index"]
    assert len(index) == 30 and index.max() < 60  # --ratio counts the reserve set's images
    assert torch.equal(seen["images"], reserve["images"][index])
    assert torch.equal(seen["labels"], reserve["labels"][index])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert "reserve_dataset_path" not in config and len(config["reserve_fingerprint"]) == 16
    assert "none of the training set" in (out / "defense.log").read_text()


def test_folder_and_zip_of_one_set_have_one_fingerprint_and_class_indices_name_classes(reserve, tiny_data,
                                                                                       tiny_record, tmp_path):
    prints = []
    for i, path in enumerate([reserve["folder"], reserve["zip"]]):
        copy_record(tiny_record, tmp_path / str(i))
        _, out = spy_run(tiny_data, tmp_path / str(i), "--reserve_dataset_path", str(path), "--ratio", "1")
        prints.append(yaml.safe_load((out / "config.yaml").read_text())["reserve_fingerprint"])
    assert prints[0] == prints[1]
    # folders named by class index: the same labels (another fingerprint: other names)
    numeric = write_set(tmp_path / "numeric", reserve["images"].numpy(), reserve["labels"].numpy(),
                        names=[str(k) for k in range(10)])
    copy_record(tiny_record, tmp_path / "n")
    seen, _ = spy_run(tiny_data, tmp_path / "n", "--reserve_dataset_path", str(numeric), "--ratio", "1")
    assert sorted(seen["labels"].tolist()) == sorted(reserve["labels"].tolist())


def test_a_d3_run_on_a_reserve_set_finishes_and_resumes_only_on_that_set(monkeypatch, capsys, reserve, tiny_data,
                                                                           tiny_record, tmp_path):
    copy_record(tiny_record, tmp_path)
    args = ["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--ratio", "0.5", "--epochs", "3",
            "--save_name", "d3_generated"]
    restore = interrupt_after_saves(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        d3.main([*args, "--reserve_dataset_path", str(reserve["folder"])])
    restore()
    other = write_set(tmp_path / "other", reserve["images"].numpy()[::-1].copy(), reserve["labels"].numpy()[::-1])
    expect_error(capsys, d3.main, [*args, "--reserve_dataset_path", str(other), "--resume"],
                 "settings changed (reserve_fingerprint)")
    d3.main([*args, "--reserve_dataset_path", str(reserve["folder"]), "--resume"])
    summary = json.loads((tmp_path / "badnet" / "defense" / "d3_generated" / "summary.json").read_text())
    assert summary["reserved_size"] == 30 and summary["epochs"] == 3


def _bad_sets(root: Path, reserve, tiny_data) -> dict:
    images, labels = reserve["images"].numpy(), reserve["labels"].numpy()
    small = np.zeros((2, 3, 16, 16), dtype=np.uint8)
    with_test = np.concatenate([images, tiny_data["x_test"][:2]])
    root.mkdir()
    evil = root / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../cat/0.png", _png(images[0]))
    (root / "empty").mkdir()
    loose = write_set(root / "loose", images[:4], labels[:4])
    (loose / "stray.png").write_bytes(_png(images[0]))
    return {
        "the class folder 'kitten' is none of the record's 10 classes":
            write_set(root / "kitten", images[:2], np.array([0, 1]), names=["kitten", "airplane"]),
        "is 16x16, but the record's cifar10 images are all 32x32; give --reserve_dataset_path a set at 32x32":
            write_set(root / "small", small, np.array([0, 1])),
        "holds class folders under several folders (test/, train/)":
            write_set(write_set(root / "split", images[:3], labels[:3], prefix="train"), images[3:6], labels[3:6],
                      prefix="test"),
        "2 of its 62 images are images of the record's test set":
            write_set(root / "leak", with_test, np.concatenate([labels, tiny_data["y_test"][:2]])),
        "whose path leaves the archive's folder": evil,
        "holds no images": root / "empty",
        "lies outside a class folder": loose,
        "does not exist": root / "nowhere",
    }


def test_every_set_that_does_not_fit_is_one_line_and_nothing_is_written(capsys, reserve, tiny_data, tiny_record,
                                                                        tmp_path):
    copy_record(tiny_record, tmp_path)
    out = tmp_path / "badnet" / "defense"
    for pattern, path in _bad_sets(tmp_path / "sets", reserve, tiny_data).items():
        expect_error(capsys, d3.main, ["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--ratio", "0.5",
                                       "--epochs", "1", "--reserve_dataset_path", str(path)], pattern)
        assert not out.exists() or not any(out.iterdir()), pattern


def test_an_in_training_defense_refuses_a_reserve_set(capsys, reserve, tiny_data, tiny_record, tmp_path):
    copy_record(tiny_record, tmp_path)
    expect_error(capsys, pdb.main, ["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "1",
                                    "--reserve_dataset_path", str(reserve["folder"])],
                 "--reserve_dataset_path: pdb trains a new model on the poisoned training set")
    assert not (tmp_path / "badnet" / "defense").exists()
