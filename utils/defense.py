"""The defense runner: everything a defense shares, so that ``defense/<name>.py`` only says its
algorithm.

The threat model of a post-training defense is the signature ``purify(model, clean, cfg, report) -> model``:
    * ``model``  the attacked model (weights loaded, on the device);
    * ``clean``  :class:`DefenderData`, the defender's reserved clean training samples (``--ratio`` or
                 ``--index``) and how to batch them -- never the test sets, the poison indices or
                 the trigger; ``clean.split`` holds part of them out where a defense needs a
                 validation signal;
    * ``cfg``    the defense's resolved configuration;
    * ``report`` an ``on_epoch_end`` hook for :func:`utils.train.fit`. It evaluates ACC/ASR/RA for
                 the log and the CSV and returns ``None``: nothing a defense can base a
                 hyper-parameter, threshold or stopping point on. Passed to ``fit``, it also
                 checkpoints every epoch, so every defense resumes (``--resume``) without code of
                 its own; a defense with several training stages names each by ``fit``'s ``desc``.
                 It also keeps what a defense decided: ``log``, ``note`` (summary entries),
                 ``save_tensors`` (hashed into record.json), ``save_image`` and ``save_plot``.

An in-training defense (PDB; ``run_defense(..., holds="poisoned_train")``) has the same signature
with other arguments: ``model`` is a freshly initialised model of the record's architecture, and the
data is the record's poisoned training set as the victim holds it (images and labels as given,
poisoned samples unmarked; :func:`utils.attack.poisoned_train_set`), still without the poison
indices, the trigger or the test sets. It may return a wrapper (:mod:`models.defensive`), which is
saved and reloaded as data (``model_wrapper`` in record.json) and evaluated like any classifier.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from models import create_model
from utils.attack import (AttackRecord, load_attack_record, load_train_set, new_model,
                          poisoned_train_set, portable, rebuild_backdoor_test)
from utils.config import (CONFIG_DIR, Config, add_common_arguments, check_range, check_training, new_parser,
                          require, resolve_config, resolve_device, seed_everything, str2bool)
from utils.backdoor import balanced_subset, random_subset
from utils.data import BatchLoader, DatasetSpec, ImageSet, Normalizer, load_dataset
from utils.errors import UserError
from utils.flags import INHERITED_KEYS, RESUMABLE_KEYS
from utils.evaluate import Evaluator, predict
from utils.metrics import der
from utils.plots import save_plot
from utils.record import load_into, load_tensors, save_tensors, write_json, write_manifest, write_yaml
from utils.runner import (CHECKPOINT, Checkpoint, EpochReporter, announce_plan, check_writable, log_config,
                          claim_output, log_to_file, place_model, plan_output, setup_logging,
                          write_csv, writing_output)
from utils.train import EpochHook


@dataclass
class DefenderData:
    """Images and labels a defender holds (the reserved clean data; for an in-training defense, the
    poisoned training set as given) and how to turn them into training batches."""
    data: ImageSet
    spec: DatasetSpec
    device: torch.device
    crop_padding: int = 0
    hflip: bool = False

    def __len__(self) -> int:
        return len(self.data)

    @property
    def normalizer(self) -> Normalizer:
        return Normalizer(self.spec.mean, self.spec.std, self.device)

    held_out: int = 0  # how many images the last split held out, for the summary
    # The clean training set, only where a defense reproduces official code that reads it (outside
    # the threat model; PDB's --defensive_source clean); None otherwise.
    clean_train: ImageSet | None = None

    def loader(self, batch_size: int, seed: int, *, augment: bool = True, shuffle: bool = True,
               num_batches: int | None = None) -> BatchLoader:
        """Batches with the attack's training augmentation (``augment``); ``num_batches`` draws that many
        per epoch with replacement instead of one pass."""
        return BatchLoader(self.data, batch_size, self.normalizer, device=self.device, shuffle=shuffle,
                           crop_padding=self.crop_padding if augment else 0, hflip=self.hflip and augment, seed=seed,
                           num_batches=num_batches)

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module) -> float:
        """The model's accuracy on these images (eval mode, no augmentation): a held-out part's
        validation signal."""
        logits = predict(model, self.data.images, self.normalizer, device=self.device)
        return (logits.argmax(1) == self.data.labels.cpu()).float().mean().item()

    def split(self, fraction: float, seed: int) -> tuple["DefenderData", "DefenderData"]:
        """(training part, held-out part): ``fraction`` of the reserved images (at least one, and at
        least one left to train on) held out for a defense's validation signal -- where to stop
        pruning, which threshold -- so that no defense needs the test sets. The same for the same
        seed; the two parts are disjoint."""
        n = len(self.data)
        if n < 2:
            raise UserError(f"the defender holds {n} clean image(s); a held-out split needs at least 2 (raise --ratio)")
        check_range("val_ratio", fraction, 0.0, 1.0)
        count = min(n - 1, max(1, round(fraction * n)))
        held = random_subset(n, count, seed, "held_out")
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        self.held_out = count
        return self.with_data(self.data.subset(torch.nonzero(keep).flatten())), self.with_data(self.data.subset(held))

    def with_data(self, data: ImageSet) -> "DefenderData":
        """Other images (a part of these, NC's stamped copies) batched the same way."""
        return replace(self, data=data, held_out=0)


Purify = Callable[[torch.nn.Module, DefenderData, Config, Callable[[int, dict], None]], torch.nn.Module]


def read_index_file(index_file: str) -> torch.Tensor:
    """The integers of an ``--index`` file (one per line), read before any slow work."""
    try:
        values = [int(v) for v in Path(index_file).read_text().split()]
    except FileNotFoundError:
        raise UserError(f"--index file {index_file} not found") from None
    except IsADirectoryError:
        raise UserError(f"--index {index_file} is a folder; give a file of training-set indices, one per line") \
            from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"--index file {index_file} must hold integers, one per line") from None
    except OSError as e:
        raise UserError(f"cannot read --index file {index_file} ({e.strerror or e})") from None
    if not values:
        raise UserError(f"--index file {index_file} is empty; list the training-set indices the defender holds")
    return torch.tensor(values, dtype=torch.long)


