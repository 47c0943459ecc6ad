"""The defense runner: resolve and check the flags, load and verify the attack record, hand the
defense the model and the data its declaration holds, report each epoch, and write the output."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from attack.record import AttackRecord, load_attack_record, load_train_set, poisoned_train_set, rebuild_backdoor_test
from defense.base import DefenderData, Defense, read_index_file, reserved_indices
from models import create_model, new_model
from utils.checkpoint import CHECKPOINT, Checkpoint
from utils.config import (CONFIG_DIR, add_common_arguments, check_range, check_training, new_parser, require,
                          resolve_config, resolve_device, seed_everything)
from utils.datasets import ImageSet, get_spec
from utils.device import place_model
from utils.errors import UserError
from utils.evaluate import Evaluator
from utils.flags import INHERITED_KEYS, portable
from utils.loader import Normalizer
from utils.logs import setup_logging
from utils.metrics import der
from utils.plots import save_plot
from utils.record import load_into, load_tensors, save_tensors, write_yaml
from utils.report import EpochReporter, announce_plan, write_csv
from utils.reserve import read_reserve_source, reserve_set
from utils.run import add_resume_argument, claim_run, finish_run, log_ignored, open_log
from utils.sources import load_dataset
from utils.train import EpochHook

CPU_HINT = ("the README's quick start defends a narrow model in a few minutes: --epochs 20 --eval_every 5 "
            "(evaluation of the full test sets is a large share of a short defense on a CPU)")


# The files of a defense output whose SHA-256 its record.json holds.
DEFENSE_FILES = ["config.yaml", "reserved_index.safetensors", "model.safetensors", "metrics.csv", "summary.json"]


class DefenseReport(EpochHook):
    """The ``report`` a defense receives: it logs and checkpoints each epoch through ``fit`` and
    returns nothing, so no metric reaches the defense. A defense also tells it what to keep beside
    the model: log lines, tensors (mask values, reversed triggers), plots and summary entries."""

    def __init__(self, reporter: EpochReporter, work: Path, logger):
        # Only the reporter's methods are kept, not the reporter: no attribute of the report leads
        # to the evaluator and its test sets (tests walk the objects purify receives).
        self._epoch_end, self._start = reporter.__call__, reporter.start
        self._restore, self._save = reporter.restore, reporter.save
        self._work, self._logger = work, logger
        self._files: list[str] = []  # tensors written, hashed into record.json
        self._notes: dict = {}  # entries for summary.json

    def __call__(self, epoch: int, stats: dict) -> None:
        self._epoch_end(epoch, stats)

    def start(self, stage: str, epochs: int, model: torch.nn.Module) -> None:
        self._start(stage, epochs, model)

    def restore(self, stage: str, objects: dict) -> int:
        return self._restore(stage, objects)

    def save(self, stage: str, epoch: int, objects: dict) -> None:
        self._save(stage, epoch, objects)

    def log(self, message: str, *args) -> None:
        self._logger.info(message, *args)

    def note(self, **values) -> None:
        """Entries for ``summary.json`` (numbers, strings, lists): what a defense decided."""
        self._notes.update(values)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_tensors(self._work / name, {k: v.detach().cpu().clone() for k, v in tensors.items()})  # own memory each
        if name not in self._files:
            self._files.append(name)

    def save_image(self, name: str, image: torch.Tensor) -> None:
        """A [C, H, W] image with values in [0, 1] as a PNG (a reversed trigger, for people)."""
        from PIL import Image
        array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        tmp = self._work / f".{name}.tmp.png"
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(tmp)
        tmp.replace(self._work / name)

    def save_plot(self, name: str, x: list, series: dict[str, list], *, xlabel: str, ylabel: str) -> None:
        save_plot(self._work / name, x, series, xlabel=xlabel, ylabel=ylabel)


def output_name(save_name: str | None, defense: str) -> str:
    """The defense's output folder name: ``--save_name`` when given (checked to be one plain folder
    name), else the script's name."""
    if save_name is None:
        return defense
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", save_name):
        raise UserError(f"--save_name {save_name!r}: give one folder name of letters, digits, '_', '-' and '.' "
                        f"(e.g. {defense}_variant)")
    return save_name


def defense_parser(defense: Defense):
    """The command line of ``defense/<name>.py``: the common flags, the defense group's, the defense's own."""
    name = defense.name
    parser = new_parser(defense.description)
    add_common_arguments(parser)
    g = parser.add_argument_group("defense")
    g.add_argument("--result_file", type=str, help="name of the attack record under --record_dir")
    g.add_argument("--ratio", type=float, help="fraction of the clean training set the defender holds")
    g.add_argument("--index", type=str,
                   help="file of training-set indices the defender holds (overrides --ratio); with "
                        "--reserve_dataset_path, indices of that set")
    g.add_argument("--reserve_dataset_path", type=str,
                   help="the defender's clean data from another labelled set, a folder or .zip of <class>/<image> "
                        "in the record's classes and image size (e.g. generated images; the D3 paper's Table 4) "
                        "instead of the training set; --ratio then counts that set's images")
    add_resume_argument(g)
    g.add_argument("--save_name", type=str,
                   help=f"output folder under <record>/defense/ (default: {name}); another name keeps a variant "
                        f"(other settings) beside the default run, as its own column in the tables")
    if defense.add_arguments is not None:
        defense.add_arguments(parser.add_argument_group(name))
    return parser


