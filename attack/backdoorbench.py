"""BackdoorBench's record format, read safely and written as plain data, and the ``backdoorbench``
attack whose poisoned images are looked up from an imported record.

A BackdoorBench attack record is a folder ``record/<name>/`` holding ``attack_result.pt`` (a torch zip,
pickle protocol 2) and PNG folders; checked against BackdoorBench's ``utils/save_load_attack.py`` and
``utils/bd_dataset_v2.py`` at commit :data:`BB_COMMIT`. ``attack_result.pt`` is a dict:
``model_name``, ``num_classes``, ``model`` (a state dict), ``data_path``, ``img_size`` (H, W, C),
``clean_data`` (the dataset's name) and ``bd_train`` / ``bd_test``, each a dataset state:
``{'bd_data_container': {'save_folder_path', 'data_dict', 'save_file_format'}, 'getitem_all',
'getitem_all_switch', 'original_index_array' (int64), 'poison_indicator' (float64 0/1 over the whole
set), 'save_folder_path'}``; ``data_dict`` maps each poisoned sample's index (numpy int64) to
``{'path': './record/<name>/bd_<split>_dataset/<original label>/<index>.png', 'other_info':
[backdoor label, original label]}``. ``bd_test``'s ``original_index_array`` is the poisoned test subset.
A defense writes ``record/<name>/defense/<defense>/defense_result.pt``: ``model_name``,
``num_classes``, ``model``.

Safety: a file is unpickled only by ``torch.load(weights_only=True)`` with :data:`ALLOWED_GLOBALS`
added (numpy arrays, scalars and dtypes, ``_codecs.encode``) to torch's own tensors and
``OrderedDict``: any other global is refused, naming it, before anything runs. PNG paths are
resolved inside the given record folder (a path leaving it is refused) and read as PNG images only.
"""
from __future__ import annotations

import _codecs
import csv
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from attack.base import Attack, lookup_indexed, register_attack
from utils.errors import UserError
from utils.record import safe_torch_load, torch_save

BB_COMMIT = "f02e3534645f0ee63d6848653062cd6c0d6c400d"  # SCLBD/BackdoorBench, 2025-07-04
ATTACK_FILE, DEFENSE_FILE = "attack_result.pt", "defense_result.pt"
ATTACK_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
SPLIT_KEYS = ("bd_data_container", "original_index_array", "poison_indicator")

IMPORTED_SOURCE = "the imported BackdoorBench record"  # names the looked-up images in their errors


def _numpy_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    spelled = [(f, f"numpy.{core}.multiarray.{f.__name__}") for f in (_reconstruct, scalar)
               for core in ("core", "_core")]
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [*spelled, np.ndarray, np.dtype, *dtypes, _codecs.encode, OrderedDict]


ALLOWED_GLOBALS = _numpy_globals()


