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
import secrets
import zipfile
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
    """Write ``path`` through ``.<name>.<pid>-<random>.tmp`` beside it, renamed over it once complete; such
    files a killed writer left (its pid gone) are removed first. The file is created as any tool creates
    one (0666 less the umask: 0644 under umask 022, not ``mkstemp``'s 0600) and keeps that mode whatever
    the writer does (safetensors writes 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for old in path.parent.iterdir():
        pid = old.name[len(prefix):-len(".tmp")].split("-")[0]
        if old.name.startswith(prefix) and old.name.endswith(".tmp") and pid.isdigit() and not pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    tmp = path.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777  # 0666 as the umask leaves it
        os.close(fd)
        write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


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
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"missing file {path}; the record is incomplete (re-run the step that writes it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # bytes flipped or replaced: not even text
        raise UserError(f"{path} is not valid JSON ({_first_line(e)}); the record is damaged") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); the record is damaged or unreadable") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# The figures every finished run's summary.json reports, as fractions: what the tables read.
SUMMARY_KEYS = ("clean_acc", "asr", "ra")


def read_summary(path: Path) -> dict:
    """A finished run's ``summary.json``: a mapping with each of :data:`SUMMARY_KEYS` a number."""
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise UserError(f"{path} holds a {type(summary).__name__}, not a mapping of results; the record is damaged "
                        f"or was edited: rerun the step that wrote it")
    for key in SUMMARY_KEYS:
        if not isinstance(summary.get(key), (int, float)) or isinstance(summary.get(key), bool):
            raise UserError(f"{path}: {key!r} is {type(summary.get(key)).__name__ if key in summary else 'missing'}, "
                            f"not a number; the record is damaged or was edited: rerun the step that wrote it")
    return summary


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (which cannot carry code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}; the record is incomplete (re-run the step that writes it)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        if is_torch_pickle(path):
            raise UserError(f"{path} is a torch pickle, not a safetensors file: refused unread, since unpickling "
                            f"can run code; the record is damaged or was edited") from None
        raise UserError(f"{path} is not a valid safetensors file ({e}); the record is damaged") from None


def is_torch_pickle(path: Path) -> bool:
    """Whether ``path`` starts as ``torch.save`` writes (a zip archive, or a legacy pickle stream)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a file that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    _check_zip_crc(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refused to load {path}: it is not a plain weights file and could run code when "
                        f"unpickled ({_unpickler_reason(e)}); use a trusted file saved as a state_dict") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong format, ...
        said = _first_line(e).split(". ")[0] if str(e).strip() else ""  # torch's first sentence says it
        raise UserError(f"cannot read {path} as a PyTorch weights file ({type(e).__name__}{': ' * bool(said)}{said}); "
                        f"the file is damaged") from None


def _unpickler_reason(e: Exception) -> str:
    """What torch's restricted unpickler refused ("Unsupported global: GLOBAL io.open ..."), without its
    advice to load the file unrestricted."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        return text.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0].splitlines()[0]
    return _first_line(e)


def _check_zip_crc(path: Path) -> None:
    """A torch zip file's entries against the CRC-32 each was written with: ``torch.load`` does not
    check them, so a flipped byte in a tensor would load silently. Entries saved without a CRC (0,
    ``torch.serialization.set_crc32_options(False)``) are skipped; a legacy (non-zip) file too."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC:
                    with archive.open(info) as entry:
                        while entry.read(1 << 20):
                            pass
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {path} as a PyTorch weights file ({_first_line(e)}); the file is damaged") \
            from None


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
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a Python tag, broken syntax, bytes that are not text
        raise UserError(f"{path} is not plain YAML ({_first_line(e)}); the record is damaged or was edited") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); the record is damaged or unreadable") from None


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


