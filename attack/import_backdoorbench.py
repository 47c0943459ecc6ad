"""Import a BackdoorBench attack record (and the defense results under it) as a native record.

    python attack/import_backdoorbench.py --bb_record PATH/record/<name> --dataset_path DATA \\
        --save_folder_name NAME [--record_dir record]

reads ``<bb_record>/attack_result.pt`` (restricted unpickler, :mod:`attack.backdoorbench`) and its PNG
folders, checks them against the clean data at ``--dataset_path`` (dataset, image size, number of
classes, set sizes, the original labels of the poisoned samples), loads the weights strictly into the
model of that name, and writes ``record/NAME/``: the ``backdoorbench`` attack, whose
``trigger.safetensors`` holds BackdoorBench's poisoned training and test images (uint8) with their
indices, looked up by index when a defense rebuilds the sets. ``record.json`` keeps where it came from
(``source``: format, file, SHA-256, the source attack's name, the commit the format was checked
against). ACC / ASR / RA are measured here and logged beside the last row of ``attack_df.csv``.

Every ``<bb_record>/defense/<defense>/defense_result.pt`` becomes the defense output
``record/NAME/defense/bb_<defense>/`` (the model of that file, evaluated here, logged beside the last
row of BackdoorBench's ``<defense>_df.csv`` there), beside the native
defenses run later. Everything is read and checked before anything is written; a refusal is one line,
exit 2. Export: ``attack/export_backdoorbench.py``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from attack.backdoorbench import (
    ATTACK_FILE,
    ATTACK_KEYS,
    BB_COMMIT,
    DEFENSE_FILE,
    BackdoorBenchRecord,
    last_attack_row,
    last_defense_row,
    read_bb_file,
    read_split,
    state_dict,
)
from attack.base import train_trigger_function, trigger_function
from attack.record import ATTACK_FILES, backdoor_test_fingerprint
from models import create_model, list_models
from utils.backdoor import attack_labels, backdoor_test_indices, backdoor_test_set, poison_train_set
from utils.cli import cli_main
from utils.config import CONFIG_DIR, Config, resolve_device
from utils.datasets import DATASETS, get_spec, tensor_fingerprint
from utils.errors import UserError
from utils.evaluate import Evaluator
from utils.loader import Normalizer
from utils.logs import run_logger, setup_logging
from utils.metrics import der
from utils.record import load_into, read_json, read_yaml, save_tensors, sha256_file, write_yaml
from utils.report import write_csv
from utils.run import claim_run, finish_run
from utils.sources import load_dataset

DEFENSE_FILES = ["config.yaml", "model.safetensors", "metrics.csv", "summary.json"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bb_record", required=True, help="a BackdoorBench record folder holding attack_result.pt")
    p.add_argument("--dataset_path", required=True, help="the clean dataset (our loader), the one BackdoorBench used")
    p.add_argument("--save_folder_name", help="record/<name>/ receives the record (default: the folder's name)")
    p.add_argument("--record_dir", default="record")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval_batch_size", type=int, default=512)
    p.add_argument("--overwrite", action="store_true", help="replace an existing record of that name")
    return p.parse_args(argv)


def _model(obj: dict, path: Path, num_classes: int) -> torch.nn.Module:
    name = obj.get("model_name")
    if not isinstance(name, str) or name.startswith("timm/") or name not in list_models():
        raise UserError(f"{path} names model {name!r}, which this toolkit does not have; ours: "
                        f"{', '.join(list_models())}")
    if obj.get("num_classes") != num_classes:
        raise UserError(f"{path} is for {obj.get('num_classes')!r} classes, the dataset has {num_classes}")
    model = create_model(name, num_classes, pretrained=False)
    load_into(model, state_dict(obj, path), str(path))
    return model.eval()


def _rule(test, num_classes: int, path: Path) -> tuple[str, int]:
    """all2one (target) or all2all, from bd_test's backdoor and original labels."""
    if len(test.bd_labels) and (test.bd_labels == test.bd_labels[0]).all():
        return "all2one", int(test.bd_labels[0])
    if len(test.bd_labels) and torch.equal(test.bd_labels, attack_labels(test.labels, "all2all", 0, num_classes)):
        return "all2all", 0
    raise UserError(f"{path}: bd_test's backdoor labels are neither one target (all2one) nor label + 1 (all2all)")


