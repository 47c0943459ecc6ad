"""The generic on-disk readers behind ``--dataset_path``: CIFAR-10's pickles (plain data only) and
image-folder trees in a folder or a ``.zip`` (decoded in parallel, checked); GTSRB's and
Tiny-ImageNet's layouts build on them (:mod:`utils.layouts`)."""
from __future__ import annotations

import io
import os
import pickle
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.progress import progress


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


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


def read_cifar10_pickles(folder: Path):
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


def split_entries(names: list[str]):
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


def decode_all(items: list, read_bytes, size: int, desc: str, exact_for: str | None = None,
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


def read_image_tree(entries: dict, read_bytes, size: int, desc: str, numeric_classes: bool = False,
                     read_in_workers: bool = True):
    classes = _class_order({c for _, c in entries}, numeric_classes)
    if sorted({c for s, c in entries if s == "test"}) != sorted(classes) or \
            sorted({c for s, c in entries if s == "train"}) != sorted(classes):
        raise UserError(f"{desc}: train/ and test/ must hold the same class folders")
    out = []
    for split in ("train", "test"):
        items = [(name, k) for k, c in enumerate(classes) for name in sorted(entries[(split, c)])]
        images = decode_all([(name, f"{name} in {desc}") for name, _ in items], read_bytes, size,
                             f"decode {split}", read_in_workers=read_in_workers)
        out += [images, np.array([k for _, k in items], dtype=np.int64)]
    return (*out, classes)


def folder_entries(folder: Path) -> set[str]:
    """The entries of ``folder`` as spelled on disk (exact case, also on case-insensitive systems)."""
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def has_dir(folder: Path, name: str) -> bool:
    return name in folder_entries(folder) and (folder / name).is_dir()


def is_image_name(name: str) -> bool:
    """An image file name, not a hidden one (macOS leaves ``._<name>`` files in extracted archives)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def image_files(folder: Path) -> list[str]:
    return sorted(n for n in folder_entries(folder) if is_image_name(n) and (folder / n).is_file())


def plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