def reserved_indices(labels: torch.Tensor, cfg: Config, num_classes: int, per_class: bool = False,
                     index: torch.Tensor | None = None) -> torch.Tensor:
    """The defender's clean subset: ``index`` (from an ``--index`` file) or ``--ratio`` of the training
    set, drawn uniformly or, ``per_class``, in equal numbers from every class (BackdoorBench's
    ``choose_by_class``: ratio * N / K images per class)."""
    num_train = len(labels)
    if index is not None:
        if index.min() < 0 or index.max() >= num_train or len(index.unique()) != len(index):
            raise UserError(f"--index file {cfg.index} must list distinct indices in 0..{num_train - 1}")
        return index
    check_range("ratio", cfg.ratio, 0.0, 1.0)
    count = max(1, round(cfg.ratio * num_train))
    if per_class:
        return balanced_subset(labels, count, cfg.random_seed, num_classes, stream="reserved", flag="--ratio")
    return random_subset(num_train, count, cfg.random_seed, "reserved")


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


HOLDS = ("reserve", "poisoned_train")


def output_name(save_name: str | None, defense: str) -> str:
    """The defense's output folder name: ``--save_name`` when given (checked to be one plain folder
    name), else the script's name."""
    if save_name is None:
        return defense
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", save_name):
        raise UserError(f"--save_name {save_name!r}: give one folder name of letters, digits, '_', '-' and '.' "
                        f"(e.g. {defense}_variant)")
    return save_name