def read_bb_file(path: Path) -> dict:
    """A BackdoorBench ``.pt`` file as plain data: torch's restricted unpickler with the allowlist only."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            obj = safe_torch_load(path)
    except UserError as e:  # name the refused global (torch's text, kept as the error's context)
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(e.__context__ or ""))
        if found is None:
            raise
        raise UserError(f"refused to load {path}: its pickle calls {found.group(1) or found.group(2)}, which is not "
                        f"plain data (BackdoorBench's allowlist: tensors, numpy arrays); nothing was run") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not BackdoorBench's dict of results")
    return obj


def state_dict(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    state = obj.get("model")
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                            for k, v in state.items()):
        raise UserError(f"{path}: 'model' is not a state dict of tensors")
    return dict(state)


@dataclass
class BBSplit:
    """One poisoned split: the poisoned samples' indices (sorted), their uint8 images, backdoor and
    original labels, and the set's size (``poison_indicator``'s length)."""
    index: torch.Tensor
    images: torch.Tensor
    bd_labels: torch.Tensor
    labels: torch.Tensor
    size: int


def _fail(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; not a BackdoorBench record this reader knows (commit {BB_COMMIT[:8]})")


def read_split(folder: Path, state, which: str, image_size: int, channels: int) -> BBSplit:
    """``bd_train`` / ``bd_test`` of ``attack_result.pt`` with its PNGs, checked."""
    path = folder / ATTACK_FILE
    if not isinstance(state, dict) or any(k not in state for k in SPLIT_KEYS):
        raise _fail(path, f"{which} lacks one of {', '.join(SPLIT_KEYS)}")
    container = state["bd_data_container"]
    if not isinstance(container, dict) or not isinstance(container.get("data_dict"), dict):
        raise _fail(path, f"{which}'s bd_data_container holds no data_dict")
    indicator = np.asarray(state["poison_indicator"])
    order = np.asarray(state["original_index_array"])
    if indicator.ndim != 1 or order.ndim != 1 or order.dtype.kind not in "iu" or not np.isin(indicator, (0, 1)).all():
        raise _fail(path, f"{which}'s poison_indicator / original_index_array are not 0/1 and integer arrays")
    poisoned = np.flatnonzero(indicator == 1)
    data = container["data_dict"]
    keys = sorted(int(k) for k in data)
    if keys != poisoned.tolist():
        raise _fail(path, f"{which}'s data_dict holds {len(keys)} samples where poison_indicator marks {len(poisoned)}")
    if which == "bd_test" and sorted(order.tolist()) != keys:
        raise _fail(path, "bd_test's original_index_array is not its poisoned subset")
    base = container.get("save_folder_path")
    if not isinstance(base, str) or not base:
        raise _fail(path, f"{which} has no save_folder_path (images kept in memory are not supported)")
    prefix = str(PurePosixPath(base).parent)
    images, bd, orig = [], [], []
    by_int = {int(k): v for k, v in data.items()}
    root = folder.resolve()
    for i in keys:
        entry = by_int[i]
        info = entry.get("other_info") if isinstance(entry, dict) else None
        png = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(png, str) or not isinstance(info, (list, tuple)) or len(info) < 2:
            raise _fail(path, f"{which}'s entry {i} is not {{'path', 'other_info': [backdoor label, label]}}")
        images.append(read_png(_inside(root, png, prefix, path), image_size, channels))
        bd.append(int(info[0]))
        orig.append(int(info[1]))
    shape = (0, channels, image_size, image_size)
    return BBSplit(torch.tensor(keys, dtype=torch.long), torch.stack(images) if images else torch.empty(shape,
                   dtype=torch.uint8), torch.tensor(bd, dtype=torch.long), torch.tensor(orig, dtype=torch.long),
                   len(indicator))


def _inside(root: Path, png: str, prefix: str, source: Path) -> Path:
    """``png`` with the record's own prefix (``./record/<name>``) stripped, inside ``root``."""
    pure = PurePosixPath(png)
    if str(pure).startswith(prefix + "/"):
        rel = str(pure)[len(prefix) + 1:]
    else:
        raise UserError(f"{source}: the image path {png!r} is not under the record's folder {prefix!r}; refused")
    target = (root / rel).resolve()
    if root not in target.parents:
        raise UserError(f"{source}: the image path {png!r} leaves the record folder {root}; refused")
    return target


