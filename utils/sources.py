"""Loading a dataset from ``--dataset_path``: finding its layout, decoding it once (:mod:`utils.readers`)
and caching the uint8 tensors.

Accepted sources for ``--dataset_path`` (checked in this order; ``<dataset>/`` below it is tried too,
BackdoorBench's ``<dataset_path>/<dataset>`` layout):
  * a ``.zip`` of an image-folder tree ``[<prefix>/]{train,test}/<class>/<image>``;
  * CIFAR-10: a folder holding the torchvision pickles (``data_batch_1`` .. ``test_batch``), directly
    or in ``cifar-10-batches-py/``;
  * GTSRB: BackdoorBench's ``Train/<00000..00042>/`` (images and ``GT-<class>.csv``) and ``Test/``
    (images and ``GT-final_test.csv``); or the official archives extracted,
    ``[GTSRB/]Final_Training/Images/<00000..00042>/`` and ``[GTSRB/]Final_Test/Images/`` with
    ``GT-final_test.csv`` (from ``GTSRB_Final_Test_GT.zip``) beside the test images or above them;
  * Tiny-ImageNet: ``[tiny-imagenet-200/]`` with ``train/<wnid>/images/``, ``wnids.txt`` and
    ``val/images/`` + ``val/val_annotations.txt`` (or ``val/<wnid>/``, as BackdoorBench's download
    leaves it); the validation set is the test set, as in BackdoorBench;
  * a folder holding an image-folder tree ``{train,test}/<class>/<image>``.
For CIFAR-10 a missing folder is filled by torchvision's download when the network allows (a pickle
folder lacking some batches is refused instead). A damaged source (a ``.zip`` or one of its members,
a pickle, an image) is one :class:`UserError` line naming the file; a ``.zip`` is read in memory,
never extracted, and one with a member path leaving its folder (``../x``) is refused.

Class indices follow the sorted class-folder names, which for CIFAR-10 is the standard order; GTSRB
classes are the numeric class ids, Tiny-ImageNet's the sorted wnids (BackdoorBench's ImageFolder).
Images are resized to the dataset's size with PIL bilinear interpolation, as torchvision's
``Resize`` on a PIL image does in BackdoorBench (GTSRB: the whole image, no ROI crop).
Decoded tensors go to a cache file (safetensors) under ``--cache_dir``; its key is the layout, the
source's path and its files' sizes and modification times, so an edited source is decoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from utils.archives import open_zip
from utils.datasets import Dataset, DatasetSpec, ImageSet, get_spec, tensor_fingerprint
from utils.errors import UserError
from utils.layouts import gtsrb_dirs, gtsrb_test_csv, read_gtsrb, read_tiny
from utils.readers import CIFAR10_TRAIN_BATCHES, has_dir, read_cifar10_pickles, read_image_tree, split_entries
from utils.vision import import_vision

CACHE_VERSION = 1


def _find_source(spec: DatasetSpec, path: Path):
    """Return (kind, location) for the first accepted layout under ``path``, or None."""
    if path.is_file():
        if zipfile.is_zipfile(path):
            return "zip", path
        if path.suffix.lower() == ".zip":
            state = "it is empty, 0 bytes" if path.stat().st_size == 0 else \
                "cut short or damaged: no end-of-archive record"
            raise UserError(f"{path} is not a readable .zip archive ({state}); copy or create the .zip again")
        return None
    if not path.is_dir():
        return None
    for folder in (path, path / spec.name):
        if spec.name == "cifar10":
            for pickles in (folder, folder / "cifar-10-batches-py"):
                if all((pickles / b).is_file() for b in CIFAR10_TRAIN_BATCHES + ["test_batch"]):
                    return "cifar_pickle", pickles
        if spec.name == "gtsrb":
            if has_dir(folder, "Train"):
                return "gtsrb_csv", folder
            for root in (folder / "GTSRB", folder):
                if has_dir(root, "Final_Training"):
                    return "gtsrb_official", root
        if spec.name == "tiny":
            for root in (folder / "tiny-imagenet-200", folder):
                if has_dir(root, "train") and (has_dir(root, "val") or (root / "wnids.txt").is_file()):
                    return "tiny_official", root
        if has_dir(folder, "train") and has_dir(folder, "test"):
            return "folder", folder
    return None


def _layout_help(spec: DatasetSpec, path: Path) -> str:
    tree = ("a folder holding train/<class>/ and test/<class>/ image folders", "a .zip of such a tree")
    layouts = {
        "cifar10": ["a folder holding the CIFAR-10 pickles, cifar-10-batches-py/data_batch_1..5 and test_batch",
                    *tree],
        "gtsrb": ["BackdoorBench's layout, a folder holding Train/00000..00042/ (images and GT-<class>.csv) and "
                  "Test/ (images and GT-final_test.csv)",
                  "the official archives extracted, GTSRB/Final_Training/Images/00000..00042/ and "
                  "GTSRB/Final_Test/Images/, with GT-final_test.csv (GTSRB_Final_Test_GT.zip) beside the test "
                  "images or one level up",
                  f"{tree[0]} (class folders named by class id 0..42)", tree[1]],
        "tiny": ["tiny-imagenet-200/ as extracted from tiny-imagenet-200.zip (train/<wnid>/images/, wnids.txt, "
                 "val/images/ with val/val_annotations.txt, or val/<wnid>/ as BackdoorBench's download leaves it)",
                 *tree],
    }[spec.name]
    where = f" (directly or in {spec.name}/)" if spec.name != "cifar10" else ""
    return (f"no {spec.name} data found at {path.resolve()}; give --dataset_path as one of{where}: "
            + "; ".join(f"({i}) {text}" for i, text in enumerate(layouts, 1)))


def _source_files(kind: str, location: Path) -> list[Path]:
    """The files a source is read from, for its cache key: the layout's folder (or zip), plus the
    GTSRB test labels when they lie beside the folder."""
    files = [location] if location.is_file() else sorted(p for p in location.rglob("*") if p.is_file())
    if kind in ("gtsrb_csv", "gtsrb_official"):
        test_csv = gtsrb_test_csv(gtsrb_dirs(kind, location)[1], location)
        if test_csv is not None and location.resolve() not in test_csv.resolve().parents:
            files.append(test_csv)
    return files


def _source_key(kind: str, location: Path) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{kind}|{location.resolve()}".encode())
    for p in _source_files(kind, location):
        st = p.stat()
        name = p.relative_to(location) if location in p.parents else (p.name if p == location else p.resolve())
        h.update(f"|{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("BACKDOOR_CACHE_DIR", Path.home() / ".cache" / "backdoor-toolkit"))


def cache_root(cache_dir=None) -> Path:
    """``--cache_dir`` when given (``~`` expanded), else the default cache: where generated triggers,
    trained encoders and rebuilt backdoor sets are kept."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _decode(spec: DatasetSpec, kind: str, location: Path):
    if kind == "cifar_pickle":
        return read_cifar10_pickles(location)
    if kind in ("gtsrb_csv", "gtsrb_official"):
        return read_gtsrb(kind, location, spec.image_size)
    if kind == "tiny_official":
        return read_tiny(location, spec.image_size)
    numeric = spec.name == "gtsrb"  # GTSRB's class folders are class ids: 0..42 in numeric order
    if kind == "zip":
        return _decode_zip(location, spec.image_size, numeric)
    names = [str(p.relative_to(location)) for p in location.rglob("*") if p.is_file()]
    entries = split_entries(names)
    if entries is None:
        raise UserError(f"{location} does not hold train/<class>/ and test/<class>/ image folders")
    return read_image_tree(entries, lambda n: (location / n).read_bytes(), spec.image_size, str(location), numeric)


