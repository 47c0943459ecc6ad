"""GTSRB's and Tiny-ImageNet's on-disk layouts (BackdoorBench's and the official archives'), read into
uint8 tensors with the generic image decoding of :mod:`utils.readers`."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.readers import decode_all, folder_entries, has_dir, image_files, is_image_name, plain_name


# GTSRB: 43 classes; CSVs are ``;``-separated: Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId.
GTSRB_CLASSES = 43


GTSRB_TEST_CSV = "GT-final_test.csv"


def gtsrb_test_csv(test_images: Path, root: Path) -> Path | None:
    """The test labels: ``GT-final_test.csv`` beside the test images, one level up, or (official
    archives extracted side by side) beside or above the ``GTSRB`` folder."""
    for folder in dict.fromkeys([test_images, test_images.parent, root, root.parent]):
        if GTSRB_TEST_CSV in folder_entries(folder) and (folder / GTSRB_TEST_CSV).is_file():
            return folder / GTSRB_TEST_CSV
    return None


def gtsrb_dirs(kind: str, location: Path) -> tuple[Path, Path]:
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
        if not plain_name(name) or name in seen:
            raise UserError(f"{path} line {reader.line_num}: {name!r} is not a file name listed once; fix the line")
        seen.add(name)
        rows.append((name, class_id))
    return rows


def _check_listed(folder: Path, listed: list[str], annotations: Path) -> None:
    """Every listed image is in ``folder`` and every image in ``folder`` is listed."""
    present = set(image_files(folder))
    for name in listed:
        if name not in present:
            raise UserError(f"{annotations} lists {name}, which is not an image in {folder}; restore the image or "
                            f"remove its line")
    listed_set = set(listed)
    for name in sorted(present):
        if name not in listed_set:
            raise UserError(f"{folder / name} is not listed in {annotations}; remove the image or add its line")


def read_gtsrb(kind: str, location: Path, size: int):
    """GTSRB as BackdoorBench reads it: for each class id 0..42 the rows of ``GT-<class>.csv`` in its
    order, then the rows of ``GT-final_test.csv``; labels are the CSVs' ClassId; every image resized
    whole to ``size`` (bilinear), the ROI columns unused."""
    train_dir, test_dir = gtsrb_dirs(kind, location)
    archive = "GTSRB_Final_Training_Images.zip"
    if not train_dir.is_dir():
        raise UserError(f"{train_dir} is missing; it must hold GTSRB's class folders 00000..00042 ({archive})")
    expected = [f"{c:05d}" for c in range(GTSRB_CLASSES)]
    for name in sorted(folder_entries(train_dir)):
        if (train_dir / name).is_dir() and name not in expected and not name.startswith("."):
            raise UserError(f"{train_dir / name} is not a GTSRB class folder (00000..00042); remove or rename it")
    train = []
    for c, name in enumerate(expected):
        folder = train_dir / name
        if not has_dir(train_dir, name):
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
    test_csv = gtsrb_test_csv(test_dir, location)
    if test_csv is None:
        raise UserError(f"{GTSRB_TEST_CSV} (the test labels, from GTSRB_Final_Test_GT.zip) is not in {test_dir} or one "
                        f"level up; place it there")
    rows = _read_gtsrb_csv(test_csv)
    _check_listed(test_dir, [f for f, _ in rows], test_csv)
    test = [(test_dir / f, k) for f, k in rows]
    out = []
    for split, items in (("train", train), ("test", test)):
        images = decode_all([(p, str(p)) for p, _ in items], Path.read_bytes, size, split, str(location))
        out += [images, np.array([k for _, k in items], dtype=np.int64)]
    return (*out, expected)


# Tiny-ImageNet: 200 classes (wnids), 64x64 images; the labelled validation set is the test set.
TINY_ANNOTATIONS = "val_annotations.txt"


def read_tiny(location: Path, size: int):
    """``tiny-imagenet-200/`` as BackdoorBench reads it, torchvision ``ImageFolder`` on ``train/`` and
    on ``val/`` sorted into class folders: classes are the **sorted** wnids (ImageFolder's order, not
    ``wnids.txt``'s), images by class, then by folder and file name. ``val/images/`` with
    ``val_annotations.txt`` gives the same order. Every image must be 64x64, as in the archive."""
    train_dir, val_dir = location / "train", location / "val"
    if not train_dir.is_dir():
        raise UserError(f"{train_dir} is missing; Tiny-ImageNet needs train/<wnid>/images/ (tiny-imagenet-200.zip)")
    folders = sorted(n for n in folder_entries(train_dir) if (train_dir / n).is_dir() and not n.startswith("."))
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
                       if is_image_name(p.name) and p.is_file())
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
            if not plain_name(name) or name in listed:
                raise UserError(f"{annotations} line {lineno}: {name!r} is not a file name listed once; fix the line")
            listed[name] = index[wnid]
        _check_listed(images_dir, list(listed), annotations)
        test = [(images_dir / name, k) for name, k in listed.items()]
    else:
        subfolders = sorted(n for n in folder_entries(val_dir) if (val_dir / n).is_dir() and not n.startswith("."))
        if not subfolders or subfolders == ["images"]:
            raise UserError(f"{annotations} is missing; restore it from tiny-imagenet-200.zip (or sort val/ into "
                            f"val/<wnid>/ folders)")
        for w in subfolders:
            if w not in index:
                raise UserError(f"{val_dir / w} is not one of the {len(classes)} classes (wnids.txt, train/); "
                                f"remove or rename it")
            test += [(val_dir / w / name, index[w]) for name in image_files(val_dir / w)]
    test.sort(key=lambda item: (item[1], item[0].name))
    out = []
    for split, items in (("train", train), ("test", test)):
        images = decode_all([(p, str(p)) for p, _ in items], Path.read_bytes, size, split, str(location),
                            exact_for="Tiny-ImageNet")
        out += [images, np.array([k for _, k in items], dtype=np.int64)]
    return (*out, classes)
