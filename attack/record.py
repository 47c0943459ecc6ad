"""Reading attack records: the verified record, the training set a defender holds, the poisoned
training set and the backdoor test set rebuilt from the stored trigger (cached when slow to make)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from attack.base import get_attack, train_trigger_function, trigger_function
from models import create_model
from models.defensive import wrap_model
from utils.backdoor import BackdoorTestSet, backdoor_test_set, poison_train_set, stream_generator
from utils.config import Config
from utils.datasets import Dataset, ImageSet, get_spec, tensor_fingerprint
from utils.errors import UserError
from utils.logs import run_logger
from utils.output import describe_unfinished, is_finished
from utils.record import (
    REQUIRED_FILES,
    load_into,
    load_tensors,
    read_json,
    read_manifest,
    read_summary,
    read_yaml,
    save_tensors,
    sha256_file,
)
from utils.sources import cache_root

# The files of an attack record whose SHA-256 record.json holds (logs and plots are for people).
ATTACK_FILES = list(REQUIRED_FILES["attack"])


def backdoor_test_fingerprint(bd: BackdoorTestSet) -> str:
    return tensor_fingerprint(bd.images, bd.target_labels, bd.true_labels, bd.index)


@dataclass
class AttackRecord:
    """A finished attack record, verified: every file it lists has the SHA-256 it was written with."""
    dir: Path
    meta: dict
    summary: dict
    config: dict
    sha256: str  # of record.json, which holds the others' hashes: names this attack run


def load_attack_record(record_dir: Path) -> AttackRecord:
    """The attack record at ``record_dir``, with one clear line for each way it can be unusable."""
    if not is_finished(record_dir):
        advice = ("rerun the attack that wrote it with --overwrite" if record_dir.is_dir() else
                  f"create one with, e.g., python attack/badnet.py --save_folder_name {record_dir.name}")
        if (record_dir / "attack_result.pt").is_file():  # a BackdoorBench record: import it first
            advice = (f"it holds a BackdoorBench attack_result.pt: import it with python attack/import_backdoorbench.py"
                      f" --bb_record {record_dir} --dataset_path DATA --save_folder_name NAME, then defend NAME")
        raise UserError(f"no finished attack record at {record_dir}: {describe_unfinished(record_dir)}; {advice}")
    meta = read_manifest(record_dir, "attack")
    config = read_yaml(record_dir / "config.yaml")
    if not isinstance(config, dict):
        raise UserError(f"{record_dir / 'config.yaml'} does not hold a mapping of settings; the record is damaged")
    get_attack(meta["attack"])  # a name this toolkit has, refused before anything is written
    data = meta["dataset"]
    spec = get_spec(data["name"])
    agree = [("config.yaml's model", config.get("model"), meta["model"]),
             ("config.yaml's dataset", config.get("dataset"), data["name"]),
             (f"{spec.name}'s number of classes", spec.num_classes, data["num_classes"]),
             (f"{spec.name}'s image size", spec.image_size, data["image_size"])]
    for what, expected, named in agree:
        if expected != named:
            raise UserError(f"{record_dir / 'record.json'} names {named!r} where {what} is {expected!r}; the record "
                            f"is damaged or was edited: rerun the attack that wrote it")
    summary = read_summary(record_dir / "summary.json")
    check_record_tensors(record_dir, meta)
    return AttackRecord(record_dir, meta, summary, config, sha256_file(record_dir / "record.json"))


def check_record_tensors(record_dir: Path, meta: dict) -> None:
    """The record's tensor files parse as safetensors (a pickle in their place is refused, never
    run) and its indices are 1-D integer tensors: a file whose hash was re-sealed after an edit is
    caught here, before the defense claims its output, even where this defense never reads it."""
    load_tensors(record_dir / "trigger.safetensors")
    path = record_dir / "indices.safetensors"
    indices = load_tensors(path)
    needed = ["train_poison_index", "test_backdoor_index"]
    if meta["dataset"].get("train_subset") is not None:
        needed.append("train_subset_index")
    for key in needed:
        index = indices.get(key)
        if index is None or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise UserError(f"{path} holds no {key} as a 1-D integer tensor; the record is damaged or was edited: "
                            f"rerun the attack that wrote it")


@contextmanager
def stored_trigger(record_dir: Path, attack, files: str = "trigger.safetensors"):
    """Apply the record's stored trigger (and indices): an artifact missing or of the wrong shape (an
    edited file, its hash re-sealed) becomes one line naming the record, not a traceback."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot apply the {attack.name} trigger stored in {record_dir}/{files} ({type(e).__name__}: "
                        f"{first}); the record is damaged or was edited, or the attack code changed: rerun the "
                        f"attack that wrote it") from None


def load_train_set(record: AttackRecord, dataset: Dataset) -> Dataset:
    """The dataset as the attack trained on it: its training subset when it used ``--train_subset``."""
    if record.meta["dataset"].get("train_subset") is None:
        return dataset
    subset = load_tensors(record.dir / "indices.safetensors")["train_subset_index"]
    return replace(dataset, train=dataset.train.subset(subset))


