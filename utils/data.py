"""Datasets as uint8 tensors, decoded once and cached; batches made and augmented on the device.

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
For CIFAR-10 a missing folder is filled by torchvision's download when the network allows.

Class indices follow the sorted class-folder names, which for CIFAR-10 is the standard order; GTSRB
classes are the numeric class ids, Tiny-ImageNet's the sorted wnids (BackdoorBench's ImageFolder).
Images are resized to the dataset's size with PIL bilinear interpolation, as torchvision's
``Resize`` on a PIL image does in BackdoorBench (GTSRB: the whole image, no ROI crop).
Decoded tensors go to a cache file (safetensors) under ``--cache_dir``; its key is the layout, the
source's path and its files' sizes and modification times, so an edited source is decoded again.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from utils.errors import UserError
from utils.progress import progress

CACHE_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


@dataclass(frozen=True)
class DatasetSpec:
    """What the code needs to know about a dataset; augmentation settings live in its prototype yaml."""
    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Normalisation constants are BackdoorBench's (utils/aggregate_block/dataset_and_transform_generate.py).
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "gtsrb": DatasetSpec("gtsrb", 43, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": DatasetSpec("tiny", 200, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


@dataclass
class ImageSet:
    """Images as uint8 ``[N, C, H, W]`` and labels as int64 ``[N]``, on any device."""
    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] and match the images")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class Dataset:
    spec: DatasetSpec
    train: ImageSet
    test: ImageSet
    classes: list[str]
    fingerprint: str = field(default="")


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A content hash of tensors (shape, dtype and bytes): names data independent of where it lives."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- reading sources

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR pickles hold only dicts, lists, bytes and numpy arrays; anything else is refused,
    so a tampered dataset file cannot run code when read."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
        raise UserError(f"{path} is not a readable CIFAR batch file ({e}); re-download the dataset") from e
    return data, labels


def _read_cifar10_pickles(folder: Path):
    xs, ys = zip(*(_read_cifar_batch(folder / b) for b in CIFAR10_TRAIN_BATCHES))
    x_test, y_test = _read_cifar_batch(folder / "test_batch")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = folder / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as f:
            classes = list(_NumpyOnlyUnpickler(f, encoding="latin1").load()["label_names"])
    return np.concatenate(xs), np.concatenate(ys), x_test, y_test, classes


def _decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot decode image {where} ({e}); remove or replace the file") from e


def _split_entries(names: list[str]):
    """Map (split, class) -> sorted entry names for paths ``[prefix/]{train,test}/<class>/<file>``."""
    pattern = re.compile(r"^(?P<prefix>(?:.*/)?)(?P<split>train|test)/(?P<cls>[^/]+)/(?P<file>[^/]+)$")
    found: dict[str, dict[tuple[str, str], list[str]]] = {}
    for name in names:
        m = pattern.match(name.replace(os.sep, "/"))
        if m and m["file"].lower().endswith(IMAGE_EXTENSIONS):
            found.setdefault(m["prefix"], {}).setdefault((m["split"], m["cls"]), []).append(name)
    roots = [p for p, d in found.items() if {s for s, _ in d} == {"train", "test"}]
    if len(roots) != 1:
        return None
    return found[roots[0]]


def _decode_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


DECODE_CHUNK = 256  # images per decoding task


def _read_source_bytes(read_bytes, name, where: str) -> bytes:
    try:
        return read_bytes(name)
    except (OSError, KeyError) as e:
        raise UserError(f"cannot read {where} ({e}); check that the file is there and readable") from e


def _decode_checked(data: bytes, size: int, where: str, exact_for: str | None) -> np.ndarray:
    """:func:`_decode_image`, or, when ``exact_for`` names a dataset whose images all have the size
    already, the image as it is, refusing any other size."""
    if exact_for is None:
        return _decode_image(data, size, where)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (size, size):
                raise UserError(f"image {where} is {img.size[0]}x{img.size[1]}, but {exact_for} images are all "
                                f"{size}x{size}; replace it with the original file")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot decode image {where} ({e}); remove or replace the file") from e


def _decode_all(items: list, read_bytes, size: int, desc: str, exact_for: str | None = None,
                read_in_workers: bool = True) -> np.ndarray:
    """Decode ``items`` (``(name, where)``: ``read_bytes(name)`` gives the file, ``where`` names it in
    errors) into uint8 ``[N, 3, size, size]``, in order. Chunks are decoded on a few threads (Pillow
    releases the GIL while it decodes and resizes); a failure raises one image's :class:`UserError`
    (the first failing one in order when the workers read the files). ``read_in_workers=False`` reads
    on the calling thread instead (a ``ZipFile`` is one shared handle)."""
    n = len(items)
    images = np.empty((n, 3, size, size), dtype=np.uint8)

    def decode_range(lo: int, hi: int, blobs) -> int:
        for i in range(lo, hi):
            name, where = items[i]
            data = blobs[i - lo] if blobs is not None else _read_source_bytes(read_bytes, name, where)
            images[i] = _decode_checked(data, size, where, exact_for)
        return hi - lo

    chunks = [(lo, min(lo + DECODE_CHUNK, n)) for lo in range(0, n, DECODE_CHUNK)]
    workers = _decode_workers()
    with progress(total=n, desc=desc, leave=False, mininterval=1.0, unit="img") as bar:
        if workers == 1 or len(chunks) <= 1:
            for lo, hi in chunks:
                bar.update(decode_range(lo, hi, None))
            return images
        pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        pending: deque = deque()
        try:
            for lo, hi in chunks:
                blobs = None if read_in_workers else \
                    [_read_source_bytes(read_bytes, *items[i]) for i in range(lo, hi)]
                pending.append(pool.submit(decode_range, lo, hi, blobs))
                while len(pending) >= 2 * workers:  # a bounded window: memory stays small for read-ahead
                    bar.update(pending.popleft().result())
            while pending:
                bar.update(pending.popleft().result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return images


def _class_order(names, numeric: bool) -> list[str]:
    """Sorted class names; by number when ``numeric`` and every name is one (GTSRB's class ids)."""
    names = set(names)
    if numeric and all(n.isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _read_image_tree(entries: dict, read_bytes, size: int, desc: str, numeric_classes: bool = False,
                     read_in_workers: bool = True):
    classes = _class_order({c for _, c in entries}, numeric_classes)
    if sorted({c for s, c in entries if s == "test"}) != sorted(classes) or \
            sorted({c for s, c in entries if s == "train"}) != sorted(classes):
        raise UserError(f"{desc}: train/ and test/ must hold the same class folders")
    out = []
    for split in ("train", "test"):
        items = [(name, k) for k, c in enumerate(classes) for name in sorted(entries[(split, c)])]
        images = _decode_all([(name, f"{name} in {desc}") for name, _ in items], read_bytes, size,
                             f"decode {split}", read_in_workers=read_in_workers)
        out += [images, np.array([k for _, k in items], dtype=np.int64)]
    return (*out, classes)


def _names(folder: Path) -> set[str]:
    """The entries of ``folder`` as spelled on disk (exact case, also on case-insensitive systems)."""
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _has_dir(folder: Path, name: str) -> bool:
    return name in _names(folder) and (folder / name).is_dir()


def _is_image_name(name: str) -> bool:
    """An image file name, not a hidden one (macOS leaves ``._<name>`` files in extracted archives)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _image_files(folder: Path) -> list[str]:
    return sorted(n for n in _names(folder) if _is_image_name(n) and (folder / n).is_file())


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


# GTSRB: 43 classes; CSVs are ``;``-separated: Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId.
GTSRB_CLASSES = 43
GTSRB_TEST_CSV = "GT-final_test.csv"


def _gtsrb_test_csv(test_images: Path, root: Path) -> Path | None:
    """The test labels: ``GT-final_test.csv`` beside the test images, one level up, or (official
    archives extracted side by side) beside or above the ``GTSRB`` folder."""
    for folder in dict.fromkeys([test_images, test_images.parent, root, root.parent]):
        if GTSRB_TEST_CSV in _names(folder) and (folder / GTSRB_TEST_CSV).is_file():
            return folder / GTSRB_TEST_CSV
    return None


def _gtsrb_dirs(kind: str, location: Path) -> tuple[Path, Path]:
    if kind == "gtsrb_csv":  # BackdoorBench: <root>/Train/<class>/ and <root>/Test/
        return location / "Train", location / "Test"
    return location / "Final_Training" / "Images", location / "Final_Test" / "Images"


def _read_gtsrb_csv(path: Path) -> list[tuple[str, int]]:
    """(Filename, ClassId) rows of a GTSRB annotation file, in its order."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); restore it from the GTSRB archive") from e
    reader = csv.reader(io.StringIO(text), delimiter=";")
    header = next(reader, None)
    header = [h.strip() for h in header] if header else []
    if "Filename" not in header or "ClassId" not in header:
        raise UserError(f"{path} has no Filename and ClassId columns; GTSRB annotations are ;-separated with the "
                        f"header Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId (the test labels are "
                        f"GT-final_test.csv from GTSRB_Final_Test_GT.zip, not GT-final_test.test.csv)")
    fi, ci = header.index("Filename"), header.index("ClassId")
    rows, seen = [], set()
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        try:
            name, class_id = row[fi].strip(), int(row[ci])
        except (IndexError, ValueError):
            raise UserError(f"{path} line {reader.line_num}: {';'.join(row)!r} is not a Filename;...;ClassId row; "
                            f"fix or remove the line") from None
        if not 0 <= class_id < GTSRB_CLASSES:
            raise UserError(f"{path} line {reader.line_num}: ClassId {class_id} is not a GTSRB class "
                            f"(0..{GTSRB_CLASSES - 1}); fix the line")
        if not _plain_name(name) or name in seen:
            raise UserError(f"{path} line {reader.line_num}: {name!r} is not a file name listed once; fix the line")
        seen.add(name)
        rows.append((name, class_id))
    return rows


def _check_listed(folder: Path, listed: list[str], annotations: Path) -> None:
    """Every listed image is in ``folder`` and every image in ``folder`` is listed."""
    present = set(_image_files(folder))
    for name in listed:
        if name not in present:
            raise UserError(f"{annotations} lists {name}, which is not an image in {folder}; restore the image or "
                            f"remove its line")
    listed_set = set(listed)
    for name in sorted(present):
        if name not in listed_set:
            raise UserError(f"{folder / name} is not listed in {annotations}; remove the image or add its line")


def _read_gtsrb(kind: str, location: Path, size: int):
    """GTSRB as BackdoorBench reads it: for each class id 0..42 the rows of ``GT-<class>.csv`` in its
    order, then the rows of ``GT-final_test.csv``; labels are the CSVs' ClassId; every image resized
    whole to ``size`` (bilinear), the ROI columns unused."""
    train_dir, test_dir = _gtsrb_dirs(kind, location)
    archive = "GTSRB_Final_Training_Images.zip"
    if not train_dir.is_dir():
        raise UserError(f"{train_dir} is missing; it must hold GTSRB's class folders 00000..00042 ({archive})")
    expected = [f"{c:05d}" for c in range(GTSRB_CLASSES)]
    for name in sorted(_names(train_dir)):
        if (train_dir / name).is_dir() and name not in expected and not name.startswith("."):
            raise UserError(f"{train_dir / name} is not a GTSRB class folder (00000..00042); remove or rename it")
    train = []
    for c, name in enumerate(expected):
        folder = train_dir / name
        if not _has_dir(train_dir, name):
            raise UserError(f"{folder} is missing; GTSRB's training images need all 43 class folders 00000..00042 "
                            f"({archive})")
        annotations = folder / f"GT-{name}.csv"
        if not annotations.is_file():
            raise UserError(f"{annotations} is missing; each GTSRB class folder needs its GT-<class>.csv ({archive})")
        rows = _read_gtsrb_csv(annotations)
        for file, class_id in rows:
            if class_id != c:
                raise UserError(f"{annotations}: {file} has ClassId {class_id} in the folder of class {c}; fix the "
                                f"line or move the image")
        _check_listed(folder, [f for f, _ in rows], annotations)
        train += [(folder / f, k) for f, k in rows]
    if not test_dir.is_dir():
        raise UserError(f"{test_dir} is missing; it must hold GTSRB's test images (GTSRB_Final_Test_Images.zip) and "
                        f"{GTSRB_TEST_CSV}")
    test_csv = _gtsrb_test_csv(test_dir, location)
    if test_csv is None:
        raise UserError(f"{GTSRB_TEST_CSV} (the test labels, from GTSRB_Final_Test_GT.zip) is not in {test_dir} or one "
                        f"level up; place it there")
    rows = _read_gtsrb_csv(test_csv)
    _check_listed(test_dir, [f for f, _ in rows], test_csv)
    test = [(test_dir / f, k) for f, k in rows]
    out = []
    for split, items in (("train", train), ("test", test)):
        images = _decode_all([(p, str(p)) for p, _ in items], Path.read_bytes, size, f"decode {split}")
        out += [images, np.array([k for _, k in items], dtype=np.int64)]
    return (*out, expected)


# Tiny-ImageNet: 200 classes (wnids), 64x64 images; the labelled validation set is the test set.
TINY_ANNOTATIONS = "val_annotations.txt"


def _read_tiny(location: Path, size: int):
    """``tiny-imagenet-200/`` as BackdoorBench reads it, torchvision ``ImageFolder`` on ``train/`` and
    on ``val/`` sorted into class folders: classes are the **sorted** wnids (ImageFolder's order, not
    ``wnids.txt``'s), images by class, then by folder and file name. ``val/images/`` with
    ``val_annotations.txt`` gives the same order. Every image must be 64x64, as in the archive."""
    train_dir, val_dir = location / "train", location / "val"
    if not train_dir.is_dir():
        raise UserError(f"{train_dir} is missing; Tiny-ImageNet needs train/<wnid>/images/ (tiny-imagenet-200.zip)")
    folders = sorted(n for n in _names(train_dir) if (train_dir / n).is_dir() and not n.startswith("."))
    wnids_file = location / "wnids.txt"
    if wnids_file.is_file():
        try:
            wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {wnids_file} ({e}); restore it from tiny-imagenet-200.zip") from e
        if len(set(wnids)) != len(wnids):
            raise UserError(f"{wnids_file} lists a wnid twice; restore it from tiny-imagenet-200.zip")
        for w in wnids:
            if w not in folders:
                raise UserError(f"{train_dir / w} is missing: {wnids_file} lists {w}; restore its training images")
        for f in folders:
            if f not in wnids:
                raise UserError(f"{train_dir / f} is not a class listed in {wnids_file}; remove it or list it")
    else:
        wnids = folders
    classes = sorted(wnids)  # BackdoorBench's ImageFolder sorts the class folders
    index = {w: k for k, w in enumerate(classes)}

    train = []
    for k, w in enumerate(classes):
        files = sorted((str(p.parent), p.name) for p in (train_dir / w).rglob("*")
                       if _is_image_name(p.name) and p.is_file())
        if not files:
            raise UserError(f"{train_dir / w} holds no images; restore train/{w}/images/ from tiny-imagenet-200.zip")
        train += [(Path(parent) / name, k) for parent, name in files]

    if not val_dir.is_dir():
        raise UserError(f"{val_dir} is missing; Tiny-ImageNet's test set is val/images/ with val/{TINY_ANNOTATIONS} "
                        f"(tiny-imagenet-200.zip)")
    annotations = val_dir / TINY_ANNOTATIONS
    test = []
    if annotations.is_file():
        images_dir = val_dir / "images"
        try:
            lines = annotations.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {annotations} ({e}); restore it from tiny-imagenet-200.zip") from e
        listed = {}
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise UserError(f"{annotations} line {lineno}: {line!r} is not 'file<TAB>wnid<TAB>box...'; "
                                f"fix the line")
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise UserError(f"{annotations} line {lineno}: {wnid} is not one of the {len(classes)} classes "
                                f"(wnids.txt, train/); fix the line")
            if not _plain_name(name) or name in listed:
                raise UserError(f"{annotations} line {lineno}: {name!r} is not a file name listed once; fix the line")
            listed[name] = index[wnid]
        _check_listed(images_dir, list(listed), annotations)
        test = [(images_dir / name, k) for name, k in listed.items()]
    else:
        subfolders = sorted(n for n in _names(val_dir) if (val_dir / n).is_dir() and not n.startswith("."))
        if not subfolders or subfolders == ["images"]:
            raise UserError(f"{annotations} is missing; restore it from tiny-imagenet-200.zip (or sort val/ into "
                            f"val/<wnid>/ folders)")
        for w in subfolders:
            if w not in index:
                raise UserError(f"{val_dir / w} is not one of the {len(classes)} classes (wnids.txt, train/); "
                                f"remove or rename it")
            test += [(val_dir / w / name, index[w]) for name in _image_files(val_dir / w)]
    test.sort(key=lambda item: (item[1], item[0].name))
    out = []
    for split, items in (("train", train), ("test", test)):
        images = _decode_all([(p, str(p)) for p, _ in items], Path.read_bytes, size, f"decode {split}",
                             exact_for="Tiny-ImageNet")
        out += [images, np.array([k for _, k in items], dtype=np.int64)]
    return (*out, classes)


def _find_source(spec: DatasetSpec, path: Path):
    """Return (kind, location) for the first accepted layout under ``path``, or None."""
    if path.is_file():
        return ("zip", path) if zipfile.is_zipfile(path) else None
    if not path.is_dir():
        return None
    for folder in (path, path / spec.name):
        if spec.name == "cifar10":
            for pickles in (folder, folder / "cifar-10-batches-py"):
                if all((pickles / b).is_file() for b in CIFAR10_TRAIN_BATCHES + ["test_batch"]):
                    return "cifar_pickle", pickles
        if spec.name == "gtsrb":
            if _has_dir(folder, "Train"):
                return "gtsrb_csv", folder
            for root in (folder / "GTSRB", folder):
                if _has_dir(root, "Final_Training"):
                    return "gtsrb_official", root
        if spec.name == "tiny":
            for root in (folder / "tiny-imagenet-200", folder):
                if _has_dir(root, "train") and (_has_dir(root, "val") or (root / "wnids.txt").is_file()):
                    return "tiny_official", root
        if _has_dir(folder, "train") and _has_dir(folder, "test"):
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
        test_csv = _gtsrb_test_csv(_gtsrb_dirs(kind, location)[1], location)
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
        return _read_cifar10_pickles(location)
    if kind in ("gtsrb_csv", "gtsrb_official"):
        return _read_gtsrb(kind, location, spec.image_size)
    if kind == "tiny_official":
        return _read_tiny(location, spec.image_size)
    numeric = spec.name == "gtsrb"  # GTSRB's class folders are class ids: 0..42 in numeric order
    if kind == "zip":
        with zipfile.ZipFile(location) as zf:
            entries = _split_entries([n for n in zf.namelist() if not n.endswith("/")])
            if entries is None:
                raise UserError(f"{location} does not hold one train/<class>/ and test/<class>/ image tree")
            return _read_image_tree(entries, zf.read, spec.image_size, str(location), numeric, read_in_workers=False)
    names = [str(p.relative_to(location)) for p in location.rglob("*") if p.is_file()]
    entries = _split_entries(names)
    if entries is None:
        raise UserError(f"{location} does not hold train/<class>/ and test/<class>/ image folders")
    return _read_image_tree(entries, lambda n: (location / n).read_bytes(), spec.image_size, str(location), numeric)


def _download_cifar10(path: Path) -> None:
    import torchvision  # imported here: only the download needs it
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


# ----------------------------------------------------------------------------- batches on the device

class Normalizer:
    """uint8 ``[N,C,H,W]`` -> normalised float, on the tensor's device."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() - self.mean) / self.std


def random_crop_flip(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding)`` (zero fill) and ``RandomHorizontalFlip`` on uint8 images."""
    n, _, h, w = images.shape
    dev = images.device
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        images = padded[torch.arange(n, device=dev)[:, None, None, None],
                        torch.arange(images.shape[1], device=dev)[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


def random_rotation(images: torch.Tensor, degrees: float, p: float, generator: torch.Generator,
                    fill: float = 0.0) -> torch.Tensor:
    """Batched ``RandomApply([RandomRotation(degrees)], p)`` as torchvision does it on tensors, one
    draw per image: an angle uniform in [-degrees, degrees] about the centre, nearest-neighbour
    sampling, ``fill`` outside. Float images out."""
    n, dev = images.shape[0], images.device
    apply = torch.rand(n, device=dev, generator=generator) < p
    angle = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * degrees * math.pi / 180
    angle = torch.where(apply, angle, torch.zeros_like(angle))
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    x = images.float() - fill  # zero padding of grid_sample is then the fill value
    return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False) + fill


# A per-batch hook of training-controlled attacks: (uint8 images [B,C,H,W], labels [B], the epoch's
# generator) -> (images as uint8 or float on the 0..255 scale, labels), before normalisation.
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class BatchLoader:
    """Shuffled, augmented, normalised batches from a GPU- (or CPU-) resident uint8 ImageSet.

    The order and augmentation of epoch ``e`` depend only on ``(seed, e)``, so a resumed run
    sees exactly the batches an uninterrupted one would. ``batch_hook`` (training-controlled
    attacks) replaces the default crop/flip: it gets each raw batch and the same generator.
    ``num_batches`` switches to sampling with replacement: that many batches per epoch, each
    drawn uniformly from all images (PyTorch's ``RandomSampler(replacement=True)``; ANP).
    """

    def __init__(self, data: ImageSet, batch_size: int, normalizer: Normalizer, *, device, shuffle: bool = True,
                 crop_padding: int = 0, hflip: bool = False, drop_last: bool = False, seed: int = 0,
                 channels_last: bool = True, batch_hook: BatchHook | None = None, num_batches: int | None = None):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.normalizer, self.device = batch_size, normalizer, torch.device(device)
        self.shuffle, self.crop_padding, self.hflip, self.drop_last = shuffle, crop_padding, hflip, drop_last
        self.seed, self.channels_last, self.epoch = seed, channels_last, 0
        self.batch_hook = batch_hook
        self.num_batches = num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, device=self.device, generator=gen) if self.shuffle else \
            torch.arange(n, device=self.device)
        for b in range(len(self)):
            if self.num_batches is not None:
                idx = torch.randint(0, n, (self.batch_size,), device=self.device, generator=gen)
            else:
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.transform(idx, self.images[idx], self.labels[idx], gen)
            x = self.normalizer(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


    def transform(self, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        """A raw batch (the images at positions ``idx``) to training images on the 0..255 scale and
        labels: the attack's batch hook, or crop and flip. A subclass adds per-sample steps (PDB's
        defensive samples) and calls this."""
        if self.batch_hook is not None:
            return self.batch_hook(x, y, gen)
        if self.crop_padding or self.hflip:
            x = random_crop_flip(x, self.crop_padding, self.hflip, gen)
        return x, y


class FixedBatches:
    """Batches made once (already augmented and normalised) and replayed in the same order every
    epoch: i-BAU's cached pass. Has the loader interface ``fit`` uses."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)