def read_png(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """A PNG of the expected size as uint8 [C, H, W]; anything else is refused in one line."""
    try:
        with Image.open(path, formats=["PNG"]) as img:
            if img.size != (image_size, image_size):
                raise UserError(f"{path} is {img.size[0]} x {img.size[1]}, the record's images are {image_size} x "
                                f"{image_size}")
            array = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a PNG image ({e}); the BackdoorBench record is incomplete") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def last_attack_row(folder: Path) -> dict[str, float]:
    """``test_acc`` / ``test_asr`` / ``test_ra`` of the last row of BackdoorBench's ``attack_df.csv``
    (for the log only), or ``{}``."""
    return last_metrics_row(folder / "attack_df.csv")


def last_defense_row(defense_file: Path) -> dict[str, float]:
    """The same figures of the defense beside ``defense_result.pt``, from the per-epoch table BackdoorBench's
    trainer writes there as ``<defense>_df.csv`` (ft, nad, d-br, ...), or ``{}`` where it wrote none."""
    return last_metrics_row(defense_file.parent / f"{defense_file.parent.name}_df.csv")


def last_metrics_row(path: Path) -> dict[str, float]:
    """``test_acc`` / ``test_asr`` / ``test_ra`` of the last row of a BackdoorBench ``*_df.csv``, or ``{}``."""
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
        last = rows[-1] if rows else {}
        return {k: float(last[k]) for k in ("test_acc", "test_asr", "test_ra") if last.get(k) not in (None, "")}
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return {}


# ----------------------------------------------------------------------------- writing (export)

def split_state(folder_name: str, split: str, size: int, index: torch.Tensor, bd_labels, labels) -> dict:
    """One ``bd_<split>`` dataset state as BackdoorBench keeps it: numpy arrays, ints and strings only."""
    base = f"./record/{folder_name}/bd_{split}_dataset"
    data = {np.int64(i): {"path": f"{base}/{int(y)}/{int(i)}.png", "other_info": [int(b), int(y)]}
            for i, b, y in zip(index.tolist(), bd_labels.tolist(), labels.tolist())}
    indicator = np.zeros(size, dtype=np.float64)
    indicator[index.numpy()] = 1.0
    order = index.numpy().astype(np.int64) if split == "test" else np.arange(size, dtype=np.int64)
    return {"bd_data_container": {"save_folder_path": base, "data_dict": data, "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": order,
            "poison_indicator": indicator, "save_folder_path": base}


def write_pngs(out: Path, split: str, index: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
    for i, img, y in zip(index.tolist(), images, labels.tolist()):
        target = out / f"bd_{split}_dataset" / str(int(y)) / f"{int(i)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        array = img.permute(1, 2, 0).numpy()
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(target, format="PNG")


def write_bb_file(path: Path, obj: dict) -> None:
    """Plain data (dicts, tensors, numpy arrays) through ``torch.save``: what the restricted reader reads."""
    torch_save(path, obj)


def plain_state(state: dict[str, torch.Tensor], order: list[str], what: str | Path) -> OrderedDict:
    """``state`` as plain tensors in ``order``, the model's own ``state_dict()`` order. Needed:
    BackdoorBench's ``load_attack_result`` renames the file's keys by position to its model's, so a
    state dict in another order (safetensors keeps its keys sorted) would load under wrong names."""
    if set(order) != set(state):
        raise UserError(f"{what} does not hold the parameters of its model ({len(state)} tensors, the model has "
                        f"{len(order)}); the record is damaged")
    return OrderedDict((k, state[k].detach().cpu().clone()) for k in order)


# ----------------------------------------------------------------------------- the attack of imported records

@register_attack
class BackdoorBenchRecord(Attack):
    """An attack imported from a BackdoorBench record (attack/import_backdoorbench.py): its poisoned images, looked up by index."""  # noqa: E501
    name = "backdoorbench"
    indexed_trigger = True

    @classmethod
    def make_trigger(cls, cfg, spec, dataset=None):
        raise UserError("the backdoorbench attack is made by importing a record: python attack/import_backdoorbench.py"
                        " --bb_record PATH --dataset_path DATA --save_folder_name NAME")

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor], index=None) -> torch.Tensor:
        return lookup_indexed(artifacts["test_images"], artifacts["test_index"], index, "test",
                                  IMPORTED_SOURCE).to(images.device)

    @classmethod
    def apply_train_trigger(cls, images: torch.Tensor, artifacts: dict[str, torch.Tensor], index=None) -> torch.Tensor:
        return lookup_indexed(artifacts["train_images"], artifacts["train_index"], index, "training",
                                  IMPORTED_SOURCE).to(images.device)
