"""Datasets as uint8 tensors, decoded once and cached; batches made and augmented on the device.

Accepted sources for ``--dataset_path`` (checked in this order):
  * a ``.zip`` of an image-folder tree ``[<prefix>/]{train,test}/<class>/<image>``;
  * a folder holding the torchvision CIFAR-10 pickles (``data_batch_1`` .. ``test_batch``),
    directly or in ``cifar-10-batches-py/`` (optionally under ``<dataset>/``, BackdoorBench's layout);
  * a folder holding an image-folder tree ``{train,test}/<class>/<image>`` (optionally under ``<dataset>/``).
For CIFAR-10 a missing folder is filled by torchvision's download when the network allows.

Class indices follow the sorted class-folder names, which for CIFAR-10 is the standard order.
Decoded tensors go to a cache file (safetensors) under ``--cache_dir``; its key is the source's
path, sizes and modification times, so an edited source is decoded again.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import zipfile
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


def _read_image_tree(entries: dict, read_bytes, size: int, desc: str):
    classes = sorted({c for _, c in entries})
    if sorted({c for s, c in entries if s == "test"}) != classes or \
            sorted({c for s, c in entries if s == "train"}) != classes:
        raise UserError(f"{desc}: train/ and test/ must hold the same class folders")
    out = []
    for split in ("train", "test"):
        items = [(name, k) for k, c in enumerate(classes) for name in sorted(entries[(split, c)])]
        images = np.empty((len(items), 3, size, size), dtype=np.uint8)
        for i, (name, _) in enumerate(progress(items, desc=f"decode {split}", leave=False, mininterval=1.0)):
            images[i] = _decode_image(read_bytes(name), size, f"{name} in {desc}")
        out += [images, np.array([k for _, k in items], dtype=np.int64)]
    return (*out, classes)


def _find_source(spec: DatasetSpec, path: Path):
    """Return (kind, location) for the first accepted layout under ``path``, or None."""
    if path.is_file():
        return ("zip", path) if zipfile.is_zipfile(path) else None
    if not path.is_dir():
        return None
    for folder in (path, path / spec.name):
        for pickles in (folder, folder / "cifar-10-batches-py"):
            if spec.name == "cifar10" and all((pickles / b).is_file() for b in CIFAR10_TRAIN_BATCHES + ["test_batch"]):
                return "cifar_pickle", pickles
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return "folder", folder
    return None


def _layout_help(spec: DatasetSpec, path: Path) -> str:
    return (f"no {spec.name} data found at {path.resolve()}; give --dataset_path as one of: (1) a folder holding "
            f"the CIFAR-10 pickles, cifar-10-batches-py/data_batch_1..5 and test_batch; (2) a folder holding "
            f"train/<class>/ and test/<class>/ image folders; (3) a .zip of such a tree")


def _source_key(kind: str, location: Path) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{kind}|{location.resolve()}".encode())
    files = [location] if location.is_file() else sorted(p for p in location.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"|{p.relative_to(location) if p != location else p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("BACKDOOR_CACHE_DIR", Path.home() / ".cache" / "backdoor-toolkit"))


def _decode(spec: DatasetSpec, kind: str, location: Path):
    if kind == "cifar_pickle":
        return _read_cifar10_pickles(location)
    if kind == "zip":
        with zipfile.ZipFile(location) as zf:
            entries = _split_entries([n for n in zf.namelist() if not n.endswith("/")])
            if entries is None:
                raise UserError(f"{location} does not hold one train/<class>/ and test/<class>/ image tree")
            return _read_image_tree(entries, zf.read, spec.image_size, str(location))
    names = [str(p.relative_to(location)) for p in location.rglob("*") if p.is_file()]
    entries = _split_entries(names)
    if entries is None:
        raise UserError(f"{location} does not hold train/<class>/ and test/<class>/ image folders")
    return _read_image_tree(entries, lambda n: (location / n).read_bytes(), spec.image_size, str(location))


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

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
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
