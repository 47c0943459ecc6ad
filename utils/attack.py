"""The attack runner: everything an attack script shares, so that ``attack/<name>.py`` only says
what makes that attack (its trigger, its flags, its defaults).

An attack is a subclass of :class:`Attack` registered with :func:`register_attack`:
    * ``make_trigger(cfg, spec, dataset)`` builds the trigger artifacts (tensors) once;
    * ``apply_trigger(images, artifacts)`` is a pure, batched function of uint8 images and those
      artifacts. The record stores the artifacts, so the poisoned sets are rebuilt exactly from
      the record, never by re-running the attack's set-up.
Optional, for attacks that poison differently:
    * ``apply_train_trigger(images, artifacts)`` the trigger on training images, when it differs
      from the test-time one;
    * ``select_poison_index(cfg, labels)`` which training samples carry the trigger (default: a
      seeded ``round(pratio * N)`` from all classes); ``clean_label = True`` keeps their labels (SIG);
    * ``batch_hook(cfg, artifacts, spec)`` training-controlled attacks with a fixed trigger (WaNet):
      a :data:`utils.data.BatchHook` called on every raw uint8 training batch before normalisation,
      in place of the default augmentation. It may poison a share of the batch afresh, change
      labels and augment; its random draws come from the loader's per-epoch generator, so a
      resumed run is exact. A hook with a ``state_dict`` is stored in the checkpoint;
    * ``snapshot_hook(cfg, artifacts, spec)`` for a training-controlled attack (WaNet, Input-aware): its per-batch
      poisoning rule without the augmentation, from which :func:`poisoned_train_set` builds the
      fixed snapshot of the poisoned training set that BackdoorBench keeps after training;
    * ``loss_fn(cfg, artifacts)`` the training loss (default: cross-entropy);
    * ``indexed_trigger = True`` for attacks whose poisoned images are looked up rather than computed
      (SSBA's BackdoorBench ``.npy`` files): ``apply_trigger`` and ``apply_train_trigger`` then also
      receive ``index``, the images' positions in the clean test / training set (the run's
      ``--train_subset`` set), wherever the framework poisons or rebuilds a set;
    * ``cache_rebuilt_test_set = True`` when rebuilding the backdoor test set exactly takes minutes on
      a CPU (a generator run in float64: Input-aware, SSBA): the attack and every rebuild keep the set
      in the data cache, named by its fingerprint, and use a cached set only when it matches.

Triggers trained with the classifier (Input-aware's pattern generator, whose weights change every
step and which the classifier's loss trains through the poisoned images) set ``learns_trigger`` and
implement ``trainable_trigger(cfg, artifacts, spec, device)``, a :class:`TrainableTrigger`: its
``loss(model, x, y)`` poisons the normalised, augmented batch with gradients flowing into its own
modules and replaces the training loss; its optimiser steps after the classifier's (``fit``'s
``after_step``), its scheduler after every epoch (``after_epoch``); its state (modules, optimiser,
scheduler, accumulated gradients) goes into the checkpoint through ``fit``'s ``extra_state``; and
``artifacts()`` gives the current trigger tensors for ``apply_trigger``. The runner then
    * writes ``trigger.safetensors`` twice: at the start (what ``make_trigger`` made: the initial
      generators, which a resumed run reloads before the checkpoint restores the trained state),
      and at the end, the final generators, before ``record.json``;
    * remakes the backdoor test set from the current artifacts before every evaluation
      (``Evaluator.set_backdoor``): with ``preview_trigger`` (fast, for the intermediate rows) and,
      at the last epoch, with the exact ``apply_trigger`` that records are rebuilt with; that last
      set's fingerprint goes into the record.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models import create_model, is_model, list_models
from utils.backdoor import (LABEL_TRANSFORMS, BackdoorTestSet, backdoor_test_set, balanced_subset,
                            poison_train_set, select_poison_indices, stream_generator)
from utils.config import (CONFIG_DIR, Config, add_common_arguments, check_range, check_training, new_parser,
                          require, resolve_config, resolve_device, seed_everything, str2bool)
from utils.data import (BatchLoader, Dataset, DatasetSpec, ImageSet, Normalizer, cache_root, get_spec,
                        load_dataset, tensor_fingerprint)
from utils.errors import UserError
from utils.evaluate import Evaluator
from utils.flags import LOCAL_KEYS, RESUMABLE_KEYS
from utils.record import (REQUIRED_FILES, load_tensors, read_json, read_manifest, read_yaml, save_tensors,
                          sha256_file, write_json, write_manifest, write_yaml)
from utils.runner import (CHECKPOINT, Checkpoint, EpochReporter, announce_plan, check_writable, claim_output,
                          describe_unfinished, is_finished, log_config, log_to_file, place_model, plan_output,
                          run_logger, setup_logging, writing_output)
from utils.train import build_optimizer, build_scheduler, cross_entropy_loss, fit

_ATTACKS: dict[str, type["Attack"]] = {}


class TrainableTrigger:
    """A trigger trained beside the classifier (see the module docstring). Subclasses implement all
    of these; ``state_dict`` must hold everything that changes during training, so that a resumed
    run is bit-identical."""

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
        """``(loss, logs)`` of a normalised training batch, poisoned here with gradients."""
        raise NotImplementedError

    def step(self) -> None:
        """After every optimiser step of the classifier: the trigger's own step."""

    def epoch_end(self) -> None:
        """After every epoch: the trigger's scheduler."""

    def artifacts(self) -> dict[str, torch.Tensor]:
        """The current trigger artifacts (CPU tensors), as ``apply_trigger`` takes them."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class Attack:
    """Base class: subclasses set ``name`` and implement the two trigger methods."""
    name: str = ""
    clean_label: bool = False  # poisoned training samples keep their true labels
    learns_trigger: bool = False  # the trigger is trained with the classifier (:class:`TrainableTrigger`)
    # Flags naming files on this machine (trigger images, .npy patterns): logged, kept out of the
    # record, which holds what was read from them (trigger.safetensors), so records stay portable.
    local_keys: tuple[str, ...] = ()
    indexed_trigger: bool = False  # the trigger methods also take the images' indices (module docstring)
    cache_rebuilt_test_set: bool = False  # the exact rebuild is slow: keep the rebuilt set in the cache

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Flags of this attack only."""

    # ``--help``'s line for ``--epochs``, for an attack that counts its epochs its own way.
    epochs_help: str = "training epochs"

    @classmethod
    def classifier_epochs(cls, cfg: Config) -> int:
        """The classifier's training epochs: ``--epochs``, unless the attack's procedure counts otherwise."""
        return cfg.epochs

    @classmethod
    def check_flags(cls, cfg: Config, spec: DatasetSpec) -> None:
        """Refuse a bad value of the attack's own flags in one line: run before the dataset is decoded
        (and by ``make_trigger``, for callers outside the runner)."""

    @classmethod
    def make_trigger(cls, cfg: Config, spec: DatasetSpec, dataset: Dataset | None = None) -> dict[str, torch.Tensor]:
        """The trigger artifacts; ``dataset`` is the clean data, for attacks whose trigger is learned."""
        raise NotImplementedError

    @classmethod
    def apply_train_trigger(cls, images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trigger on poisoned training images: the test-time trigger unless an attack's published
        settings distinguish them (BackdoorBench's separate train/test blend ratios)."""
        return cls.apply_trigger(images, artifacts)

    @classmethod
    def select_poison_index(cls, cfg: Config, labels: torch.Tensor) -> torch.Tensor:
        """Training samples to poison, sorted: ``round(pratio * N)`` drawn with the seed from all classes."""
        return select_poison_indices(len(labels), cfg.pratio, cfg.random_seed)

    @classmethod
    def batch_hook(cls, cfg: Config, artifacts: dict[str, torch.Tensor], spec: DatasetSpec):
        """``None`` for data-poisoning attacks; training-controlled attacks return a BatchHook."""
        return None

    @classmethod
    def snapshot_hook(cls, cfg: Config, artifacts: dict[str, torch.Tensor], spec: DatasetSpec):
        """A training-controlled attack's poisoning rule without its augmentation (a BatchHook), or
        ``None`` when the attack has no fixed snapshot of its poisoned training set."""
        return None

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def preview_trigger(cls, images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trigger for intermediate evaluations of a learned trigger (reporting only): may be a
        faster, inexact version of ``apply_trigger``."""
        return cls.apply_trigger(images, artifacts)

    @classmethod
    def trainable_trigger(cls, cfg: Config, artifacts: dict[str, torch.Tensor], spec: DatasetSpec,
                          device: torch.device) -> TrainableTrigger | None:
        """For ``learns_trigger`` attacks: the trigger's training state, starting from ``artifacts``."""
        return None

    @classmethod
    def loss_fn(cls, cfg: Config, artifacts: dict[str, torch.Tensor]):
        """The training loss; data-poisoning attacks train normally on the poisoned set."""
        return cross_entropy_loss


def register_attack(cls: type[Attack]) -> type[Attack]:
    _ATTACKS[cls.name] = cls
    return cls


def get_attack(name: str) -> type[Attack]:
    """The attack class for a name stored in a record (imports ``attack/<name>.py``, a plain name only)."""
    if name not in _ATTACKS and re.fullmatch(r"[a-z][a-z0-9_]*", str(name)):
        try:
            importlib.import_module(f"attack.{name}")
        except ModuleNotFoundError:
            pass
    if name not in _ATTACKS:
        raise UserError(f"the record names attack {name!r}, which this toolkit does not have")
    return _ATTACKS[name]


def trigger_function(attack: type[Attack], artifacts: dict[str, torch.Tensor]):
    """The test-time trigger as a function of a batch (and its indices, for an ``indexed_trigger`` attack)."""
    return lambda images, *index: attack.apply_trigger(images, artifacts, *index)


def train_trigger_function(attack: type[Attack], artifacts: dict[str, torch.Tensor]):
    """The training-time trigger, as :func:`trigger_function`."""
    return lambda images, *index: attack.apply_train_trigger(images, artifacts, *index)


def _base_files(attack: type[Attack]):
    def files(args: dict) -> list[Path]:
        dataset = args.get("dataset", "cifar10")
        proto = CONFIG_DIR / "attack" / "prototype" / f"{dataset}.yaml"
        if not proto.is_file():
            get_spec(dataset)  # names the known datasets when this one is unknown
            raise UserError(f"no prototype config {proto} for dataset {dataset!r}")
        # BackdoorBench's --bd_yaml_path names the attack's own defaults file in place of ours.
        default = Path(args["bd_yaml_path"]) if "bd_yaml_path" in args else \
            CONFIG_DIR / "attack" / attack.name / "default.yaml"
        return [proto] + ([default] if default.is_file() or "bd_yaml_path" in args else [])
    return files


def _validate(cfg: Config, spec: DatasetSpec) -> None:
    require(cfg, "save_folder_name", "pratio", "attack_target", "attack_label_trans", "model", "epochs",
            "batch_size", "lr", "random_seed", "lr_scheduler", "client_optimizer", "sgd_momentum", "wd")
    check_training(cfg)
    if not is_model(cfg.model):
        raise UserError(f"unknown model {cfg.model!r}; choose one of: {', '.join(list_models())}, or timm/<name>")
    check_range("pratio", cfg.pratio, 0.0, 1.0)
    if not 0 <= cfg.attack_target < spec.num_classes:
        raise UserError(f"--attack_target {cfg.attack_target} is not a class of {spec.name} "
                        f"(0..{spec.num_classes - 1})")
    if cfg.attack_label_trans not in LABEL_TRANSFORMS:
        raise UserError(f"--attack_label_trans {cfg.attack_label_trans!r}; choose all2one or all2all")
    if "/" in cfg.save_folder_name or cfg.save_folder_name in ("", ".", ".."):
        raise UserError(f"--save_folder_name {cfg.save_folder_name!r} must be a plain folder name")


def new_model(cfg: Config, spec: DatasetSpec) -> torch.nn.Module:
    """The model a run trains from its start: random, or pretrained from ``--pretrained_path``."""
    return create_model(cfg.model, spec.num_classes, pretrained=getattr(cfg, "pretrained", None),
                        pretrained_path=getattr(cfg, "pretrained_path", None))


def portable(cfg: Config, local_keys: tuple[str, ...] = ()) -> dict:
    """The configuration as a record keeps it: without machine-local settings."""
    return {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_KEYS + local_keys}


CPU_HINT = ("the README's quick start trains a narrow model for a few epochs in about 10 minutes: "
            "--model preactresnet18_w16 --epochs 5 --lr 0.05 (add --train_subset N for a smaller smoke run)")


def run_attack(attack: type[Attack], argv=None) -> Path:
    parser = new_parser((attack.__doc__ or attack.name).strip().splitlines()[0])
    add_common_arguments(parser, attack.epochs_help)
    g = parser.add_argument_group("attack")
    g.add_argument("--save_folder_name", type=str, help="record/<save_folder_name>/ receives the result")
    g.add_argument("--pratio", type=float, help="fraction of training samples poisoned, in (0, 1]")
    g.add_argument("--attack_target", type=int, help="target class (all2one)")
    g.add_argument("--attack_label_trans", type=str, help="all2one | all2all")
    g.add_argument("--bd_yaml_path", type=str, help="the attack's defaults file, in place of "
                   "config/attack/<name>/default.yaml (BackdoorBench's flag)")
    g.add_argument("--train_subset", type=int, help="train on N training images only (class-balanced, drawn "
                   "with the seed; for smoke runs; recorded, and the defenses use the same subset)")
    g.add_argument("--resume", type=str2bool, nargs="?", const=True,
                   help="continue an interrupted run from its last finished epoch")
    attack.add_arguments(parser.add_argument_group(attack.name))
    cfg = resolve_config(parser, _base_files(attack), argv)
    cfg.attack = attack.name
    spec = get_spec(cfg.dataset)
    _validate(cfg, spec)
    attack.check_flags(cfg, spec)
    if cfg.pretrained_path is None:
        with torch.device("meta"):  # an unknown model or a pretrained start without its file: before any write
            new_model(cfg, spec)
    setup_logging()
    device = resolve_device(cfg.device)

    # Everything that can refuse the run is checked before the slow work and before any write.
    record_dir = Path(cfg.record_dir)
    check_writable(record_dir, "--record_dir")
    out_dir = record_dir / cfg.save_folder_name
    with claim_output(out_dir):  # a second run on the same output is refused
        work = plan_output(out_dir, overwrite=bool(cfg.overwrite), resume=bool(cfg.resume))
        checkpoint = None
        if (work / CHECKPOINT).is_file():
            checkpoint = Checkpoint.load(work / CHECKPOINT, portable(cfg, attack.local_keys), RESUMABLE_KEYS)
        dataset = load_dataset(cfg.dataset, cfg.dataset_path, cfg.cache_dir)
        subset_index = None
        if cfg.train_subset is not None:
            subset_index = balanced_subset(dataset.train.labels, cfg.train_subset, cfg.random_seed, spec.num_classes)
            dataset = replace(dataset, train=dataset.train.subset(subset_index))
        # Trigger and poison indices are fixed at the start and reloaded on resume.
        if checkpoint is None:
            artifacts = attack.make_trigger(cfg, spec, dataset)
            poison_index = attack.select_poison_index(cfg, dataset.train.labels)
        else:
            artifacts = load_tensors(work / "trigger.safetensors")
            poison_index = checkpoint.extra["poison_index"]
        with writing_output(f"the attack {attack.name} -> {out_dir}", work, out_dir):
            if checkpoint is None:
                save_tensors(work / "trigger.safetensors", artifacts)
                write_yaml(work / "config.yaml", portable(cfg, attack.local_keys))
                checkpoint = Checkpoint(work / CHECKPOINT, portable(cfg, attack.local_keys),
                                        {"poison_index": poison_index})
            _train(attack, cfg, spec, dataset, device, work, checkpoint, artifacts, poison_index, subset_index)
    logger = run_logger()
    logger.info("attack record finished: %s; defend it with, e.g., python defense/d3.py --result_file %s%s",
                out_dir, cfg.save_folder_name, "" if record_dir == Path("record") else f" --record_dir {record_dir}")
    return out_dir


def _train(attack, cfg, spec, dataset, device, work: Path, checkpoint: Checkpoint, artifacts, poison_index,
           subset_index) -> None:
    logger = log_to_file(work / "attack.log")
    resumed = checkpoint.epochs_done()
    logger.info("attack %s (device %s)%s", attack.name, device, f", resuming after epoch {resumed}" if resumed else "")
    log_config(logger, cfg.to_dict())
    logger.info("dataset %s: %d train / %d test images, fingerprint %s%s", cfg.dataset, len(dataset.train),
                len(dataset.test), dataset.fingerprint,
                f" (class-balanced training subset of {len(subset_index)})" if subset_index is not None else "")

    poisoned = poison_train_set(dataset.train, poison_index, train_trigger_function(attack, artifacts),
                                cfg.attack_label_trans, cfg.attack_target, spec.num_classes,
                                relabel=not attack.clean_label, indexed=attack.indexed_trigger)
    # A learned trigger's backdoor test set is made before every evaluation (:class:`_LearnedBackdoor`);
    # until then it holds the clean images of its samples.
    trigger = (lambda x: x) if attack.learns_trigger else trigger_function(attack, artifacts)
    bd_test = backdoor_test_set(dataset.test, trigger, cfg.attack_label_trans, cfg.attack_target, spec.num_classes,
                                indexed=attack.indexed_trigger)
    indices = {"train_poison_index": poison_index, "test_backdoor_index": bd_test.index}
    if subset_index is not None:
        indices["train_subset_index"] = subset_index
    save_tensors(work / "indices.safetensors", indices)
    logger.info("poisoned %d of %d training images; backdoor test set: %d images", len(poison_index),
                len(poisoned), len(bd_test))

    seed_everything(cfg.random_seed)
    model = place_model(new_model(cfg, spec), device)
    optimizer = build_optimizer(model.parameters(), cfg)
    epochs = attack.classifier_epochs(cfg)
    scheduler = build_scheduler(optimizer, cfg, epochs)
    normalizer = Normalizer(spec.mean, spec.std, device)
    batch_hook = attack.batch_hook(cfg, artifacts, spec)
    # BackdoorBench drops the last partial batch when it trains a data-poisoning attack or the prototype
    # (its BadNet stage 2 and trainer: drop_last=True); WaNet's and Input-aware's own loaders keep it.
    # A set smaller than one batch keeps its one partial batch rather than train on nothing.
    drop_last = batch_hook is None and not attack.learns_trigger and len(poisoned) >= cfg.batch_size
    loader = BatchLoader(poisoned, cfg.batch_size, normalizer, device=device, shuffle=True,
                         crop_padding=cfg.random_crop_padding, hflip=cfg.random_hflip, drop_last=drop_last,
                         seed=cfg.random_seed, batch_hook=batch_hook)
    evaluator = Evaluator(dataset.test, bd_test, normalizer, device=device, amp=cfg.amp,
                          batch_size=cfg.eval_batch_size)
    learned = None
    loss_fn, fit_hooks = attack.loss_fn(cfg, artifacts), {}
    if attack.learns_trigger:
        trainable = attack.trainable_trigger(cfg, artifacts, spec, device)
        learned = _LearnedBackdoor(attack, cfg, spec, dataset.test, evaluator, trainable, device)
        loss_fn = trainable.loss
        fit_hooks = dict(after_step=trainable.step, after_epoch=trainable.epoch_end,
                         on_epoch_start=learned.epoch_start)
    reporter = EpochReporter(learned or evaluator, model, work, "attack", logger, epochs=epochs,
                             eval_every=cfg.eval_every, checkpoint=checkpoint)
    if not resumed:
        announce_plan(logger, device, model, loader, epochs=epochs, images_per_epoch=len(poisoned),
                      amp=cfg.amp, evaluations=-(-epochs // cfg.eval_every), eval_images=evaluator.num_images,
                      cpu_hint=CPU_HINT)
    extra_state = {"batch_hook": batch_hook} if hasattr(batch_hook, "state_dict") else None
    if learned is not None:
        extra_state = {"trigger": learned.trainable}
    fit(model, loader, optimizer, scheduler, loss_fn, epochs=epochs, amp=cfg.amp,
        on_epoch_end=reporter, desc=f"attack {attack.name}", extra_state=extra_state, **fit_hooks)

    final = reporter.rows[-1]
    if learned is not None:  # the trained trigger is the record's; its test set is the last exact one
        save_tensors(work / "trigger.safetensors", learned.trainable.artifacts())
        bd_test = learned.final_set()
    if attack.cache_rebuilt_test_set:  # so that defenses on this machine need not rebuild it
        _store_cached_set(_cached_set_path(cfg.cache_dir, backdoor_test_fingerprint(bd_test)), bd_test)
    save_tensors(work / "model.safetensors", model.state_dict())
    summary = {"clean_acc": final["clean_acc"], "asr": final["asr"], "ra": final["ra"], "epochs": epochs,
               "train_seconds": sum(r["train_seconds"] for r in reporter.rows),
               "train_images_per_s": _mean(r["train_images_per_s"] for r in reporter.rows),
               "eval_images_per_s": reporter.eval_images / max(reporter.eval_seconds, 1e-9),
               "wall_seconds": reporter.elapsed(), "device": str(device)}
    write_json(work / "summary.json", summary)
    write_manifest(work, {
        "kind": "attack", "attack": attack.name, "model": cfg.model,
        "dataset": {"name": spec.name, "fingerprint": dataset.fingerprint, "num_classes": spec.num_classes,
                    "image_size": spec.image_size, "train_size": len(dataset.train), "test_size": len(dataset.test),
                    "train_subset": cfg.train_subset},
        "attack_label_trans": cfg.attack_label_trans, "attack_target": cfg.attack_target,
        "poisoned_train_fingerprint": tensor_fingerprint(poisoned.images, poisoned.labels),
        "backdoor_test_fingerprint": backdoor_test_fingerprint(bd_test),
    }, ATTACK_FILES)  # last: marks the record finished
    (work / CHECKPOINT).unlink(missing_ok=True)
    logger.info("done: clean_acc=%.4f asr=%.4f ra=%.4f  (%.0f train img/s, %.0f eval img/s, %.1fs)",
                summary["clean_acc"], summary["asr"], summary["ra"], summary["train_images_per_s"],
                summary["eval_images_per_s"], summary["wall_seconds"])


class _LearnedBackdoor:
    """The evaluation hook of a learned trigger: before each evaluation the backdoor test set is made
    from the trigger's current artifacts (``preview_trigger`` on the training device; at the last
    epoch the exact ``apply_trigger``, the set the record keeps), then the evaluator runs."""

    def __init__(self, attack, cfg, spec, clean_test: ImageSet, evaluator: Evaluator, trainable: TrainableTrigger,
                 device):
        self.attack, self.cfg, self.spec, self.evaluator, self.trainable = attack, cfg, spec, evaluator, trainable
        self.clean_test, self.device_test = clean_test, ImageSet(clean_test.images.to(device), clean_test.labels)
        self.epoch, self._final = -1, None

    @property
    def num_images(self) -> int:
        return self.evaluator.num_images

    def epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def _make(self, exact: bool) -> BackdoorTestSet:
        artifacts = self.trainable.artifacts()
        fn = self.attack.apply_trigger if exact else self.attack.preview_trigger
        return backdoor_test_set(self.clean_test if exact else self.device_test, lambda x: fn(x, artifacts),
                                 self.cfg.attack_label_trans, self.cfg.attack_target, self.spec.num_classes)

    def final_set(self) -> BackdoorTestSet:
        """The exact backdoor test set of the final trigger (made once)."""
        if self._final is None:
            self._final = self._make(exact=True)
        return self._final

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        last = self.epoch + 1 == self.attack.classifier_epochs(self.cfg)
        self.evaluator.set_backdoor(self.final_set() if last else self._make(exact=False))
        return self.evaluator(model)


# The files of an attack record whose SHA-256 record.json holds (logs and plots are for people).
ATTACK_FILES = list(REQUIRED_FILES["attack"])


def backdoor_test_fingerprint(bd: BackdoorTestSet) -> str:
    return tensor_fingerprint(bd.images, bd.target_labels, bd.true_labels, bd.index)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


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
    return AttackRecord(record_dir, meta, read_json(record_dir / "summary.json"), config,
                        sha256_file(record_dir / "record.json"))


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
    cache = _cached_set_path(cache_dir, expected) if attack.cache_rebuilt_test_set else None
    bd = _load_cached_set(cache, expected) if cache is not None else None
    if bd is None:
        artifacts = load_tensors(record_dir / "trigger.safetensors")
        bd = backdoor_test_set(dataset.test, trigger_function(attack, artifacts), meta["attack_label_trans"],
                               meta["attack_target"], dataset.spec.num_classes, indexed=attack.indexed_trigger)
        if backdoor_test_fingerprint(bd) != expected:
            raise UserError(f"the backdoor test set rebuilt from {record_dir} does not match the one the attack "
                            f"used; the record or the attack code changed")
        if cache is not None:
            _store_cached_set(cache, bd)
    return bd


def _cached_set_path(cache_dir, fingerprint: str) -> Path:
    base = cache_root(cache_dir)
    return base / "backdoor_test_sets" / f"{fingerprint}.safetensors"


def _load_cached_set(path: Path, fingerprint: str) -> BackdoorTestSet | None:
    if not path.is_file():
        return None
    try:
        t = load_tensors(path)
        bd = BackdoorTestSet(t["images"], t["target_labels"], t["true_labels"], t["index"])
    except (UserError, KeyError):
        return None
    return bd if backdoor_test_fingerprint(bd) == fingerprint else None


def _store_cached_set(path: Path, bd: BackdoorTestSet) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"images": bd.images, "target_labels": bd.target_labels, "true_labels": bd.true_labels,
                            "index": bd.index})
    except OSError as e:
        run_logger().warning("could not cache the rebuilt backdoor test set at %s (%s)", path, e)