def read_record(args):
    """Everything the import needs, read and checked: nothing is written here."""
    folder = Path(args.bb_record)
    path = folder / ATTACK_FILE
    if not path.is_file():
        raise UserError(f"{folder} holds no {ATTACK_FILE}; give --bb_record a BackdoorBench record folder "
                        f"(record/<name>/ there)")
    obj = read_bb_file(path)
    missing = [k for k in ATTACK_KEYS if k not in obj]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; not a BackdoorBench attack_result.pt")
    if obj["clean_data"] not in DATASETS:
        raise UserError(f"{path} is a record on {obj['clean_data']!r}; this toolkit has {', '.join(sorted(DATASETS))}")
    spec = get_spec(obj["clean_data"])
    size = [int(v) for v in obj["img_size"]] if isinstance(obj["img_size"], (list, tuple)) else []
    if size != [spec.image_size, spec.image_size, 3] or obj["num_classes"] != spec.num_classes:
        raise UserError(f"{path}: img_size {obj['img_size']!r} and num_classes {obj['num_classes']!r} do not match "
                        f"{spec.name} ({spec.image_size} x {spec.image_size} x 3, {spec.num_classes} classes)")
    dataset = load_dataset(spec.name, args.dataset_path, args.cache_dir)
    model = _model(obj, path, spec.num_classes)
    train = read_split(folder, obj["bd_train"], "bd_train", spec.image_size, 3)
    test = read_split(folder, obj["bd_test"], "bd_test", spec.image_size, 3)
    for split, clean in (("bd_train", dataset.train), ("bd_test", dataset.test)):
        part = train if split == "bd_train" else test
        if part.size != len(clean) or not torch.equal(clean.labels[part.index], part.labels):
            raise UserError(f"the data at {args.dataset_path} ({len(clean)} {split[3:]} images) is not the data of "
                            f"{path} ({part.size}, or other labels at its poisoned indices); pass the --dataset_path "
                            f"BackdoorBench used")
    rule, target = _rule(test, spec.num_classes, path)
    if not torch.equal(test.index, backdoor_test_indices(dataset.test.labels, rule, target, spec.num_classes)):
        raise UserError(f"{path}: bd_test is not every test sample whose label the {rule} rule changes")
    defenses = []
    for d in sorted((folder / "defense").glob(f"*/{DEFENSE_FILE}")):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", d.parent.name):
            raise UserError(f"{d}: the defense folder's name is not a plain name")
        dobj = read_bb_file(d)
        if dobj.get("model_name") != obj["model_name"]:
            raise UserError(f"{d} names model {dobj.get('model_name')!r}, the attack {obj['model_name']!r}")
        defenses.append((d, _model(dobj, d, spec.num_classes)))
    return folder, path, obj, spec, dataset, model, train, test, rule, target, defenses


def _source_attack(folder: Path) -> str:
    """The source attack's name: BackdoorBench's ``info.pickle`` (its args, read restricted) or the folder's."""
    try:
        info = read_bb_file(folder / "info.pickle")
        if isinstance(info.get("attack"), str):
            return info["attack"]
    except UserError:
        pass
    return folder.name


