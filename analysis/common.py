"""What the analysis scripts share: the records and defense outputs they read (finished and verified,
named by flags, each bad name one clear line), the attacked / defended model pairs, the test sets, and
where their CSVs and PNGs go."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from attack.record import AttackRecord, load_attack_record, load_model, load_train_set, rebuild_backdoor_test
from utils.backdoor import BackdoorTestSet
from utils.datasets import Dataset
from utils.errors import UserError
from utils.output import describe_unfinished, is_finished
from utils.record import read_manifest
from utils.report import write_csv
from utils.sources import load_dataset

DEFENSE_DIR = Path(__file__).resolve().parents[1] / "defense"
NOT_DEFENSES = {"__init__", "base", "runner"}
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def split_names(value: str, flag: str) -> list[str]:
    """``a,b,c`` as a list; an empty name (``a,,b``) or a repeated one is refused."""
    names = [s.strip() for s in str(value).split(",")]
    if not value or any(not n for n in names):
        raise UserError(f"--{flag} {value!r}: give one name or several joined by commas, e.g. --{flag} a,b")
    if len(set(names)) != len(names):
        raise UserError(f"--{flag} {value!r} names one twice")
    return names


def defense_scripts() -> list[str]:
    return sorted(p.stem for p in DEFENSE_DIR.glob("*.py") if p.stem not in NOT_DEFENSES)


def open_record(record_dir: str, name: str) -> AttackRecord:
    if not FOLDER_NAME.fullmatch(name):
        raise UserError(f"--result_file {name!r}: give the name of a record folder under {record_dir}/")
    return load_attack_record(Path(record_dir) / name)


def defense_output(record: AttackRecord, name: str) -> Path:
    """``<record>/defense/<name>/``, finished, verified and made from this very record. ``name`` is a
    defense script's name or a ``--save_name`` variant present in the record."""
    out = record.dir / "defense" / name
    known = defense_scripts()
    if not FOLDER_NAME.fullmatch(name) or (name not in known and not out.is_dir()):
        raise UserError(f"--defense {name!r} is no defense of this toolkit nor an output folder under "
                        f"{record.dir}/defense/; choose one of: {', '.join(known)}")
    if not is_finished(out):
        script = name if name in known else "<defense>"
        raise UserError(f"no finished defense output at {out}: {describe_unfinished(out)}; run python "
                        f"defense/{script}.py --result_file {record.dir.name} --record_dir {record.dir.parent} first")
    meta = read_manifest(out, "defense")
    if meta.get("attack_record_sha256") != record.sha256:
        raise UserError(f"{out} was made from an earlier run of the attack record {record.dir} (its record.json "
                        f"changed since): rerun the defense with --overwrite")
    return out


def model_pair(record: AttackRecord, out: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The attacked model (theta_init) and the defended one, both verified, on the CPU in eval mode;
    refused with one line when their parameters and buffers do not match one to one."""
    init, defended = load_model(record.dir), load_model(out)
    a, b = init.state_dict(), defended.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        wrapper = read_manifest(out, "defense").get("model_wrapper")
        why = f" (it is wrapped in {wrapper})" if wrapper else ""
        raise UserError(f"the model in {out}{why} does not have the attacked model's parameters and buffers one to "
                        f"one, so the two cannot be compared weight by weight")
    return init, defended


@dataclass
class EvalSets:
    dataset: Dataset
    backdoor: BackdoorTestSet


def evaluation_sets(record: AttackRecord, dataset_path: str, cache_dir: str | None) -> EvalSets:
    """The clean test set the attack used (fingerprint-checked) and its backdoor test set rebuilt."""
    dataset = load_dataset(record.meta["dataset"]["name"], dataset_path, cache_dir)
    if dataset.fingerprint != record.meta["dataset"]["fingerprint"]:
        raise UserError(f"the data at {dataset_path} is not the data the attack {record.dir} used; pass the "
                        f"--dataset_path the attack used")
    dataset = load_train_set(record, dataset)
    return EvalSets(dataset, rebuild_backdoor_test(record.meta, record.dir, dataset, cache_dir))


def output_prefix(out: str | None, records: list[AttackRecord], stem: str) -> Path:
    """``--out PREFIX`` as given, else ``<first record>/analysis/<stem>`` (the other records' names appended)."""
    if out is not None:
        prefix = Path(out)
        if not prefix.name or prefix.is_dir():
            raise UserError(f"--out {out!r} is a folder; give a path prefix such as {Path(out) / stem}")
        return prefix
    others = "+".join(r.dir.name for r in records[1:])
    return records[0].dir / "analysis" / (stem + (f"__{others}" if others else ""))


def write_outputs(prefix: Path, rows: list[dict], fig, save_figure) -> tuple[Path, Path]:
    """``<prefix>.csv`` and ``<prefix>.png``, each written atomically."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv, png = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".png")
    write_csv(rows, csv)
    save_figure(fig, png)
    return csv, png


def optional_import(module: str, package: str, extra: str):
    """``module`` of an optional dependency, or one line naming the extra that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{package} is not installed (an optional extra); install it with "
                        f"pip install -e '.[{extra}]'") from None


def add_evaluation_arguments(p, batch_help: str) -> None:
    """The flags of an analysis that runs the record's models on its data: where the data is, the
    device, the batch size and where the outputs go."""
    p.add_argument("--dataset_path", default="./data", help="the data the attack used")
    p.add_argument("--cache_dir", default=None, help="decoded datasets' cache (unset: $BACKDOOR_CACHE_DIR or ~/.cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch_size", type=int, default=512, help=batch_help)
    p.add_argument("--out", default=None, help="write PREFIX.csv and PREFIX.png instead of the default")


def check_evaluation_arguments(args) -> None:
    """One line for a value of :func:`add_evaluation_arguments`' flags that cannot work."""
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: give a positive number")
