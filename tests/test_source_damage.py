"""Damaged sources are one line, never a traceback. The damage matrix (source kind x damage kind ->
words of the one ``error:`` line) is kept as data, :data:`MATRIX`, and walked by one test: every
cell runs the real attack's ``main`` in-process on tiny data and must exit 2 with exactly one
``error:`` line naming the file, no traceback, nothing under the record folder, no cache written
and nothing written outside. Cells marked :data:`ACCEPTED` are damages the reader deliberately
tolerates (an image of another size is resized, as BackdoorBench's ``Resize`` does): they load.
Beside the matrix: CIFAR pickles of every protocol load (only their plain data), a pickle global is
refused without running, ``--sgd_momentum`` is range-checked, and a first decode logs its progress."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import CLASSES, TINY, expect_error, run_args
from PIL import Image
from test_datasets import _gtsrb_pixels, write_gtsrb_backdoorbench, write_tiny
from test_ssba import _npy_files

import attack.badnet as badnet
import attack.lf as lf
import attack.ssba as ssba
import utils.readers as readers
import utils.sources as sources
from utils.config import Config, check_training
from utils.errors import UserError
from utils.logs import setup_logging
from utils.sources import load_dataset

ACCEPTED = None  # a cell's expectation when the damage is tolerated on purpose


class Payload:
    """Unpickling this would run ``touch <sentinel>`` through os.system."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


# ----------------------------------------------------------------------------- damages, as edits of a file

def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00this is not an image or an array\xff" * 8)


def _image(p: Path, w: int, h: int, fmt: str | None = None) -> None:
    Image.fromarray(np.full((h, w, 3), 77, np.uint8)).save(p, format=fmt)


def _empty_folder(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()


def _rezip(path: Path, replace: dict[str, bytes | None] = (), add: dict[str, bytes] = (), method=zipfile.ZIP_STORED):
    """Rewrite the zip at ``path``: members replaced (None: dropped), members added."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members.update(dict(replace))
    members.update(dict(add))
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            if data is not None:
                zf.writestr(name, data)


def _flip_member_byte(path: Path, deflate: bool = False) -> None:
    """One byte inside the first member's data flipped: a CRC (or deflate stream) error on read."""
    if deflate:
        _rezip(path, method=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _central_directory(path: Path, offset: int, value: bytes) -> None:
    """Overwrite bytes of the last central-directory entry (4: signature, 10: compression method)."""
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02") + offset
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))


def _pickle_to(p: Path, obj) -> None:
    p.write_bytes(pickle.dumps(obj, protocol=2))


# ----------------------------------------------------------------------------- the sources

@dataclass
class Source:
    """A good copy of a source in ``root`` and the argv that reads it through the attack's CLI."""
    main: Callable
    copy: Callable[[Path, dict], Path]       # (root, good sources) -> the path the damage edits
    argv: Callable[[Path, Path, dict], list]  # (edited path, root, good sources) -> argv


def _data_argv(dataset: str):
    return lambda path, root, good: ["--dataset", dataset, "--dataset_path", str(path)]


def _copy_tree(key: str, name: str):
    return lambda root, good: Path(shutil.copytree(good[key], root / name))


def _copy_file(key: str, name: str):
    return lambda root, good: Path(shutil.copy(good[key], root / name))


def _npy_copy(which: str):
    def copy(root: Path, good: dict) -> Path:
        for name in ("train.npy", "test.npy", "pattern.npy"):
            shutil.copy(good["npy"] / name, root / name)
        return root / which
    return copy


SOURCES = {
    "cifar pickles": Source(badnet.main, _copy_tree("pickles", "data"), _data_argv("cifar10")),
    "image folder": Source(badnet.main, _copy_tree("folder", "data"), _data_argv("cifar10")),
    "zip": Source(badnet.main, _copy_file("zip", "data.zip"), _data_argv("cifar10")),
    "gtsrb": Source(badnet.main, _copy_tree("gtsrb", "gtsrb"), _data_argv("gtsrb")),
    "tiny": Source(badnet.main, _copy_tree("tiny", "tiny"), _data_argv("tiny")),
    "ssba npy": Source(ssba.main, _npy_copy("train.npy"), lambda path, root, good: [
        "--dataset_path", str(good["pickles"]), "--attack_train_replace_imgs_path", str(path),
        "--attack_test_replace_imgs_path", str(root / "test.npy")]),
    "lf npy": Source(lf.main, _npy_copy("pattern.npy"), lambda path, root, good: [
        "--dataset_path", str(good["pickles"]), "--lowFrequencyPatternPath", str(path)]),
}

