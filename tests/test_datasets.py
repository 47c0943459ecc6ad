"""Loading datasets (utils/sources.py, readers.py, layouts.py). CIFAR-10's pickles and a zipped image
tree give the same pixels; the cache is written once; a missing or tampered source is one line.
GTSRB and Tiny-ImageNet: each accepted layout, written small in tmp_path, loads into BackdoorBench's
tensors (GTSRB resized whole with PIL bilinear to 32x32, class = numeric id; Tiny-ImageNet 64x64,
class = sorted wnid, the validation set as test set), once, from the cache afterwards; a broken
folder is one error line naming the file. Ends with an attack and a defense at 43 classes."""
from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import expect_error
from PIL import Image

import utils.readers as readers
import utils.sources as sources
from utils.datasets import DATASETS
from utils.errors import UserError
from utils.sources import load_dataset

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
GTSRB_TRAIN_PER_CLASS = 2
ODD_SIZES = [(35, 40), (29, 31), (48, 33), (40, 35)]  # (width, height): every image is resized


# ----------------------------------------------------------------------------- GTSRB trees

def _gtsrb_pixels():
    """HWC uint8 arrays: 2 training images per class, 43 test images with shuffled classes; a
    class-dependent colour plus noise, so the end-to-end run has something to learn."""
    rng = np.random.default_rng(3)

    def image(c, k):
        w, h = ODD_SIZES[k % len(ODD_SIZES)]
        base = np.array([c * 5 + 20, 255 - c * 5, (c * 37) % 256])
        return np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    train = {c: [image(c, c + j) for j in range(GTSRB_TRAIN_PER_CLASS)] for c in range(43)}
    test_labels = [(i * 7) % 43 for i in range(43)]
    test = [(image(c, i), c) for i, c in enumerate(test_labels)]
    return train, test


def _row(name, img, c):
    h, w = img.shape[:2]
    return f"{name};{w};{h};5;5;{w - 5};{h - 5};{c}"