def main(argv=None) -> Path:
    args = parse(argv)
    setup_logging()
    logger = run_logger()
    folder, path, obj, spec, dataset, model, train, test, rule, target, defenses = read_record(args)
    name = args.save_folder_name or folder.name
    if "/" in name or name in ("", ".", ".."):
        raise UserError(f"--save_folder_name {name!r} must be a plain folder name")
    # Poisoned training samples the rule relabels; BackdoorBench's samples that keep their own label
    # while their image changed (WaNet's noise / cross samples) cannot be expressed and stay clean.
    keep = train.bd_labels == attack_labels(train.labels, rule, target, spec.num_classes)
    if not keep.all():
        logger.warning("%d poisoned training samples of %s keep a label the %s rule does not give (e.g. WaNet's "
                       "cross samples); they are imported as clean samples", int((~keep).sum()), path, rule)
    artifacts = {"train_images": train.images[keep], "train_index": train.index[keep],
                 "test_images": test.images, "test_index": test.index}
    attack = BackdoorBenchRecord
    poisoned = poison_train_set(dataset.train, artifacts["train_index"], train_trigger_function(attack, artifacts),
                                rule, target, spec.num_classes, indexed=True)
    bd_test = backdoor_test_set(dataset.test, trigger_function(attack, artifacts), rule, target, spec.num_classes,
                                indexed=True)
    device = resolve_device(args.device)
    evaluator = Evaluator(dataset.test, bd_test, Normalizer(spec.mean, spec.std, device), device=device,
                          batch_size=args.eval_batch_size)
    source = {"format": "backdoorbench", "file": ATTACK_FILE, "sha256": sha256_file(path), "folder": folder.name,
              "attack": _source_attack(folder), "commit": BB_COMMIT, "dropped_train_samples": int((~keep).sum())}
    proto = read_yaml(CONFIG_DIR / "attack" / "prototype" / f"{spec.name}.yaml")
    settings = {**proto, "attack": attack.name, "model": obj["model_name"], "dataset": spec.name,
                "attack_label_trans": rule, "attack_target": target, "save_folder_name": name,
                "pratio": round(float(len(artifacts["train_index"])) / len(dataset.train), 6),
                "source_attack": source["attack"], "overwrite": args.overwrite, "resume": False,
                "record_dir": args.record_dir, "dataset_path": str(args.dataset_path)}
    cfg = Config(**settings)
    out_dir = Path(args.record_dir) / name
    with claim_run(out_dir, cfg) as run, run.writing(f"the import of {folder} -> {out_dir}"):
        work = run.work
        write_yaml(work / "config.yaml", run.config)
        save_tensors(work / "trigger.safetensors", artifacts)
        save_tensors(work / "indices.safetensors", {"train_poison_index": artifacts["train_index"],
                                                    "test_backdoor_index": bd_test.index})
        save_tensors(work / "model.safetensors", model.state_dict())
        found = evaluator(model)
        bb = last_attack_row(folder)
        write_csv([{"epoch": 0, **{k: found[k] for k in ("clean_acc", "asr", "ra")},
                    **{f"backdoorbench_{k}": v for k, v in bb.items()}}], work / "metrics.csv")
        summary = {"clean_acc": found["clean_acc"], "asr": found["asr"], "ra": found["ra"], "epochs": 0,
                   "device": str(device), "imported_from": f"{folder.name}/{ATTACK_FILE}",  # no absolute path
                   **{f"backdoorbench_{k}": v for k, v in bb.items()}}
        finish_run(work, summary, {
            "kind": "attack", "attack": attack.name, "model": obj["model_name"], "source": source,
            "dataset": {"name": spec.name, "fingerprint": dataset.fingerprint, "num_classes": spec.num_classes,
                        "image_size": spec.image_size, "train_size": len(dataset.train),
                        "test_size": len(dataset.test), "train_subset": None},
            "attack_label_trans": rule, "attack_target": target,
            "poisoned_train_fingerprint": tensor_fingerprint(poisoned.images, poisoned.labels),
            "backdoor_test_fingerprint": backdoor_test_fingerprint(bd_test)}, ATTACK_FILES)
    logger.info("imported %s (%s on %s, %s target %d): clean_acc=%.4f asr=%.4f ra=%.4f; BackdoorBench's last "
                "attack_df.csv row: %s", path, source["attack"], spec.name, rule, target, found["clean_acc"],
                found["asr"], found["ra"], ", ".join(f"{k}={v:.4f}" for k, v in bb.items()) or "none")
    record_sha = sha256_file(out_dir / "record.json")
    for d, dmodel in defenses:
        _import_defense(d, dmodel, out_dir, name, record_sha, cfg, evaluator, found, args.overwrite)
    logger.info("defend it with, e.g., python defense/d3.py --result_file %s%s", name,
                "" if Path(args.record_dir) == Path("record") else f" --record_dir {args.record_dir}")
    return out_dir


def _import_defense(path: Path, model, record_dir: Path, name: str, record_sha: str, cfg: Config, evaluator,
                    before: dict, overwrite: bool) -> None:
    defense = f"bb_{path.parent.name}"
    out_dir = record_dir / "defense" / defense
    dcfg = Config(**{**vars(cfg), "defense": defense, "result_file": name, "overwrite": overwrite})
    with claim_run(out_dir, dcfg) as run, run.writing(f"the import of {path} -> {out_dir}"):
        work = run.work
        write_yaml(work / "config.yaml", {**run.config, "source": {"format": "backdoorbench", "file": str(path.name),
                                                                    "sha256": sha256_file(path)}})
        save_tensors(work / "model.safetensors", model.state_dict())
        after = evaluator(model)
        row = last_defense_row(path)  # BackdoorBench's own figures, kept beside ours
        bb = {f"backdoorbench_{k}": v for k, v in row.items()}
        write_csv([{"epoch": 0, **{k: after[k] for k in ("clean_acc", "asr", "ra")}, **bb}], work / "metrics.csv")
        summary = {"clean_acc": after["clean_acc"], "asr": after["asr"], "ra": after["ra"],
                   "der": der(before["clean_acc"], before["asr"], after["clean_acc"], after["asr"]),
                   "attack_clean_acc": before["clean_acc"], "attack_asr": before["asr"], "attack_ra": before["ra"],
                   "epochs": 0, "imported_from": "/".join(path.parts[-4:]), **bb}  # <folder>/defense/<d>/<file>
        meta = {"kind": "defense", "defense": defense, "model": cfg.model, "attack_record": name,
                "attack_record_sha256": record_sha,
                "dataset": _read_dataset(record_dir), "source": {"format": "backdoorbench", "file": DEFENSE_FILE,
                                                                 "sha256": sha256_file(path)}}
        finish_run(work, summary, meta, DEFENSE_FILES)
    run_logger().info("imported %s as %s: clean_acc=%.4f asr=%.4f ra=%.4f; BackdoorBench's last %s_df.csv row: %s",
                      path, out_dir, after["clean_acc"], after["asr"], after["ra"], path.parent.name,
                      ", ".join(f"{k}={v:.4f}" for k, v in row.items()) or "none")


def _read_dataset(record_dir: Path) -> dict:

    return read_json(record_dir / "record.json")["dataset"]


if __name__ == "__main__":
    cli_main(main)
