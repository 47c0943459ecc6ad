"""Export a native attack record (and its defense outputs) in BackdoorBench's record layout.

    python attack/export_backdoorbench.py --result_file NAME --dataset_path DATA --out DIR [--record_dir record]

writes ``DIR/attack_result.pt`` (model_name, num_classes, the state dict, data_path, img_size,
clean_data, bd_train / bd_test dataset states: plain dicts, tensors and numpy arrays, no class of
this toolkit, readable by :func:`attack.backdoorbench.read_bb_file`), the poisoned images as PNGs in
BackdoorBench's layout ``DIR/bd_train_dataset/<original label>/<index>.png`` and
``DIR/bd_test_dataset/...``, and ``DIR/defense/<defense>/defense_result.pt`` for each finished defense
output (model_name, num_classes, model); the state dicts are in the model's own ``state_dict()`` order,
since BackdoorBench's loader names the tensors by position. The record is verified and its poisoned sets rebuilt
(fingerprint-checked) from the clean data at ``--dataset_path``. Paths inside the file read
``./record/<DIR's name>/...``, as BackdoorBench writes them: put DIR under BackdoorBench's
``record/`` to use it there. A training-controlled attack (WaNet, Input-aware) exports the samples
of its poison index only; a record made with ``--train_subset`` or a wrapped model is refused.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from attack.backdoorbench import ATTACK_FILE, DEFENSE_FILE, plain_state, split_state, write_bb_file, write_pngs
from attack.record import load_attack_record, poisoned_train_set, rebuild_backdoor_test
from models import create_model
from utils.cli import cli_main
from utils.errors import UserError
from utils.logs import run_logger, setup_logging
from utils.output import is_finished
from utils.record import load_tensors, read_manifest
from utils.sources import load_dataset


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--result_file", required=True, help="the attack record under --record_dir")
    p.add_argument("--record_dir", default="record")
    p.add_argument("--dataset_path", required=True, help="the clean data the record was made from")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--out", required=True, help="the BackdoorBench record folder to write (must not exist)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse(argv)
    setup_logging()
    record = load_attack_record(Path(args.record_dir) / args.result_file)
    meta, out = record.meta, Path(args.out)
    data = meta["dataset"]
    if data.get("train_subset") is not None:
        raise UserError(f"{record.dir} was trained on a --train_subset; BackdoorBench's format holds whole sets only")
    if meta.get("model_wrapper"):
        raise UserError(f"{record.dir}'s model is wrapped ({meta['model_wrapper']}); BackdoorBench has no such model")
    if out.exists():
        raise UserError(f"{out} exists; choose a new folder for the export")
    defenses = []
    for d in sorted((record.dir / "defense").glob("*/record.json")):
        if not is_finished(d.parent):
            continue
        dmeta = read_manifest(d.parent, "defense")
        if dmeta.get("model_wrapper") or dmeta["attack_record_sha256"] != record.sha256:
            run_logger().warning("not exported: %s (a wrapped model or an earlier run's defense)", d.parent)
            continue
        defenses.append((d.parent.name, load_tensors(d.parent / "model.safetensors")))
    dataset = load_dataset(data["name"], args.dataset_path, args.cache_dir)
    if dataset.fingerprint != data["fingerprint"]:
        raise UserError(f"the data at {args.dataset_path} is not the data of {record.dir}; pass the one it used")
    bd = rebuild_backdoor_test(meta, record.dir, dataset, args.cache_dir)
    poisoned = poisoned_train_set(record, dataset)
    index = load_tensors(record.dir / "indices.safetensors")["train_poison_index"].long().sort().values
    order = bd.index.argsort()
    bd_index, bd_images = bd.index[order], bd.images[order]
    name, size, num_classes = out.name, data["image_size"], data["num_classes"]
    keys = list(create_model(meta["model"], num_classes, pretrained=False).state_dict())  # the model's own order
    obj = {"model_name": meta["model"], "num_classes": num_classes,
           "model": plain_state(load_tensors(record.dir / "model.safetensors"), keys, record.dir / "model.safetensors"),
           "data_path": f"./data/{data['name']}", "img_size": [size, size, 3], "clean_data": data["name"],
           "bd_train": split_state(name, "train", len(dataset.train), index, poisoned.labels[index],
                                   dataset.train.labels[index]),
           "bd_test": split_state(name, "test", len(dataset.test), bd_index, bd.target_labels[order],
                                  bd.true_labels[order])}
    states = [(dname, plain_state(state, keys, record.dir / "defense" / dname / "model.safetensors"))
              for dname, state in defenses]  # all checked before anything is written
    out.mkdir(parents=True)
    write_pngs(out, "train", index, poisoned.images[index], dataset.train.labels[index])
    write_pngs(out, "test", bd_index, bd_images, bd.true_labels[order])
    for dname, state in states:
        write_bb_file(out / "defense" / dname / DEFENSE_FILE,
                      {"model_name": meta["model"], "num_classes": num_classes, "model": state})
    write_bb_file(out / ATTACK_FILE, obj)  # last: a folder without it is no record
    run_logger().info("exported %s as a BackdoorBench record: %s (%d poisoned training, %d backdoor test images, "
                      "%d defense result(s))", record.dir, out, len(index), len(bd_index), len(defenses))
    return out


if __name__ == "__main__":
    cli_main(main)