BATCHES = "cifar-10-batches-py"
GT = "Train/00005"
W0 = "n00000000"  # the first wnid of test_datasets.WNIDS in sorted order
TINY_IMAGES = f"tiny-imagenet-200/train/{W0}/images"
MEMBER = "tiny/train/cat/0000.png"


@dataclass
class Cell:
    source: str
    damage: str
    edit: Callable[[Path, Path], None]  # (the path of the copied source, the cell's sentinel file)
    words: str | None                   # in the one error line; ACCEPTED: the damage is tolerated


MATRIX = [
    # CIFAR-10 pickles folder
    Cell("cifar pickles", "missing", lambda p, s: (p / BATCHES / "data_batch_3").unlink(),
         "holds CIFAR-10 pickles but not data_batch_3"),
    Cell("cifar pickles", "empty", lambda p, s: (p / BATCHES / "data_batch_1").write_bytes(b""),
         "data_batch_1 is not a readable CIFAR batch file (it is empty, 0 bytes)"),
    Cell("cifar pickles", "truncated", lambda p, s: _truncate(p / BATCHES / "data_batch_2"),
         "data_batch_2 is not a readable CIFAR batch file"),
    Cell("cifar pickles", "truncated meta", lambda p, s: (p / BATCHES / "batches.meta").write_bytes(
        pickle.dumps({"label_names": CLASSES}, protocol=2)[:-9]), "batches.meta is not a readable CIFAR label-names"),
    Cell("cifar pickles", "wrong shape", lambda p, s: _pickle_to(p / BATCHES / "data_batch_4", {
        "data": np.zeros((40, 3 * 16 * 16), np.uint8), "labels": [0] * 40}), "holds uint8 data of shape 40x768"),
    Cell("cifar pickles", "unreadable", lambda p, s: _garbage(p / BATCHES / "test_batch"),
         "test_batch is not a readable CIFAR batch file"),
    Cell("cifar pickles", "pickle global", lambda p, s: _pickle_to(p / BATCHES / "test_batch", {
        "data": Payload(s), "labels": [0]}), "refused global posix.system"),
    Cell("cifar pickles", "pickle global meta", lambda p, s: _pickle_to(p / BATCHES / "batches.meta", {
        "label_names": Payload(s)}), "batches.meta is not a readable CIFAR label-names file (refused global"),
    # an image-folder tree
    Cell("image folder", "missing", lambda p, s: shutil.rmtree(p / "test/cat"),
         "test/cat/ holds no images but train/cat/ does"),
    Cell("image folder", "empty", lambda p, s: (p / "train/dog/0000.png").write_bytes(b""),
         "cannot decode image train/dog/0000.png in"),
    Cell("image folder", "empty folder", lambda p, s: _empty_folder(p / "train/dog"),
         "train/dog/ holds no images but test/dog/ does"),
    Cell("image folder", "truncated", lambda p, s: _truncate(p / "test/ship/0001.png"),
         "cannot decode image test/ship/0001.png in"),
    Cell("image folder", "wrong shape", lambda p, s: _image(p / "train/cat/0000.png", 40, 30), ACCEPTED),
    Cell("image folder", "unreadable", lambda p, s: _garbage(p / "train/frog/0002.png"),
         "cannot decode image train/frog/0002.png in"),
    # a .zip of that tree
    Cell("zip", "missing", lambda p, s: p.unlink(), "no cifar10 data found at"),
    Cell("zip", "empty", lambda p, s: p.write_bytes(b""), "is not a readable .zip archive (it is empty, 0 bytes)"),
    Cell("zip", "truncated", lambda p, s: _truncate(p), "is not a readable .zip archive (cut short or damaged"),
    Cell("zip", "wrong shape", lambda p, s: _rezip(p, {MEMBER: _png(40, 30)}), ACCEPTED),
    Cell("zip", "unreadable", lambda p, s: _rezip(p, {MEMBER: b"\x00garbage"}), f"cannot decode image {MEMBER} in"),
    Cell("zip", "damaged member", lambda p, s: _flip_member_byte(p),
         "(BadZipFile: Bad CRC-32 for file 'tiny/train/airplane/0000.png'); the .zip is damaged"),
    Cell("zip", "damaged deflate member", lambda p, s: _flip_member_byte(p, deflate=True),
         "tiny/train/airplane/0000.png in"),
    Cell("zip", "damaged directory", lambda p, s: _central_directory(p, 0, b"PK\x00\x00"),
         "(BadZipFile: Bad magic number for central directory); the .zip is damaged"),
    Cell("zip", "damaged directory method", lambda p, s: _central_directory(p, 10, b"\x63\x00"),
         "(NotImplementedError: That compression method is not supported); the .zip is damaged"),
    Cell("zip", "member leaving the folder", lambda p, s: _rezip(p, add={"../x.png": _png(32, 32)}),
         "holds the member '../x.png', whose path leaves the archive's folder"),
    # GTSRB (BackdoorBench's layout)
    Cell("gtsrb", "missing", lambda p, s: (p / "Test/00003.ppm").unlink(), "lists 00003.ppm, which is not an image in"),
    Cell("gtsrb", "empty", lambda p, s: (p / GT / "GT-00005.csv").write_bytes(b""),
         "GT-00005.csv has no Filename and ClassId columns"),
    Cell("gtsrb", "empty folder", lambda p, s: _empty_folder(p / GT), "GT-00005.csv is missing"),
    Cell("gtsrb", "truncated", lambda p, s: _truncate(p / GT / "00000_00005.ppm"),
         "cannot decode image"),
    Cell("gtsrb", "wrong shape", lambda p, s: _image(p / GT / "00000_00005.ppm", 60, 20, "PPM"), ACCEPTED),
    Cell("gtsrb", "unreadable", lambda p, s: _garbage(p / "Test/00007.ppm"), "cannot decode image"),
    # Tiny-ImageNet
    Cell("tiny", "missing", lambda p, s: shutil.rmtree(p / f"tiny-imagenet-200/train/{W0}"),
         f"train/{W0} is missing: "),
    Cell("tiny", "empty folder", lambda p, s: _empty_folder(p / TINY_IMAGES), f"train/{W0} holds no images"),
    Cell("tiny", "empty", lambda p, s: (p / TINY_IMAGES / f"{W0}_0.JPEG").write_bytes(b""),
         f"cannot decode image {'{root}'}/{TINY_IMAGES}/{W0}_0.JPEG"),
    Cell("tiny", "truncated", lambda p, s: _truncate(p / TINY_IMAGES / f"{W0}_1.JPEG"),
         f"cannot decode image {'{root}'}/{TINY_IMAGES}/{W0}_1.JPEG"),
    Cell("tiny", "wrong shape", lambda p, s: _image(p / TINY_IMAGES / f"{W0}_1.JPEG", 65, 64, "JPEG"),
         f"{W0}_1.JPEG is 65x64, but Tiny-ImageNet images are all 64x64"),
    Cell("tiny", "unreadable", lambda p, s: _garbage(p / TINY_IMAGES / f"{W0}_0.JPEG"), "cannot decode image"),
    # SSBA's --attack_train_replace_imgs_path
    Cell("ssba npy", "missing", lambda p, s: p.unlink(), "does not exist"),
    Cell("ssba npy", "empty", lambda p, s: p.write_bytes(b""), "is empty (0 bytes)"),
    Cell("ssba npy", "truncated", lambda p, s: _truncate(p), "is truncated: "),
    Cell("ssba npy", "wrong shape", lambda p, s: np.save(p, np.zeros((200, 16, 16, 3), np.uint8)),
         "holds uint8 200x16x16x3; cifar10 needs uint8 200x32x32x3"),
    Cell("ssba npy", "unreadable", lambda p, s: _garbage(p), "is not a .npy file (no NumPy header)"),
    Cell("ssba npy", "pickle global", lambda p, s: np.save(p, np.array([Payload(s)], dtype=object)),
         "holds pickled Python objects"),
    # Low Frequency's --lowFrequencyPatternPath
    Cell("lf npy", "missing", lambda p, s: p.unlink(), "does not exist"),
    Cell("lf npy", "empty", lambda p, s: p.write_bytes(b""), "is empty (0 bytes)"),
    Cell("lf npy", "truncated", lambda p, s: _truncate(p), "is truncated: "),
    Cell("lf npy", "wrong shape", lambda p, s: np.save(p, np.zeros((16, 16, 3), np.uint8) + 5), "has shape 16x16x3"),
    Cell("lf npy", "unreadable", lambda p, s: _garbage(p), "is not a .npy file (no NumPy header)"),
    Cell("lf npy", "pickle global", lambda p, s: np.save(p, np.array([Payload(s)], dtype=object)),
         "holds pickled Python objects"),
]


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    _image(buf, w, h, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def good(tiny_data, tmp_path_factory) -> dict:
    """Every source once, undamaged: each cell copies one and breaks the copy."""
    root = tmp_path_factory.mktemp("good")
    with zipfile.ZipFile(tiny_data["zip"]) as zf:
        zf.extractall(root / "extracted")
    train, test = _gtsrb_pixels()
    train = {c: images[:1] for c, images in train.items()}  # one training image per class is enough here
    (root / "npy").mkdir()
    _npy_files(tiny_data, root / "npy")
    np.save(root / "npy" / "pattern.npy", np.full((32, 32, 3), 40, np.uint8))
    return {"pickles": tiny_data["pickles"], "zip": tiny_data["zip"], "folder": root / "extracted" / "tiny",
            "gtsrb": write_gtsrb_backdoorbench(root / "gtsrb", train, test), "tiny": write_tiny(root / "tiny"),
            "npy": root / "npy"}


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    def refuse(path):
        raise AssertionError(f"a damaged source must not start a CIFAR-10 download into {path}")
    monkeypatch.setattr(sources, "_download_cifar10", refuse)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("cell", MATRIX, ids=[f"{c.source}:{c.damage}" for c in MATRIX])
def test_damaged_source_is_one_line(cell, good, tmp_path, capsys):
    source = SOURCES[cell.source]
    work = tmp_path / "work"
    work.mkdir()
    path = source.copy(work, good)
    sentinel = tmp_path / "sentinel"
    cell.edit(path, sentinel)
    before = _files(tmp_path)
    argv = [*source.argv(path, work, good), "--save_folder_name", "cell", "--record_dir", str(tmp_path / "rec"),
            "--cache_dir", str(tmp_path / "cache"), *TINY, "--epochs", "1"]
    if cell.words is ACCEPTED:  # tolerated: the source loads (the run itself is not needed for that)
        dataset = "cifar10" if "--dataset" not in argv else argv[argv.index("--dataset") + 1]
        load_dataset(dataset, path, tmp_path / "cache", download=False)
        return
    line = expect_error(capsys, source.main, argv)
    assert cell.words.replace("{root}", str(path)) in line, line
    assert str(path) in line, line  # names the file or folder
    assert _files(tmp_path / "rec") == [], "a refused run wrote under the record folder"
    if cell.source not in ("ssba npy", "lf npy"):  # the npy attacks read a good dataset (and may cache it)
        assert _files(tmp_path / "cache") == [], "a damaged source was cached"
    after = [f for f in _files(tmp_path) if not f.startswith(("rec", "cache"))]
    assert after == before, "a damaged source wrote files"
    assert not sentinel.exists(), "a pickled payload ran"


def test_the_matrix_covers_every_source():
    damages = {(c.source, c.damage) for c in MATRIX}
    assert {s for s, _ in damages} == set(SOURCES)
    for source in SOURCES:
        assert {"missing", "truncated", "wrong shape"} <= {d for s, d in damages if s == source}, source


# ----------------------------------------------------------------------------- CIFAR pickles of any protocol

@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_cifar_pickles_of_every_protocol_load(tiny_data, tmp_path, protocol):
    """Batches as dicts with bytes keys (as Python 2 wrote them, read with ``encoding='bytes'``): numpy
    arrays, lists, bytes, numpy scalars. Protocols 0-2 spell bytes as ``_codecs.encode``, protocol 5
    arrays as ``numpy._core.numeric._frombuffer``: plain data all the same."""
    folder = tmp_path / BATCHES
    folder.mkdir()
    source = tiny_data["pickles"] / BATCHES
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(source / name, "rb") as f:
            d = pickle.load(f)
        labels = [np.int64(v) for v in d["labels"]] if name == "test_batch" else d["labels"]
        batch = {b"batch_label": b"training batch", b"data": d["data"], b"labels": labels,
                 b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072, b"num_cases_per_batch": 40}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    ds = load_dataset("cifar10", tmp_path, tmp_path / "cache", download=False)
    assert np.array_equal(ds.train.images.numpy(), tiny_data["x_train"])
    assert np.array_equal(ds.train.labels.numpy(), tiny_data["y_train"])
    assert np.array_equal(ds.test.labels.numpy(), tiny_data["y_test"])
    assert ds.classes == CLASSES


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pickle_globals_beyond_plain_numpy_are_refused_unrun(tmp_path, protocol):
    for i, payload in enumerate([Payload(tmp_path / "ran"), (os.system, ("true",))]):
        path = tmp_path / f"batch{i}"
        path.write_bytes(pickle.dumps({"data": payload, "labels": [0]}, protocol=protocol))
        with pytest.raises(UserError, match=r"not a readable CIFAR batch file \(refused global posix.system"):
            readers._read_cifar_batch(path, 10)
    # _codecs.encode is allowed only as the latin-1 spelling of bytes.
    evil = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    (tmp_path / "codec").write_bytes(evil)
    with pytest.raises(UserError, match="only latin-1 bytes"):
        readers._load_plain_pickle(tmp_path / "codec", "CIFAR batch file", "re-download")
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- --sgd_momentum

@pytest.mark.parametrize("value", ["-1", "1", "1.5"])
def test_sgd_momentum_outside_zero_one_is_one_line(capsys, tiny_data, tmp_path, value):
    expect_error(capsys, badnet.main, ["--save_folder_name", "m", *run_args(tiny_data, tmp_path / "rec"), *TINY,
                                       "--sgd_momentum", value], f"--sgd_momentum {float(value)} is outside [0, 1)")
    assert _files(tmp_path / "rec") == []


def test_sgd_momentum_in_range_passes():
    for value in (0.0, 0.9, 0.99):
        check_training(Config(epochs=1, batch_size=1, lr=0.1, wd=0.0, sgd_momentum=value))
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=value)