def _decode_zip(location: Path, size: int, numeric: bool):
    """The image tree in a ``.zip``, read member by member in memory (:func:`utils.archives.open_zip`)."""
    with open_zip(location) as (names, read_member):
        entries = split_entries(names)
        if entries is None:
            raise UserError(f"{location} does not hold one train/<class>/ and test/<class>/ image tree")
        return read_image_tree(entries, read_member, size, str(location), numeric, read_in_workers=False)


def _missing_pickles(spec: DatasetSpec, path: Path) -> None:
    """A CIFAR-10 pickle folder with some of its six batches is a damaged copy, not one to download over."""
    names = CIFAR10_TRAIN_BATCHES + ["test_batch"]
    for folder in (path, path / spec.name, path / "cifar-10-batches-py", path / spec.name / "cifar-10-batches-py"):
        missing = [n for n in names if not (folder / n).is_file()]
        if 0 < len(missing) < len(names):
            raise UserError(f"{folder} holds CIFAR-10 pickles but not {', '.join(missing)}; restore the file(s) from "
                            f"cifar-10-python.tar.gz, or remove {folder} to download CIFAR-10 again")


def _download_cifar10(path: Path) -> None:
    torchvision = import_vision()  # imported here: only the download needs it
    created = not path.exists()
    try:
        torchvision.datasets.CIFAR10(root=str(path), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - offline, DNS, disk: the user needs the same advice
        if created:
            shutil.rmtree(path, ignore_errors=True)  # leave no empty or half-downloaded folder behind
        where = path.resolve()
        raise UserError(f"CIFAR-10 is not at {where} and could not be downloaded ({type(e).__name__}); place "
                        f"cifar-10-batches-py/ (the python version of CIFAR-10) in {where}, or pass --dataset_path "
                        f"to a folder with cifar-10-batches-py/, a folder with train/<class>/ and test/<class>/ "
                        f"images, or a .zip of such a tree") from e


def load_dataset(name: str, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 download: bool = True) -> Dataset:
    """Read a dataset into uint8 tensors (decoding once, then from the cache)."""
    spec = get_spec(name)
    path = Path(path).expanduser()
    source = _find_source(spec, path)
    if source is None and spec.name == "cifar10":
        _missing_pickles(spec, path)
    if source is None and spec.name == "cifar10" and download and not path.is_file() and path.suffix != ".zip":
        _download_cifar10(path)
        source = _find_source(spec, path)
    if source is None:
        raise UserError(_layout_help(spec, path))
    kind, location = source

    cache_dir = cache_root(cache_dir)
    cache_file = cache_dir / f"{spec.name}-{_source_key(kind, location)}.safetensors"
    if cache_file.is_file():
        try:
            from safetensors import safe_open
            t = load_file(str(cache_file))
            with safe_open(str(cache_file), "pt") as f:
                meta = f.metadata()
            return Dataset(spec, ImageSet(t["x_train"], t["y_train"]), ImageSet(t["x_test"], t["y_test"]),
                           json.loads(meta["classes"]), meta["fingerprint"])
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt, never trusted
            pass

    x_train, y_train, x_test, y_test, classes = _decode(spec, kind, location)
    if len(classes) != spec.num_classes:
        raise UserError(f"{location} has {len(classes)} classes but {spec.name} has {spec.num_classes}; "
                        f"check --dataset and --dataset_path")
    tensors = {"x_train": torch.from_numpy(np.ascontiguousarray(x_train)), "y_train": torch.from_numpy(y_train),
               "x_test": torch.from_numpy(np.ascontiguousarray(x_test)), "y_test": torch.from_numpy(y_test)}
    fingerprint = tensor_fingerprint(*tensors.values())
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"classes": json.dumps(classes), "fingerprint": fingerprint})
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a second decode next time
    return Dataset(spec, ImageSet(tensors["x_train"], tensors["y_train"]),
                   ImageSet(tensors["x_test"], tensors["y_test"]), classes, fingerprint)
