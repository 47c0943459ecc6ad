"""The generic on-disk readers behind ``--dataset_path``: CIFAR-10's pickles (plain data only),
image-folder trees in a folder or a ``.zip`` (decoded in parallel, checked, the progress logged) and
plain ``.npy`` arrays; GTSRB's and Tiny-ImageNet's layouts build on them (:mod:`utils.layouts`)."""
from __future__ import annotations

import io
import os
import pickle
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.logs import run_logger
from utils.progress import progress


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _latin1_bytes(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as pickle protocols 0-2 use it to spell ``bytes``: latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused global _codecs.encode (only latin-1 bytes are plain data)")
    return text.encode("latin1", errors)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR pickles hold only dicts, lists, bytes and numpy arrays, in any pickle protocol; every
    other global is refused before anything is called, so a tampered dataset file cannot run code."""
    _NUMPY = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
    _BUILTINS = {"bytes", "bytearray", "set", "frozenset"}  # protocols 0-3 spell these as globals

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return super().find_class("builtins", name)
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return super().find_class(module, name)
        package, _, sub = module.rpartition(".")
        if package in ("numpy.core", "numpy._core") and (sub, name) in self._NUMPY:
            core = "numpy._core" if hasattr(np, "_core") else "numpy.core"  # numpy 1 or 2 wrote it
            return super().find_class(f"{core}.{sub}", name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: it could run code when read")


def _load_plain_pickle(path: Path, what: str, advice: str):
    """The plain data in a pickle file, as a dict with ``str`` keys; one line naming the file otherwise."""
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{path} is not a readable {what} (it is empty, 0 bytes); {advice}")
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, damaged, refused: the same advice
        detail = str(e) if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{path} is not a readable {what} ({detail}); {advice}") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a readable {what} (it holds a {type(d).__name__}, not a dict); {advice}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    what, advice = "CIFAR batch file", "re-download the dataset"
    d = _load_plain_pickle(path, what, advice)
    data, labels = d.get("data"), d.get("labels", d.get("fine_labels"))
    if data is None or labels is None:
        raise UserError(f"{path} is not a readable {what} (it has no 'data' and 'labels' entries); {advice}")
    try:
        data, labels = np.asarray(data), np.asarray(labels)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a readable {what} ({type(e).__name__}: {e}); {advice}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise UserError(f"{path} holds {data.dtype} data of shape {'x'.join(map(str, data.shape))}; a {what} holds "
                        f"uint8 N x 3072 rows (32x32 RGB images); {advice}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or \
            (len(labels) and not 0 <= labels.min() <= labels.max() < num_classes):
        raise UserError(f"{path} holds {len(data)} images but labels {labels.dtype} of shape "
                        f"{'x'.join(map(str, labels.shape))}; a {what} has one class 0..{num_classes - 1} per image; "
                        f"{advice}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar10_pickles(folder: Path):
    xs, ys = zip(*(_read_cifar_batch(folder / b, 10) for b in CIFAR10_TRAIN_BATCHES))
    x_test, y_test = _read_cifar_batch(folder / "test_batch", 10)
    classes = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.exists():
        advice = "re-download the dataset, or remove the file to use CIFAR-10's class names"
        names = _load_plain_pickle(meta, "CIFAR label-names file", advice).get("label_names")
        names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names] \
            if isinstance(names, (list, tuple)) else None
        if names is None or len(names) != 10 or not all(isinstance(n, str) for n in names):
            raise UserError(f"{meta} does not hold CIFAR-10's 10 class names under 'label_names'; {advice}")
        classes = names
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


def _decode_checked(data: bytes, size: int, where: str, exact_for: str | None,
                    advice: str = "replace it with the original file") -> np.ndarray:
    """:func:`_decode_image`, or, when ``exact_for`` names a dataset whose images all have the size
    already, the image as it is, refusing any other size (the line ends in ``advice``)."""
    if exact_for is None:
        return _decode_image(data, size, where)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (size, size):
                raise UserError(f"image {where} is {img.size[0]}x{img.size[1]}, but {exact_for} images are all "
                                f"{size}x{size}; {advice}")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot decode image {where} ({e}); remove or replace the file") from e


PROGRESS_LOG_S = 2.0  # at most one progress line per this many seconds, besides the first and the last


class _DecodeProgress:
    """The progress of one decode: the tqdm bar on a terminal; in the run's log a line at the start and
    one at the end (with the time), and, where no bar shows it (stderr redirected), a line at each
    further tenth of the images, at most one per :data:`PROGRESS_LOG_S` seconds."""

    def __init__(self, n: int, split: str, source: str):
        self.n, self.what, self.done, self.mark = n, f"{split} images of {source}", 0, 1
        self.log = run_logger()
        self.bar = progress(total=n, desc=f"decode {split}", leave=False, mininterval=1.0, unit="img")
        self.start = self.last = time.monotonic()
        self.log.info("decoding %d %s once into the cache ...", n, self.what)

    def update(self, k: int) -> None:
        self.bar.update(k)
        self.done += k
        now, tenth = time.monotonic(), self.done * 10 // max(self.n, 1)
        if self.bar.disable and tenth >= self.mark and self.done < self.n and now - self.last >= PROGRESS_LOG_S:
            self.log.info("decoding %s: %d/%d (%d%%), %.0f s so far", self.what, self.done, self.n,
                          100 * self.done // self.n, now - self.start)
            self.mark, self.last = tenth + 1, now

    def close(self, finished: bool) -> None:
        self.bar.close()
        if finished:
            self.log.info("decoded %d %s in %.1f s", self.n, self.what, time.monotonic() - self.start)


def decode_all(items: list, read_bytes, size: int, split: str, source: str, exact_for: str | None = None,
               read_in_workers: bool = True, advice: str = "replace it with the original file") -> np.ndarray:
    """Decode ``items`` (``(name, where)``: ``read_bytes(name)`` gives the file, ``where`` names it in
    errors), the ``split`` images of ``source``, into uint8 ``[N, 3, size, size]``, in order. Chunks
    are decoded on a few threads (Pillow releases the GIL while it decodes and resizes); a failure
    raises one image's :class:`UserError` (the first failing one in order when the workers read the
    files). ``read_in_workers=False`` reads on the calling thread instead (a ``ZipFile`` is one
    shared handle). The progress is shown and logged (:class:`_DecodeProgress`)."""
    n = len(items)
    images = np.empty((n, 3, size, size), dtype=np.uint8)

    def decode_range(lo: int, hi: int, blobs) -> int:
        for i in range(lo, hi):
            name, where = items[i]
            data = blobs[i - lo] if blobs is not None else _read_source_bytes(read_bytes, name, where)
            images[i] = _decode_checked(data, size, where, exact_for, advice)
        return hi - lo

    chunks = [(lo, min(lo + DECODE_CHUNK, n)) for lo in range(0, n, DECODE_CHUNK)]
    workers = _decode_workers()
    bar, finished = _DecodeProgress(n, split, source), False
    try:
        if workers == 1 or len(chunks) <= 1:
            for lo, hi in chunks:
                bar.update(decode_range(lo, hi, None))
            finished = True
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
        finished = True
        return images
    finally:
        bar.close(finished)


def _class_order(names, numeric: bool) -> list[str]:
    """Sorted class names; by number when ``numeric`` and every name is one (GTSRB's class ids)."""
    names = set(names)
    if numeric and all(n.isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def read_image_tree(entries: dict, read_bytes, size: int, desc: str, numeric_classes: bool = False,
                     read_in_workers: bool = True):
    classes = _class_order({c for _, c in entries}, numeric_classes)
    for split, other in (("train", "test"), ("test", "train")):
        lacking = [c for c in classes if (split, c) not in entries]
        if lacking:
            raise UserError(f"{desc}: {split}/{lacking[0]}/ holds no images but {other}/{lacking[0]}/ does; train/ "
                            f"and test/ must hold the same class folders, each with images")
    out = []
    for split in ("train", "test"):
        items = [(name, k) for k, c in enumerate(classes) for name in sorted(entries[(split, c)])]
        images = decode_all([(name, f"{name} in {desc}") for name, _ in items], read_bytes, size, split, desc,
                            read_in_workers=read_in_workers)
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


NPY_MAGIC = b"\x93NUMPY"


def read_npy(path: Path, name: str, advice: str, mmap: bool = False) -> np.ndarray:
    """A plain ``.npy`` array (memory-mapped read-only when ``mmap``): one line naming the file as
    ``name`` ("--flag <path>", "trigger file <path>") and ending in ``advice`` when it cannot be read,
    is empty, is no ``.npy`` file, is cut short or holds pickled objects (refused, never loaded)."""
    header = None
    try:
        with open(path, "rb") as f:
            size, magic = os.fstat(f.fileno()).st_size, f.read(len(NPY_MAGIC))
            try:  # shape and dtype, to tell a file cut short from a damaged one
                f.seek(0)
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                header = (read(f), f.tell()) if read and magic == NPY_MAGIC else None
            except Exception:  # noqa: BLE001 - a damaged header: np.load below says what is wrong
                pass
    except OSError as e:
        raise UserError(f"cannot read {name} ({e.strerror or e}); {advice}") from None
    if size == 0:
        raise UserError(f"{name} is empty (0 bytes); {advice}")
    if magic != NPY_MAGIC:
        raise UserError(f"{name} is not a .npy file (no NumPy header); {advice}")
    refused = UserError(f"refused {name}: it holds pickled Python objects, which could run code when loaded; {advice}")
    if header is not None:
        (shape, _, dtype), offset = header
        if dtype.hasobject:
            raise refused
        want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size < want:
            raise UserError(f"{name} is truncated: {size} of the {want} bytes its header announces; the file is "
                            f"damaged (copy or save it again)")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Python objects" in str(e):
            raise refused from None
        raise UserError(f"cannot read {name} ({e}); the file is damaged") from None
    except Exception as e:  # noqa: BLE001 - a damaged file: the same advice
        raise UserError(f"cannot read {name} ({type(e).__name__}: {e}); the file is damaged") from None