# ----------------------------------------------------------------------------- progress of a first decode

def test_first_decode_logs_its_progress_when_stderr_is_redirected(tiny_data, tmp_path, capsys, monkeypatch):
    """stderr is not a terminal here (captured): no bar, but the run's log gets the start, a line per
    further tenth (the interval shortened to see them) and the end with its time."""
    monkeypatch.setattr(readers, "DECODE_CHUNK", 8)
    monkeypatch.setattr(readers, "_decode_workers", lambda: 1)
    monkeypatch.setattr(readers, "PROGRESS_LOG_S", 0.0)
    setup_logging()
    load_dataset("cifar10", tiny_data["zip"], tmp_path / "cache")
    lines = capsys.readouterr().err.splitlines()
    source = str(tiny_data["zip"])
    assert any(f"decoding 200 train images of {source} once into the cache" in line for line in lines), lines
    assert any(f"decoding 100 test images of {source} once into the cache" in line for line in lines), lines
    assert any(f"decoded 200 train images of {source} in " in line for line in lines), lines
    assert any(f"decoded 100 test images of {source} in " in line for line in lines), lines
    steps = [line for line in lines if f"decoding train images of {source}: " in line]
    assert 5 <= len(steps) <= 9, steps
    assert not any("decode train" in line for line in lines)  # no tqdm bar off a terminal

    # The default interval: a fast decode logs its start and its end only; the cache is not logged again.
    monkeypatch.setattr(readers, "PROGRESS_LOG_S", 2.0)
    load_dataset("cifar10", tiny_data["zip"], tmp_path / "c2")
    lines = capsys.readouterr().err.splitlines()
    assert len([line for line in lines if "images of" in line]) == 4, lines
    load_dataset("cifar10", tiny_data["zip"], tmp_path / "c2")
    assert "decod" not in capsys.readouterr().err

    # On a terminal the tqdm bar shows the progress: the log keeps only the start and the end.
    monkeypatch.setattr(readers, "PROGRESS_LOG_S", 0.0)
    monkeypatch.setattr("utils.progress._is_terminal", lambda stream: True)
    load_dataset("cifar10", tiny_data["zip"], tmp_path / "c3")
    err = capsys.readouterr().err
    assert "decode train" in err and f"decoding train images of {source}: " not in err
    assert f"decoded 200 train images of {source} in " in err