def _write_ppm(path: Path, img: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PPM")


def _write_gtsrb_train(train_dir: Path, train):
    for c, images in train.items():
        folder = train_dir / f"{c:05d}"
        rows = [HEADER]
        for j, img in enumerate(images):
            name = f"{j:05d}_{c:05d}.ppm"
            _write_ppm(folder / name, img)
            rows.append(_row(name, img, c))
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")


def _test_csv(test, with_labels=True):
    rows = [HEADER if with_labels else HEADER.rsplit(";", 1)[0]]
    for i, (img, c) in enumerate(test):
        row = _row(f"{i:05d}.ppm", img, c)
        rows.append(row if with_labels else row.rsplit(";", 1)[0])
    return "\n".join(rows) + "\n"


def write_gtsrb_backdoorbench(root: Path, train, test) -> Path:
    """BackdoorBench's layout: <root>/Train/<class>/ with GT-<class>.csv, <root>/Test/ with GT-final_test.csv."""
    _write_gtsrb_train(root / "Train", train)
    for i, (img, _) in enumerate(test):
        _write_ppm(root / "Test" / f"{i:05d}.ppm", img)
    (root / "Test" / "GT-final_test.csv").write_text(_test_csv(test))
    return root


def write_gtsrb_official(root: Path, train, test, csv_at: str = "up") -> Path:
    """The official archives extracted in ``root``: GTSRB/Final_Training/Images/<class>/,
    GTSRB/Final_Test/Images/ (with the unlabelled GT-final_test.test.csv of the images archive) and
    the ground-truth GT-final_test.csv beside the images, one level up, or in ``root``."""
    _write_gtsrb_train(root / "GTSRB" / "Final_Training" / "Images", train)
    images = root / "GTSRB" / "Final_Test" / "Images"
    for i, (img, _) in enumerate(test):
        _write_ppm(images / f"{i:05d}.ppm", img)
    (images / "GT-final_test.test.csv").write_text(_test_csv(test, with_labels=False))
    where = {"images": images, "up": images.parent, "root": root}[csv_at]
    (where / "GT-final_test.csv").write_text(_test_csv(test))
    return root


def write_gtsrb_tree(root: Path, train, test) -> Path:
    """An image-folder tree with unpadded class names 0..42 (PNG, lossless)."""
    for c, images in train.items():
        for j, img in enumerate(images):
            (root / "train" / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "train" / str(c) / f"{j:05d}_{c:05d}.png")
    for i, (img, c) in enumerate(test):
        (root / "test" / str(c)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "test" / str(c) / f"{i:05d}.png")
    return root


def backdoorbench_resize(img: np.ndarray, size: int) -> np.ndarray:
    """What BackdoorBench feeds its model: torchvision's Resize((size, size)) on the PIL image."""
    import torchvision.transforms as T
    return np.asarray(T.Resize((size, size))(Image.fromarray(img)), dtype=np.uint8).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def gtsrb(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gtsrb")
    train, test = _gtsrb_pixels()
    return {"train": train, "test": test,
            "backdoorbench": write_gtsrb_backdoorbench(root / "bb" / "gtsrb", train, test),
            "official": write_gtsrb_official(root / "official", train, test, "up"),
            "tree": write_gtsrb_tree(root / "tree", train, test)}


def test_gtsrb_layouts_give_backdoorbench_tensors(gtsrb, tmp_path, monkeypatch):
    train, test = gtsrb["train"], gtsrb["test"]
    # BackdoorBench's --dataset_path is the folder above gtsrb/.
    bb = load_dataset("gtsrb", gtsrb["backdoorbench"].parent, cache_dir=tmp_path)
    assert bb.train.images.dtype == torch.uint8 and bb.train.images.shape == (86, 3, 32, 32)
    assert bb.test.images.shape == (43, 3, 32, 32)
    assert bb.classes == [f"{c:05d}" for c in range(43)]
    expected_train = np.stack([backdoorbench_resize(img, 32) for c in range(43) for img in train[c]])
    assert np.array_equal(bb.train.images.numpy(), expected_train)
    assert bb.train.labels.tolist() == [c for c in range(43) for _ in range(GTSRB_TRAIN_PER_CLASS)]
    assert np.array_equal(bb.test.images.numpy(), np.stack([backdoorbench_resize(img, 32) for img, _ in test]))
    assert bb.test.labels.tolist() == [c for _, c in test]  # the CSV's order and ClassIds

    # The official archives, decoded on several threads in small chunks: the same tensors.
    monkeypatch.setattr(readers, "DECODE_CHUNK", 8)
    monkeypatch.setattr(readers, "_decode_workers", lambda: 3)
    official = load_dataset("gtsrb", gtsrb["official"], cache_dir=tmp_path)
    assert torch.equal(official.train.images, bb.train.images) and torch.equal(official.test.images, bb.test.images)
    assert torch.equal(official.train.labels, bb.train.labels) and torch.equal(official.test.labels, bb.test.labels)
    assert official.fingerprint == bb.fingerprint and official.classes == bb.classes

    # Image-folder tree and its zip, class folders 0..42 in numeric order (not 0, 1, 10, 11, ...).
    zip_path = tmp_path / "gtsrb.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(gtsrb["tree"].rglob("*.png")):
            zf.write(p, f"gtsrb/{p.relative_to(gtsrb['tree']).as_posix()}")
    for source in (gtsrb["tree"], zip_path):
        tree = load_dataset("gtsrb", source, cache_dir=tmp_path)
        assert tree.classes == [str(c) for c in range(43)]
        assert torch.equal(tree.train.images, bb.train.images) and torch.equal(tree.train.labels, bb.train.labels)
        order = sorted(range(43), key=lambda i: (test[i][1], i))  # a tree orders the test set by class
        assert torch.equal(tree.test.images, bb.test.images[order]) and torch.equal(tree.test.labels,
                                                                                   bb.test.labels[order])


@pytest.mark.parametrize("csv_at", ["images", "root"])
def test_gtsrb_test_labels_beside_the_images_or_above(gtsrb, tmp_path, csv_at):
    root = write_gtsrb_official(tmp_path / "o", gtsrb["train"], gtsrb["test"], csv_at)
    ds = load_dataset("gtsrb", root, cache_dir=tmp_path / "cache")
    assert ds.test.labels.tolist() == [c for _, c in gtsrb["test"]]


def test_gtsrb_is_decoded_once_and_the_key_follows_the_labels_file(gtsrb, tmp_path, monkeypatch):
    # The official archives extracted side by side: the test labels lie beside GTSRB/, not in it.
    root = write_gtsrb_official(tmp_path / "official", gtsrb["train"], gtsrb["test"], "root")
    first = load_dataset("gtsrb", root, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("gtsrb-*.safetensors"))) == 1
    real_decode = sources._decode
    monkeypatch.setattr(sources, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = load_dataset("gtsrb", root, cache_dir=tmp_path / "cache")
    assert again.fingerprint == first.fingerprint and again.classes == first.classes

    # The labels lie outside the GTSRB/ folder, yet an edit there is a new source.
    labels_file = root / "GT-final_test.csv"
    labels_file.write_text(labels_file.read_text().replace(";0\n", ";1\n"))
    monkeypatch.setattr(sources, "_decode", real_decode)
    edited = load_dataset("gtsrb", root, cache_dir=tmp_path / "cache")
    assert edited.fingerprint != first.fingerprint
    assert (edited.test.labels != first.test.labels).sum() == 1
    # The same files elsewhere are another source (the location is in the key), with the same tensors.
    moved = tmp_path / "moved"
    shutil.copytree(gtsrb["official"], moved)  # labels in GTSRB/Final_Test/
    assert load_dataset("gtsrb", moved, cache_dir=tmp_path / "cache").fingerprint == first.fingerprint
    assert len(list((tmp_path / "cache").glob("gtsrb-*.safetensors"))) == 3


def _break(name):
    """Edits of a BackdoorBench GTSRB tree and the words of the error each must give."""
    def rewrite(path: Path, old: str, new: str):
        path.write_text(path.read_text().replace(old, new, 1))
    return {
        "no class csv": (lambda r: (r / "Train/00005/GT-00005.csv").unlink(), "Train/00005/GT-00005.csv is missing"),
        "unknown class id": (lambda r: rewrite(r / "Train/00002/GT-00002.csv", ";2\n", ";43\n"),
                             "GT-00002.csv line 2: ClassId 43 is not a GTSRB class"),
        "class id of another folder": (lambda r: rewrite(r / "Train/00002/GT-00002.csv", ";2\n", ";3\n"),
                                       "has ClassId 3 in the folder of class 2"),
        "missing class folder": (lambda r: shutil.rmtree(r / "Train/00042"), "Train/00042 is missing"),
        "extra class folder": (lambda r: (r / "Train/00043").mkdir(), "Train/00043 is not a GTSRB class folder"),
        "test image not annotated": (lambda r: shutil.copy(r / "Test/00001.ppm", r / "Test/extra.ppm"),
                                     "Test/extra.ppm is not listed in"),
        "annotated image missing": (lambda r: (r / "Test/00003.ppm").unlink(),
                                    "lists 00003.ppm, which is not an image in"),
        "no test labels": (lambda r: (r / "Test/GT-final_test.csv").unlink(),
                           "GT-final_test.csv (the test labels, from GTSRB_Final_Test_GT.zip) is not in"),
        "labels without ClassId": (lambda r: (r / "Test/GT-final_test.csv").write_text(
            "Filename;Width;Height\n00000.ppm;35;40\n"), "has no Filename and ClassId columns"),
        "bad row": (lambda r: rewrite(r / "Test/GT-final_test.csv", ";0\n", ";zero\n"),
                    "is not a Filename;...;ClassId"),
        "corrupt image": (lambda r: (r / "Train/00007/00001_00007.ppm").write_bytes(b"P6 junk"),
                          "cannot decode image"),
    }[name]


def _assert_broken_is_one_line(dataset: str, source, edit, words: str, tmp_path) -> None:
    """A copy of a good tree, broken by ``edit``, loads as one UserError line with ``words`` that names it."""
    root = tmp_path / dataset
    shutil.copytree(source, root)
    edit(root)
    with pytest.raises(UserError) as exc:
        load_dataset(dataset, root, cache_dir=tmp_path / "cache")
    message = str(exc.value)
    assert words in message and "\n" not in message, message
    assert str(root) in message  # names the file or folder


@pytest.mark.parametrize("case", ["no class csv", "unknown class id", "class id of another folder",
                                  "missing class folder", "extra class folder", "test image not annotated",
                                  "annotated image missing", "no test labels", "labels without ClassId", "bad row",
                                  "corrupt image"])
def test_gtsrb_broken_folder_is_one_clear_line(gtsrb, tmp_path, case):
    _assert_broken_is_one_line("gtsrb", gtsrb["backdoorbench"], *_break(case), tmp_path)


def test_layout_help_lists_the_new_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as exc:
        load_dataset("gtsrb", tmp_path / "empty", cache_dir=tmp_path)
    message = str(exc.value)
    assert message.startswith("no gtsrb data found") and "\n" not in message
    for words in ("Train/00000..00042/", "GT-<class>.csv", "GTSRB/Final_Training/Images/",
                  "GTSRB/Final_Test/Images/", "GT-final_test.csv", "train/<class>/", ".zip"):
        assert words in message, words
    with pytest.raises(UserError) as exc:
        load_dataset("tiny", tmp_path / "empty", cache_dir=tmp_path)
    message = str(exc.value)
    assert message.startswith("no tiny data found") and "\n" not in message
    for words in ("tiny-imagenet-200/", "train/<wnid>/images/", "wnids.txt", "val/val_annotations.txt",
                  "val/<wnid>/", "train/<class>/", ".zip"):
        assert words in message, words


# ----------------------------------------------------------------------------- Tiny-ImageNet trees

WNIDS = [f"n{(i * 7919) % 100000:08d}" for i in range(200)]  # 200 distinct ids, not in sorted order


def write_tiny(root: Path, val_by_class: bool = False) -> Path:
    """The official tiny-imagenet-200/ layout, 2 training and 1 validation JPEG per wnid, one of them
    grayscale; ``val_by_class`` sorts val/ into val/<wnid>/ as BackdoorBench's download does."""
    rng = np.random.default_rng(5)
    base = root / "tiny-imagenet-200"
    (base / "wnids.txt").parent.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")

    def jpeg(path: Path, k: int, gray: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        img = np.clip(k + rng.integers(0, 50, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img[..., 0] if gray else img).save(path, quality=90)
    for k, w in enumerate(WNIDS):
        for j in range(2):
            jpeg(base / "train" / w / "images" / f"{w}_{j}.JPEG", k, gray=(k, j) == (3, 1))
        (base / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t63\t63\n")
    val = list(range(len(WNIDS)))
    rng.shuffle(val)  # val_i belongs to WNIDS[val[i]]
    lines = []
    for i, k in enumerate(val):
        w = WNIDS[k]
        jpeg(base / "val" / (w if val_by_class else "images") / f"val_{i}.JPEG", k)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    if not val_by_class:
        (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    jpeg(base / "test" / "images" / "test_0.JPEG", 0)  # unlabelled: ignored
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {"official": write_tiny(root / "official"), "by_class": write_tiny(root / "by_class", True)}


def _decoded(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def test_tiny_imagenet_layouts(tiny, tmp_path):
    ds = load_dataset("tiny", tiny["official"], cache_dir=tmp_path)
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (400, 3, 64, 64)
    assert ds.test.images.shape == (200, 3, 64, 64)
    assert ds.classes == sorted(WNIDS) != WNIDS  # BackdoorBench's ImageFolder order, not wnids.txt's
    base = tiny["official"] / "tiny-imagenet-200"
    expected = [_decoded(base / "train" / w / "images" / f"{w}_{j}.JPEG") for w in sorted(WNIDS) for j in range(2)]
    assert np.array_equal(ds.train.images.numpy(), np.stack(expected))
    assert ds.train.labels.tolist() == [k for k in range(200) for _ in range(2)]
    gray = sorted(WNIDS).index(WNIDS[3]) * 2 + 1  # a grayscale JPEG comes out as three equal channels
    assert torch.equal(ds.train.images[gray, 0], ds.train.images[gray, 2])
    # The test set is val/, ordered by class then file name, labelled from val_annotations.txt.
    assert ds.test.labels.tolist() == list(range(200))
    notes = dict(line.split("\t")[:2] for line in (base / "val/val_annotations.txt").read_text().splitlines())
    by_class = sorted(notes, key=lambda f: (sorted(WNIDS).index(notes[f]), f))
    assert np.array_equal(ds.test.images.numpy(), np.stack([_decoded(base / "val/images" / f) for f in by_class]))

    # val/ sorted into val/<wnid>/ (BackdoorBench after its download), under tiny/: the same tensors.
    shutil.copytree(tiny["by_class"], tmp_path / "data" / "tiny")
    again = load_dataset("tiny", tmp_path / "data", cache_dir=tmp_path)
    assert again.fingerprint == ds.fingerprint and again.classes == ds.classes


def _break_tiny(name):
    base = "tiny-imagenet-200"
    w0 = sorted(WNIDS)[0]

    def odd_size(r: Path):
        Image.fromarray(np.zeros((64, 65, 3), np.uint8)).save(r / base / "train" / w0 / "images" / f"{w0}_1.JPEG")

    def unknown_wnid(r: Path):
        path = r / base / "val" / "val_annotations.txt"
        path.write_text(path.read_text().replace(f"\t{WNIDS[5]}\t", "\tn99999999\t", 1))
    return {
        "image of another size": (odd_size, f"{w0}_1.JPEG is 65x64, but Tiny-ImageNet images are all 64x64"),
        "val image not annotated": (lambda r: shutil.copy(r / base / "val/images/val_0.JPEG",
                                                          r / base / "val/images/extra.JPEG"),
                                    "val/images/extra.JPEG is not listed in"),
        "unknown wnid": (unknown_wnid, "n99999999 is not one of the 200 classes"),
        "missing class": (lambda r: shutil.rmtree(r / base / "train" / WNIDS[7]),
                          f"train/{WNIDS[7]} is missing: "),
        "no annotations": (lambda r: (r / base / "val/val_annotations.txt").unlink(), "val_annotations.txt is missing"),
    }[name]


@pytest.mark.parametrize("case", ["image of another size", "val image not annotated", "unknown wnid",
                                  "missing class", "no annotations"])
def test_tiny_broken_folder_is_one_clear_line(tiny, tmp_path, case):
    _assert_broken_is_one_line("tiny", tiny["official"], *_break_tiny(case), tmp_path)


# ----------------------------------------------------------------------------- configs and the pipeline

def test_prototype_configs_follow_backdoorbench():
    import yaml

    from utils.config import CONFIG_DIR
    from utils.train import build_scheduler
    for name, epochs in (("gtsrb", 50), ("tiny", 200)):
        cfg = yaml.safe_load((CONFIG_DIR / "attack" / "prototype" / f"{name}.yaml").read_text())
        assert (cfg["dataset"], cfg["epochs"], cfg["batch_size"], cfg["lr"]) == (name, epochs, 128, 0.01)
        assert (cfg["client_optimizer"], cfg["sgd_momentum"], cfg["wd"]) == ("sgd", 0.9, 0.0005)
        assert cfg["random_crop_padding"] == 4 and cfg["random_hflip"] is False  # BackdoorBench flips CIFAR-10 only
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
        build_scheduler(opt, SimpleNamespace(**{"cos_t_max": None, **cfg}), epochs)  # a scheduler the toolkit has
    assert DATASETS["gtsrb"].mean == (0, 0, 0) and DATASETS["gtsrb"].std == (1, 1, 1)
    assert DATASETS["tiny"].mean == (0.4802, 0.4481, 0.3975)
    assert DATASETS["tiny"].std == (0.2302, 0.2265, 0.2262)


def test_tiny_attack_reads_its_prototype(capsys, tmp_path):
    """Every key of tiny.yaml is a flag the attack accepts: the run gets as far as the data."""
    import attack.badnet as badnet
    expect_error(capsys, badnet.main, ["--save_folder_name", "t", "--dataset", "tiny", "--dataset_path",
                                       str(tmp_path / "none"), "--record_dir", str(tmp_path)], "no tiny data found")


def test_badnet_then_ft_on_gtsrb(gtsrb, tmp_path):
    """The whole pipeline at 43 classes: attack, record, defense on the reserved clean data."""
    import attack.badnet as badnet
    import defense.ft as ft
    source = str(gtsrb["backdoorbench"])
    badnet.main(["--model", "preactresnet18_w8", "--epochs", "1", "--batch_size", "64", "--dataset", "gtsrb",
                 "--dataset_path", source, "--record_dir", str(tmp_path), "--save_folder_name", "g"])
    meta = json.loads((tmp_path / "g" / "record.json").read_text())
    assert meta["dataset"]["name"] == "gtsrb" and meta["dataset"]["num_classes"] == 43
    assert meta["dataset"]["image_size"] == 32 and meta["dataset"]["train_size"] == 86
    ft.main(["--result_file", "g", "--record_dir", str(tmp_path), "--dataset_path", source, "--epochs", "1",
             "--ratio", "0.5"])
    summary = json.loads((tmp_path / "g" / "defense" / "ft" / "summary.json").read_text())
    assert all(0.0 <= summary[k] <= 1.0 for k in ("clean_acc", "asr", "ra", "attack_clean_acc", "attack_asr"))


def test_reduce_lr_on_plateau_steps_on_the_epoch_train_loss():
    """Tiny-ImageNet's prototype scheduler: fit steps it once per epoch on the mean training loss."""
    from types import SimpleNamespace

    import torch

    from utils.loader import FixedBatches
    from utils.train import build_optimizer, build_scheduler, fit
    model = torch.nn.Linear(2, 2)
    cfg = SimpleNamespace(lr_scheduler="ReduceLROnPlateau", client_optimizer="sgd", lr=0.1, sgd_momentum=0.0, wd=0.0)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, 20)

    def flat_loss(m, x, y):  # a loss that never improves: the plateau rule must cut the rate
        loss = (m(x) * 0).sum() + 1.0
        return loss, {"train_loss": loss.detach()}
    fit(model, FixedBatches([(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))]), optimizer, scheduler,
        flat_loss, epochs=13)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # patience 10, then x0.1


def test_offline_first_run_says_what_to_place_where(monkeypatch, tmp_path):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as exc:
        load_dataset("cifar10", "data")
    message = str(exc.value)
    assert f"{tmp_path / 'data'}" in message and "could not be downloaded" in message
    assert "cifar-10-batches-py/" in message and "train/<class>/" in message and ".zip" in message
    assert "\n" not in message
    assert not (tmp_path / "data").exists()  # no empty folder left behind


def test_pickle_layout_loads_exact_pixels(tiny_data, tmp_path):
    ds = load_dataset("cifar10", tiny_data["pickles"], cache_dir=tmp_path)
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (200, 3, 32, 32)
    assert np.array_equal(ds.train.images.numpy(), tiny_data["x_train"])
    assert np.array_equal(ds.test.labels.numpy(), tiny_data["y_test"])
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10


def test_zip_image_folder_holds_the_same_pixels(tiny_data, tmp_path):
    """PNG is lossless: the zipped tree gives the pickles' images, ordered by class then file name."""
    from_zip = load_dataset("cifar10", tiny_data["zip"], cache_dir=tmp_path)
    assert from_zip.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"]
    order = np.argsort(tiny_data["y_train"], kind="stable")
    assert np.array_equal(from_zip.train.images.numpy(), tiny_data["x_train"][order])
    assert np.array_equal(from_zip.train.labels.numpy(), tiny_data["y_train"][order])
    assert from_zip.fingerprint != load_dataset("cifar10", tiny_data["pickles"], cache_dir=tmp_path).fingerprint


def test_cache_is_written_once_and_reused(tiny_data, tmp_path, monkeypatch):
    load_dataset("cifar10", tiny_data["zip"], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("cifar10-*.safetensors"))) == 1
    import utils.sources as sources
    monkeypatch.setattr(sources, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = load_dataset("cifar10", tiny_data["zip"], cache_dir=tmp_path)
    assert len(again.train) == 200


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no cifar10 data found"):
        load_dataset("cifar10", tmp_path / "nowhere.zip", cache_dir=tmp_path)
    with pytest.raises(UserError, match="no cifar10 data found"):
        load_dataset("cifar10", tmp_path / "empty_dir", cache_dir=tmp_path, download=False)
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("mnist", tmp_path, cache_dir=tmp_path)


def test_tampered_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}))
    with pytest.raises(UserError, match="not a readable CIFAR batch"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache", download=False)
    assert not (tmp_path / "pwned").exists()
