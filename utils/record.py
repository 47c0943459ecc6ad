"""Records on disk: data only (safetensors, JSON, YAML, CSV, PNG), written atomically.

Layout of an attack record ``record/<name>/`` (format version ``FORMAT_VERSION``):
    config.yaml          the full resolved configuration (no machine-local paths)
    model.safetensors    the attacked model's weights
    indices.safetensors  train_poison_index, test_backdoor_index (and train_subset_index with --train_subset)
    trigger.safetensors  the trigger artifacts (e.g. patch and mask) the attack's trigger function reads
    metrics.csv          one row per epoch
    summary.json         final clean_acc / asr / ra (fractions) and timings
    record.json          format version, kind, attack, model, dataset name + content fingerprint, label
                         rule, target, fingerprints of the poisoned sets, and ``files``: the SHA-256 of
                         every file above. Written last: its presence marks the record finished.
    attack.log, *.png    log and plots (for people; not hashed)
A defense writes ``record/<name>/defense/<defense>/`` with config.yaml, model.safetensors,
reserved_index.safetensors, metrics.csv, summary.json (adds der and the attacked model's figures),
record.json (adds ``attack_record_sha256``, the hash of the attack's record.json it read),
defense.log and plots.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils.errors import UserError

# Version 2: SHA-256 of every file in record.json, and PreAct-ResNet18 without the final BN that
# version 1 had (BackdoorBench's layout). Older records are refused, not migrated.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (2,)

# record.json's shape, checked on every read (:func:`check_schema`): each key of a kind and the type of
# its value, the dataset's keys, and the files a finished record of the kind must list.
RECORD_SCHEMA = {
    "attack": {"attack": str, "model": str, "dataset": dict, "attack_label_trans": str, "attack_target": int,
               "poisoned_train_fingerprint": str, "backdoor_test_fingerprint": str, "files": dict},
    "defense": {"defense": str, "model": str, "attack_record": str, "attack_record_sha256": str, "dataset": dict,
                "files": dict},
}
DATASET_SCHEMA = {"name": str, "fingerprint": str, "num_classes": int, "image_size": int, "train_size": int,
                  "test_size": int}
REQUIRED_FILES = {
    "attack": ("config.yaml", "trigger.safetensors", "indices.safetensors", "model.safetensors", "metrics.csv",
               "summary.json"),
    "defense": ("config.yaml", "model.safetensors", "metrics.csv", "summary.json"),
}


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=True))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def torch_save(path: Path, obj: Any) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"missing file {path}; the record is incomplete (re-run the step that writes it)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); the record is damaged") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (which cannot carry code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}; the record is incomplete (re-run the step that writes it)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e}); the record is damaged") from None


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a file that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refused to load {path}: it is not a plain weights file and could run code when "
                        f"unpickled ({first}); use a trusted file saved as a state_dict") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong format, ...
        raise UserError(f"cannot read {path} as a PyTorch weights file ({type(e).__name__}: {e}); "
                        f"the file is damaged") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights from ``.safetensors`` or a ``weights_only`` ``.pt``/``.pth`` state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    state = safe_torch_load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # BackdoorBench-style {"model": state_dict, ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state_dict of tensors")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, with one clear line when it does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if mismatched:
            k = mismatched[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, model needs {tuple(own[k].shape)}")
        raise UserError(f"weights in {source} do not fit model {type(model).__name__}: {'; '.join(parts)}; "
                        f"pass the --model the weights were trained with")
    model.load_state_dict(state)


def read_yaml(path: Path) -> Any:
    """A record's YAML file, read with the safe loader: a Python tag is an error, never executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}; the record is incomplete (rerun the step that writes it)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not plain YAML ({first}); the record is damaged or was edited") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, meta: dict, files: list[str]) -> dict:
    """Write ``record.json``: ``meta``, the format version and the SHA-256 of each listed file. Written
    last, it marks the record finished."""
    meta = {**meta, "format_version": FORMAT_VERSION,
            "files": {name: sha256_file(Path(folder) / name) for name in files}}
    write_json(Path(folder) / "record.json", meta)
    return meta


def read_manifest(folder: Path, kind: str, verify: bool = True) -> dict:
    """``record.json`` of a finished record, its format and kind checked and, with ``verify``, every
    listed file present with the SHA-256 it was written with."""
    path = Path(folder) / "record.json"
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a record manifest; the record is damaged")
    check_format(meta, path, kind)
    check_schema(meta, path, kind)
    if verify:
        for name, digest in meta.get("files", {}).items():
            file = Path(folder) / name
            if not file.is_file():
                raise UserError(f"{file} is missing; the record is incomplete (it was deleted or not copied): "
                                f"copy it back or rerun the step that wrote {folder}")
            if sha256_file(file) != digest:
                raise UserError(f"{file} does not match the SHA-256 in {path}: the record is damaged or was "
                                f"edited; rerun the step that wrote it")
    return meta


def check_format(meta: dict, path: Path, kind: str) -> None:
    version = meta.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        readable = " or ".join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)
        older = isinstance(version, int) and version < FORMAT_VERSION
        advice = "rerun the step that wrote it with this toolkit" if older else "update the toolkit"
        raise UserError(f"{path} has record format version {version!r}, this toolkit reads version {readable} "
                        f"only; {advice}")
    if meta.get("kind") != kind:
        raise UserError(f"{path} is a {meta.get('kind')!r} record, expected {kind!r}")


def _is(value, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def check_schema(meta: dict, path: Path, kind: str) -> None:
    """Every key :data:`RECORD_SCHEMA` names for ``kind``, of its type; the dataset's keys; the files a
    finished record of the kind lists, each with a SHA-256 (an emptied list would switch the check off)."""
    def damaged(what: str):
        return UserError(f"{path}: {what}; the record is damaged or was edited: rerun the step that wrote it")
    for key, expected in RECORD_SCHEMA[kind].items():
        if not _is(meta.get(key), expected):
            raise damaged(f"{key!r} is {'missing' if key not in meta else type(meta[key]).__name__}, "
                          f"not {expected.__name__}")
    for key, expected in DATASET_SCHEMA.items():
        if not _is(meta["dataset"].get(key), expected):
            raise damaged(f"the dataset's {key!r} is not {expected.__name__}")
    files = meta["files"]
    missing = [name for name in REQUIRED_FILES[kind] if name not in files]
    if missing:
        raise damaged(f"it lists no {missing[0]}")
    if not all(_is(name, str) and "/" not in name and _is(digest, str) for name, digest in files.items()):
        raise damaged("its file list holds something other than plain file names and their SHA-256")