def run_defense(defense: Defense, argv=None) -> Path:
    """Resolve the config, load the record, hand the defense the model and the data its declaration
    holds (:class:`defense.base.Defense`), write the defense output."""
    name, holds = defense.name, defense.holds
    parser = defense_parser(defense)
    base = CONFIG_DIR / "defense" / name / "config.yaml"
    loaded: list[AttackRecord] = []

    def layers(args: dict) -> list:
        if "result_file" not in args:
            raise UserError("missing --result_file: name the attack record to defend (record/<name>/)")
        loaded.append(load_attack_record(Path(args.get("record_dir", "record")) / args["result_file"]))
        inherited = {k: loaded[0].config[k] for k in INHERITED_KEYS if k in loaded[0].config}
        return [(loaded[0].dir / "config.yaml", inherited)] + ([base] if base.is_file() else [])

    dropped: list[str] = []
    cfg = resolve_config(parser, layers, argv, ignored=defense.ignored_flags, dropped=dropped)
    require(cfg, "ratio", "random_seed")  # no "epochs": a defense may count its work otherwise (ANP: batches)
    check_training(cfg)
    index = None
    if cfg.index:
        if holds != "reserve":
            raise UserError(f"--index: {name} trains a new model on the poisoned training set as given and holds "
                            f"no reserve of clean data; leave --index out")
        index = read_index_file(cfg.index)
    else:
        check_range("ratio", cfg.ratio, 0.0, 1.0)
    if cfg.reserve_dataset_path and holds != "reserve":
        raise UserError(f"--reserve_dataset_path: {name} trains a new model on the poisoned training set as given and "
                        f"holds no reserve of clean data; leave --reserve_dataset_path out")
    cfg.defense = name
    setup_logging()
    log_ignored(name, dropped, defense.ignored_flags)
    record = loaded[0]
    meta = record.meta
    if cfg.dataset != meta["dataset"]["name"]:
        raise UserError(f"--dataset {cfg.dataset} differs from the record's {meta['dataset']['name']}")
    reserve = None
    if cfg.reserve_dataset_path:  # read before the output is claimed: its fingerprint is a setting of the run
        reserve = read_reserve_source(cfg.reserve_dataset_path, get_spec(cfg.dataset))
        cfg.reserve_fingerprint = reserve.fingerprint
    device = resolve_device(cfg.device)

    # Everything that can refuse the run is checked before the slow work and before any write.
    out_dir = record.dir / "defense" / output_name(cfg.save_name, name)
    with claim_run(out_dir, cfg) as run:
        work, checkpoint = run.work, run.checkpoint or Checkpoint(run.work / CHECKPOINT, run.config)
        dataset = load_dataset(cfg.dataset, cfg.dataset_path, cfg.cache_dir)
        if dataset.fingerprint != meta["dataset"]["fingerprint"]:
            raise UserError(f"the data at {cfg.dataset_path} (fingerprint {dataset.fingerprint}) is not the data the "
                            f"attack used ({meta['dataset']['fingerprint']}); pass the --dataset_path the attack used")
        dataset = load_train_set(record, dataset)
        model = create_model(cfg.model, dataset.spec.num_classes, pretrained=False)  # the record's weights follow
        load_into(model, load_tensors(record.dir / "model.safetensors"), str(record.dir / "model.safetensors"))
        if defense.validate is not None:
            defense.validate(cfg, model)
        bd_test = rebuild_backdoor_test(meta, record.dir, dataset, cfg.cache_dir)
        if holds == "reserve":
            pool = dataset.train if reserve is None else reserve_set(reserve, dataset.classes, dataset.test)
            reserved = reserved_indices(pool.labels, cfg, dataset.spec.num_classes, defense.reserve_per_class, index)
            held = pool.subset(reserved)
        else:
            reserved, held = None, poisoned_train_set(record, dataset)
        with run.writing(f"the defense {name} on {record.dir}"):
            reads_clean_train = defense.reads_clean_train is not None and defense.reads_clean_train(cfg)
            _defend(defense, cfg, work, record, model, dataset, bd_test, reserved, held, device, checkpoint,
                    dataset.train if reads_clean_train else None)
    return out_dir