def run_defense(name: str, purify: Purify, add_arguments: Callable | None = None, argv=None,
                description: str | None = None, reserve_per_class: bool = False,
                validate: Callable[[Config, torch.nn.Module], None] | None = None, holds: str = "reserve",
                reads_clean_train: Callable[[Config], bool] | None = None,
                images_per_epoch: Callable[[Config, int, int], int] | None = None) -> Path:
    """Resolve the config, load the record, hand ``purify`` the model and the data the threat model
    gives the defender, write the defense output. ``holds="reserve"`` (post-training): the attacked
    model and the reserved clean data (drawn per class when ``reserve_per_class``);
    ``holds="poisoned_train"`` (in-training): a freshly initialised model and the poisoned training
    set as given. ``validate(cfg, model)`` checks the defense's own settings before anything is
    written: it raises :class:`UserError` with one line on bad input. ``reads_clean_train(cfg)``
    true hands the defense the clean training set too, to reproduce official code that reads it
    (outside the threat model; the log says so). ``images_per_epoch(cfg, held, num_classes)``: how many
    images one epoch trains on, for the time estimate, where that is not the ``held`` images (PDB adds
    its defensive copies)."""
    if holds not in HOLDS:
        raise ValueError(f"holds={holds!r}; one of {HOLDS}")
    parser = new_parser(description or f"{name} defense")
    add_common_arguments(parser)
    g = parser.add_argument_group("defense")
    g.add_argument("--result_file", type=str, help="name of the attack record under --record_dir")
    g.add_argument("--ratio", type=float, help="fraction of the clean training set the defender holds")
    g.add_argument("--index", type=str,
                   help="file of training-set indices the defender holds (overrides --ratio)")
    g.add_argument("--resume", type=str2bool, nargs="?", const=True,
                   help="continue an interrupted run from its last finished epoch")
    g.add_argument("--save_name", type=str,
                   help=f"output folder under <record>/defense/ (default: {name}); another name keeps a variant "
                        f"(other settings) beside the default run, as its own column in the tables")
    if add_arguments is not None:
        add_arguments(parser.add_argument_group(name))
    base = CONFIG_DIR / "defense" / name / "config.yaml"
    loaded: list[AttackRecord] = []

    def layers(args: dict) -> list:
        if "result_file" not in args:
            raise UserError("missing --result_file: name the attack record to defend (record/<name>/)")
        loaded.append(load_attack_record(Path(args.get("record_dir", "record")) / args["result_file"]))
        inherited = {k: loaded[0].config[k] for k in INHERITED_KEYS if k in loaded[0].config}
        return [inherited] + ([base] if base.is_file() else [])

    cfg = resolve_config(parser, layers, argv)
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
    cfg.defense = name
    setup_logging()
    record = loaded[0]
    meta = record.meta
    if cfg.dataset != meta["dataset"]["name"]:
        raise UserError(f"--dataset {cfg.dataset} differs from the record's {meta['dataset']['name']}")
    device = resolve_device(cfg.device)

    # Everything that can refuse the run is checked before the slow work and before any write.
    out_dir = record.dir / "defense" / output_name(cfg.save_name, name)
    check_writable(out_dir.parent, "--record_dir")
    with claim_output(out_dir):  # a second run on the same output is refused
        work = plan_output(out_dir, overwrite=bool(cfg.overwrite), resume=bool(cfg.resume))
        checkpoint = Checkpoint(work / CHECKPOINT, portable(cfg))
        if (work / CHECKPOINT).is_file():
            checkpoint = Checkpoint.load(work / CHECKPOINT, portable(cfg), RESUMABLE_KEYS)
        dataset = load_dataset(cfg.dataset, cfg.dataset_path, cfg.cache_dir)
        if dataset.fingerprint != meta["dataset"]["fingerprint"]:
            raise UserError(f"the data at {cfg.dataset_path} (fingerprint {dataset.fingerprint}) is not the data the "
                            f"attack used ({meta['dataset']['fingerprint']}); pass the --dataset_path the attack used")
        dataset = load_train_set(record, dataset)
        model = create_model(cfg.model, dataset.spec.num_classes, pretrained=False)  # the record's weights follow
        load_into(model, load_tensors(record.dir / "model.safetensors"), str(record.dir / "model.safetensors"))
        if validate is not None:
            validate(cfg, model)
        bd_test = rebuild_backdoor_test(meta, record.dir, dataset, cfg.cache_dir)
        if holds == "reserve":
            reserved = reserved_indices(dataset.train.labels, cfg, dataset.spec.num_classes, reserve_per_class, index)
            held = dataset.train.subset(reserved)
        else:
            reserved, held = None, poisoned_train_set(record, dataset)
        with writing_output(f"the defense {name} on {record.dir}", work, out_dir):
            _defend(name, purify, cfg, work, record, model, dataset, bd_test, reserved, held, device, checkpoint,
                    dataset.train if reads_clean_train is not None and reads_clean_train(cfg) else None,
                    images_per_epoch)
    return out_dir


def _defend(name, purify, cfg, work: Path, record: AttackRecord, model, dataset, bd_test, reserved, held, device,
            checkpoint: Checkpoint, clean_train: ImageSet | None, images_per_epoch=None) -> None:
    """``reserved`` is None for an in-training defense: it trains a new model on ``held``, the poisoned
    training set."""
    spec = dataset.spec
    logger = log_to_file(work / "defense.log")
    resumed = checkpoint.epochs_done()
    logger.info("defense %s on %s (device %s)%s", name, record.dir, device,
                f", resuming after {resumed} finished epoch(s)" if resumed else "")
    log_config(logger, cfg.to_dict())
    write_yaml(work / "config.yaml", portable(cfg))
    if reserved is not None:
        save_tensors(work / "reserved_index.safetensors", {"reserved_index": reserved})
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
        model = place_model(new_model(cfg, spec), device)  # trained from its start, as the attack was
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
    model = purify(model, clean, cfg, report)  # the report returns None, by design
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
    write_json(work / "summary.json", summary)
    files = [f for f in DEFENSE_FILES if reserved is not None or f != "reserved_index.safetensors"]
    write_manifest(work, {"kind": "defense", "defense": name, "model": cfg.model, "attack_record": cfg.result_file,
                          "attack_record_sha256": record.sha256, "dataset": record.meta["dataset"],
                          **({"model_wrapper": wrapper} if wrapper else {})},
                   files + report._files)  # last: marks the output finished
    (work / CHECKPOINT).unlink(missing_ok=True)
    logger.info("done: clean_acc=%.4f asr=%.4f ra=%.4f der=%.4f  (attacked: %.4f / %.4f) in %.1fs",
                summary["clean_acc"], summary["asr"], summary["ra"], summary["der"], before["clean_acc"],
                before["asr"], wall)