def poisoned_train_set(record: AttackRecord, dataset: Dataset) -> ImageSet:
    """The training set as the victim held it (poisoned samples included, unmarked), rebuilt from the
    record's trigger artifacts and poison indices and checked against its fingerprint. ``dataset`` is
    the data the attack trained on (:func:`load_train_set`).

    A training-controlled attack (WaNet, Input-aware) poisons a fresh share of every batch, so there is no one
    poisoned set; as BackdoorBench does after training, the snapshot is one unshuffled pass of
    ``batch_size`` batches through the attack's poisoning rule (:meth:`Attack.snapshot_hook`), its
    random draws from the record's seed, so it is rebuilt exactly."""
    meta, attack = record.meta, get_attack(record.meta["attack"])
    artifacts = load_tensors(record.dir / "trigger.safetensors")
    poison_index = load_tensors(record.dir / "indices.safetensors")["train_poison_index"]
    with stored_trigger(record.dir, attack, "{trigger,indices}.safetensors"):
        poisoned = poison_train_set(dataset.train, poison_index, train_trigger_function(attack, artifacts),
                                    meta["attack_label_trans"], meta["attack_target"], dataset.spec.num_classes,
                                    relabel=not attack.clean_label, indexed=attack.indexed_trigger)
    if tensor_fingerprint(poisoned.images, poisoned.labels) != meta["poisoned_train_fingerprint"]:
        raise UserError(f"the poisoned training set rebuilt from {record.dir} does not match the one the attack "
                        f"trained on; the record or the attack code changed")
    cfg = Config(**record.config)
    if attack.batch_hook(cfg, artifacts, dataset.spec) is None and not attack.learns_trigger:
        return poisoned
    rule = attack.snapshot_hook(cfg, artifacts, dataset.spec)
    if rule is None:
        raise UserError(f"the attack {attack.name} poisons a fresh share of every training batch and defines no "
                        f"fixed snapshot of its poisoned training set, which this defense needs")
    generator = stream_generator(cfg.random_seed, "poisoned-train-snapshot")
    parts = [rule(poisoned.images[i:i + cfg.batch_size], poisoned.labels[i:i + cfg.batch_size], generator)
             for i in range(0, len(poisoned), cfg.batch_size)]
    images = torch.cat([x.float() for x, _ in parts]).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, torch.cat([y for _, y in parts]))


def rebuild_backdoor_test(meta: dict, record_dir: Path, dataset: Dataset, cache_dir=None) -> BackdoorTestSet:
    """The record's backdoor test set, rebuilt from its trigger artifacts and checked against its fingerprint.

    A learned trigger's exact rebuild is slow on a CPU (Input-aware: two generators in float64 per
    test image), so its result is kept in the cache (``--cache_dir`` or the default), named by the
    record's fingerprint of that set; a cached set is used only when it has that fingerprint."""
    attack = get_attack(meta["attack"])
    expected = meta["backdoor_test_fingerprint"]
    cache = cached_set_path(cache_dir, expected) if attack.cache_rebuilt_test_set else None
    bd = load_cached_set(cache, expected) if cache is not None else None
    if bd is None:
        artifacts = load_tensors(record_dir / "trigger.safetensors")
        with stored_trigger(record_dir, attack):
            bd = backdoor_test_set(dataset.test, trigger_function(attack, artifacts), meta["attack_label_trans"],
                                   meta["attack_target"], dataset.spec.num_classes, indexed=attack.indexed_trigger)
        if backdoor_test_fingerprint(bd) != expected:
            raise UserError(f"the backdoor test set rebuilt from {record_dir} does not match the one the attack "
                            f"used; the record or the attack code changed")
        if cache is not None:
            store_cached_set(cache, bd)
    return bd


def cached_set_path(cache_dir, fingerprint: str) -> Path:
    base = cache_root(cache_dir)
    return base / "backdoor_test_sets" / f"{fingerprint}.safetensors"


def load_cached_set(path: Path, fingerprint: str) -> BackdoorTestSet | None:
    if not path.is_file():
        return None
    try:
        t = load_tensors(path)
        bd = BackdoorTestSet(t["images"], t["target_labels"], t["true_labels"], t["index"])
    except (UserError, KeyError):
        return None
    return bd if backdoor_test_fingerprint(bd) == fingerprint else None


def store_cached_set(path: Path, bd: BackdoorTestSet) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"images": bd.images, "target_labels": bd.target_labels, "true_labels": bd.true_labels,
                            "index": bd.index})
    except OSError as e:
        run_logger().warning("could not cache the rebuilt backdoor test set at %s (%s)", path, e)


def load_model(folder: Path) -> torch.nn.Module:
    """The model of a finished attack record or defense output, verified and rebuilt from data only:
    the model name (and, for a wrapped model such as PDB's, the wrapper) from its ``record.json``, the
    weights and buffers from ``model.safetensors``, loaded strictly. No code in the folder runs."""
    manifest = Path(folder) / "record.json"
    found = read_json(manifest) if manifest.is_file() else {}
    if not isinstance(found, dict):
        raise UserError(f"{manifest} is not a record manifest; the record is damaged")
    kind = found.get("kind")
    if kind not in ("attack", "defense"):
        raise UserError(f"{folder} holds no finished attack record or defense output (no record.json of either kind)")
    meta = read_manifest(folder, kind)
    data = meta["dataset"]
    try:
        model = create_model(meta["model"], data["num_classes"], pretrained=False)  # the saved weights follow
        if meta.get("model_wrapper"):
            model = wrap_model(meta["model_wrapper"], model, data["num_classes"], data["image_size"])
    except UserError as e:  # a name this toolkit does not have: say which file names it
        raise UserError(f"{manifest}: {e}; the record is damaged or was written by another toolkit") from None
    load_into(model, load_tensors(Path(folder) / "model.safetensors"), str(Path(folder) / "model.safetensors"))
    return model.eval()