def _defend(defense: Defense, cfg, work: Path, record: AttackRecord, model, dataset, bd_test, reserved, held, device,
            checkpoint: Checkpoint, clean_train: ImageSet | None) -> None:
    """``reserved`` is None for an in-training defense: it trains a new model on ``held``, the poisoned
    training set."""
    name, images_per_epoch = defense.name, defense.images_per_epoch
    spec = dataset.spec
    resumed = checkpoint.epochs_done()
    logger = open_log(work, "defense.log", f"defense {name} on {record.dir} (device {device})"
                      f"{f', resuming after {resumed} finished epoch(s)' if resumed else ''}", cfg)
    write_yaml(work / "config.yaml", portable(cfg))
    if reserved is not None:
        save_tensors(work / "reserved_index.safetensors", {"reserved_index": reserved})
        if cfg.reserve_dataset_path:
            logger.info("defender holds %d clean images of %s (reserve set fingerprint %s), none of the training set",
                        len(reserved), cfg.reserve_dataset_path, cfg.reserve_fingerprint)
        else:
            logger.info("defender holds %d clean training images", len(reserved))
    else:
        logger.info("in-training defense: a new model trains on the poisoned training set as given (%d images)",
                    len(held))

    model = place_model(model, device)
    evaluator = Evaluator(dataset.test, bd_test, Normalizer(spec.mean, spec.std, device), device=device, amp=cfg.amp,
                          batch_size=cfg.eval_batch_size)
    before = evaluator(model)
    logger.info("attacked model: clean_acc=%.4f asr=%.4f ra=%.4f", before["clean_acc"], before["asr"], before["ra"])
    clean = DefenderData(held, spec, device, crop_padding=cfg.random_crop_padding, hflip=cfg.random_hflip,
                         clean_train=clean_train)
    if clean_train is not None:
        logger.warning("this run reads the clean training set, outside the threat model (official behaviour, "
                       "for comparison)")
    if reserved is None:
        seed_everything(cfg.random_seed)
        model = place_model(new_model(cfg, spec.num_classes), device)  # from its start, as the attack was
    epochs = getattr(cfg, "epochs", None)
    if not resumed and getattr(cfg, "batch_size", None) and epochs:
        epoch_size = len(held) if images_per_epoch is None else images_per_epoch(cfg, len(held), spec.num_classes)
        announce_plan(logger, device, model, clean.loader(cfg.batch_size, cfg.random_seed), epochs=epochs,
                      images_per_epoch=epoch_size, amp=cfg.amp, evaluations=-(-epochs // cfg.eval_every),
                      eval_images=evaluator.num_images, cpu_hint=CPU_HINT)

    reporter = EpochReporter(evaluator, model, work, name, logger, epochs=epochs or 1,
                             eval_every=cfg.eval_every, rows=[{"epoch": 0, **before}], checkpoint=checkpoint)

    seed_everything(cfg.random_seed)
    report = DefenseReport(reporter, work, logger)
    model = defense.purify(model, clean, cfg, report)  # the report returns None, by design
    wall = reporter.elapsed()
    write_csv(reporter.rows, work / "metrics.csv")  # also when the defense trained nothing (NC, nothing flagged)
    after = evaluator(model)  # always the returned model, whatever the defense reported on the way

    save_tensors(work / "model.safetensors", model.state_dict())
    wrapper = getattr(model, "wrapper_name", None)
    if wrapper:  # the inner model alone, for comparison (PDB: without the defensive trigger)
        inner = evaluator(model.unwrapped)
        logger.info("without its %s wrapper: clean_acc=%.4f asr=%.4f ra=%.4f", wrapper, inner["clean_acc"],
                    inner["asr"], inner["ra"])
    train_seconds = sum(r.get("train_seconds", 0.0) for r in reporter.rows)
    train_images = sum(r.get("train_seconds", 0.0) * r.get("train_images_per_s", 0.0) for r in reporter.rows)
    summary = {
        "clean_acc": after["clean_acc"], "asr": after["asr"], "ra": after["ra"],
        "der": der(before["clean_acc"], before["asr"], after["clean_acc"], after["asr"]),
        "attack_clean_acc": before["clean_acc"], "attack_asr": before["asr"], "attack_ra": before["ra"],
        **({"reserved_size": len(reserved)} if reserved is not None else {"training_set_size": len(held)}),
        **({"held_out_size": clean.held_out, "train_size": len(held) - clean.held_out} if clean.held_out else {}),
        **({f"without_wrapper_{k}": inner[k] for k in ("clean_acc", "asr", "ra")} if wrapper else {}),
        "epochs": epochs, "wall_seconds": wall,
        "train_seconds": train_seconds, "train_images_per_s": train_images / max(train_seconds, 1e-9),
        "eval_images_per_s": reporter.eval_images / max(reporter.eval_seconds, 1e-9), "device": str(device),
    }
    clash = set(report._notes) & set(summary)
    if clash:
        raise ValueError(f"defense {name} notes {sorted(clash)}, which the runner writes itself")
    summary.update(report._notes)
    if clean.held_out:
        logger.info("the defense held out %d of the %d images it holds for validation", clean.held_out, len(held))
    files = [f for f in DEFENSE_FILES if reserved is not None or f != "reserved_index.safetensors"]
    finish_run(work, summary, {"kind": "defense", "defense": name, "model": cfg.model,
                               "attack_record": cfg.result_file, "attack_record_sha256": record.sha256,
                               "dataset": record.meta["dataset"], **({"model_wrapper": wrapper} if wrapper else {})},
               files + report._files)
    logger.info("done: clean_acc=%.4f asr=%.4f ra=%.4f der=%.4f  (attacked: %.4f / %.4f) in %.1fs",
                summary["clean_acc"], summary["asr"], summary["ra"], summary["der"], before["clean_acc"],
                before["asr"], wall)
