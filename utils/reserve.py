"""The defender's clean data from another labelled set (``--reserve_dataset_path``; the D3 paper's Table 4,
reserved data drawn from a generated source instead of a share of the training set).

The set is a folder or a ``.zip`` of ``[<prefix>/]<class>/<image>``: one folder per class, named as the
record's classes (``airplane``, ...) or by class index (``0`` .. ``K-1``), the images at the record's
image size (a set of another size is refused, not resized: a defense on resampled data measures
something else). It is read whole, before anything is written; its content fingerprint (images,
labels, class names) becomes the setting ``reserve_fingerprint`` of the defense run, so a resumed run
refuses another set and the tables never average runs on different sets. None of its images may be
one of the record's test images: a defense sees neither test set.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.archives import open_zip
from utils.datasets import DatasetSpec, ImageSet, tensor_fingerprint
from utils.errors import UserError
from utils.readers import decode_all, is_image_name

FLAG = "--reserve_dataset_path"
LAYOUT = "a folder or .zip of <class>/<image>, one folder per class"


@dataclass
class ReserveSource:
    """The images of a reserve set with the name of the class folder each came from."""
    path: str
    images: torch.Tensor          # uint8 [N, C, H, W], ordered by class folder, then file name
    folders: list[str]            # the class folder names, sorted
    folder_index: torch.Tensor    # int64 [N]: each image's position in ``folders``
    fingerprint: str


def _class_tree(names: list[str], path: Path) -> dict[str, list[str]]:
    """Class folder -> its image files, for paths ``[prefix/]<class>/<file>`` with one prefix."""
    tree: dict[str, list[str]] = {}
    roots: set[str] = set()
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if not is_image_name(parts[-1]) or any(p.startswith(("__MACOSX", ".")) for p in parts[:-1]):
            continue
        if len(parts) < 2:
            raise UserError(f"{FLAG} {path}: the image {name} lies outside a class folder; give {LAYOUT}")
        roots.add("/".join(parts[:-2]))
        tree.setdefault(parts[-2], []).append(name)
    if len(roots) > 1:
        shown = ", ".join(sorted(f"{r or '.'}/" for r in roots)[:3])
        raise UserError(f"{FLAG} {path} holds class folders under several folders ({shown}); give {LAYOUT}")
    if not tree:
        raise UserError(f"{FLAG} {path} holds no images; give {LAYOUT}")
    return tree


def read_reserve_source(path: str, spec: DatasetSpec) -> ReserveSource:
    """Read the set at ``path`` whole, its images at ``spec``'s size exactly; one line for anything wrong."""
    location = Path(path).expanduser()
    if not location.exists():
        raise UserError(f"{FLAG} {path} does not exist; give {LAYOUT}")
    if location.is_dir():
        names = [str(p.relative_to(location)) for p in location.rglob("*") if p.is_file()]
        tree = _class_tree(names, location)
        return _decode(location, tree, lambda n: (location / n).read_bytes(), spec, read_in_workers=True)
    with open_zip(location) as (names, read):
        return _decode(location, _class_tree(names, location), read, spec, read_in_workers=False)


def _decode(location: Path, tree: dict[str, list[str]], read, spec: DatasetSpec, read_in_workers: bool):
    folders = sorted(tree)
    items = [(name, k) for k, f in enumerate(folders) for name in sorted(tree[f])]
    size = spec.image_size
    images = decode_all([(n, f"{n} in {location}") for n, _ in items], read, size, "reserve", str(location),
                        exact_for=f"the record's {spec.name}", read_in_workers=read_in_workers,
                        advice=f"give {FLAG} a set at {size}x{size}, the record's image size")
    images = torch.from_numpy(images)
    index = torch.tensor([k for _, k in items], dtype=torch.long)
    digest = hashlib.sha256((tensor_fingerprint(images, index) + json.dumps(folders)).encode()).hexdigest()[:16]
    return ReserveSource(str(location), images, folders, index, digest)


def class_labels(source: ReserveSource, classes: list[str]) -> torch.Tensor:
    """Each image's class index in the record's dataset: folders named as its classes, or by index."""
    k = len(classes)
    if all(f in classes for f in source.folders):
        lookup = [classes.index(f) for f in source.folders]
    elif all(f.isdigit() and int(f) < k for f in source.folders):
        lookup = [int(f) for f in source.folders]
    else:
        bad = next(f for f in source.folders if f not in classes and not (f.isdigit() and int(f) < k))
        shown = ", ".join(classes[:10]) + (", ..." if k > 10 else "")
        raise UserError(f"{FLAG} {source.path}: the class folder {bad!r} is none of the record's {k} classes "
                        f"({shown}); name each folder by its class or class index 0..{k - 1}")
    return torch.tensor(lookup, dtype=torch.long)[source.folder_index]


def _row_digests(images: torch.Tensor) -> list[bytes]:
    rows = images.reshape(len(images), -1).cpu().numpy()
    return [hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=16).digest() for r in rows]


def reserve_set(source: ReserveSource, classes: list[str], test: ImageSet) -> ImageSet:
    """The reserve set in the record's class indices, refused when it holds any of the record's test
    images (compared byte for byte)."""
    labels = class_labels(source, classes)  # the images have the record's size and 3 channels, as decoded
    seen = set(_row_digests(test.images))
    shared = sum(d in seen for d in _row_digests(source.images))
    if shared:
        raise UserError(f"{FLAG} {source.path}: {shared} of its {len(labels)} images are images of the record's test "
                        f"set, which a defense must not see; give a set without them")
    return ImageSet(source.images, labels)
