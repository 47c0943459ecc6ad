"""The attack runner: parse and check the flags, claim the output folder, poison the training set,
train (resumably), evaluate, and write the record (see :mod:`attack.base` for what an attack declares)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from attack.base import Attack, TrainableTrigger, train_trigger_function, trigger_function
from attack.record import ATTACK_FILES, backdoor_test_fingerprint, cached_set_path, store_cached_set
from models import is_model, list_models, new_model
from utils.backdoor import LABEL_TRANSFORMS, BackdoorTestSet, backdoor_test_set, balanced_subset, poison_train_set
from utils.checkpoint import CHECKPOINT, Checkpoint
from utils.config import (
    CONFIG_DIR,
    Config,
    add_common_arguments,
    check_range,
    check_training,
    new_parser,
    require,
    resolve_config,
    resolve_device,
    seed_everything,
)
from utils.datasets import DatasetSpec, ImageSet, get_spec, tensor_fingerprint
from utils.device import place_model
from utils.errors import UserError
from utils.evaluate import Evaluator
from utils.loader import BatchLoader, Normalizer
from utils.logs import run_logger, setup_logging
from utils.metrics import mean
from utils.record import load_tensors, save_tensors, write_yaml
from utils.report import EpochReporter, announce_plan
from utils.run import add_resume_argument, claim_run, finish_run, log_ignored, open_log
from utils.sam import SAM
from utils.sources import load_dataset
from utils.train import build_optimizer, build_scheduler, fit


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


def _check_sam(attack: type[Attack], cfg: Config) -> None:
    rho = getattr(cfg, "sam_rho", None)  # absent unless given: records without it keep their config
    if rho is None:
        return
    if not (math.isfinite(rho) and rho > 0):
        raise UserError(f"--sam_rho {rho} must be a finite number above 0 (the paper's budgets: 1.0, 2.0, 3.0)")
    if attack.learns_trigger:
        raise UserError(f"--sam_rho is not offered for {attack.name}: its trigger generator trains through the "
                        f"classifier's loss, so SAM's second pass would add a second gradient to the generator")


def _sam_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, cfg: Config, logger):
    """``--sam_rho``: the classifier's optimiser wrapped in FT-SAM's adaptive SAM (:mod:`utils.sam`); the
    scheduler and the checkpoint keep using the base optimiser's state, so resuming is unchanged."""
    rho = getattr(cfg, "sam_rho", None)
    if rho is None:
        return optimizer
    logger.info("adaptive attack: the classifier trains with adaptive SAM, rho %g (utils/sam.py, as FT-SAM)", rho)
    return SAM(optimizer, model, rho=rho, adaptive=True)


CPU_HINT = ("the README's quick start trains a narrow model for a few epochs in about 10 minutes: "
            "--model preactresnet18_w16 --epochs 5 --lr 0.05 (add --train_subset N for a smaller smoke run)")


def attack_parser(attack: type[Attack]):
    """The command line of ``attack/<name>.py``: the common flags, the attack group's, the attack's own."""
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
    g.add_argument("--sam_rho", type=float, help="adaptive attack (D3 paper, Sec. 4.4): train the classifier with "
                   "FT-SAM's adaptive SAM of radius R, pushing the backdoor into a flat minimum (default: off)")
    add_resume_argument(g)
    attack.add_arguments(parser.add_argument_group(attack.name))
    return parser


def run_attack(attack: type[Attack], argv=None) -> Path:
    parser = attack_parser(attack)
    dropped: list[str] = []
    cfg = resolve_config(parser, _base_files(attack), argv, ignored=attack.ignored_flags, dropped=dropped)
    cfg.attack = attack.name
    spec = get_spec(cfg.dataset)
    _validate(cfg, spec)
    attack.check_flags(cfg, spec)
    _check_sam(attack, cfg)
    if cfg.pretrained_path is None:
        with torch.device("meta"):  # an unknown model or a pretrained start without its file: before any write
            new_model(cfg, spec.num_classes)
    setup_logging()
    log_ignored(attack.name, dropped, attack.ignored_flags)
    device = resolve_device(cfg.device)

    # Everything that can refuse the run is checked before the slow work and before any write.
    record_dir = Path(cfg.record_dir)
    out_dir = record_dir / cfg.save_folder_name
    with claim_run(out_dir, cfg, attack.local_keys) as run:
        work, checkpoint = run.work, run.checkpoint
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
        with run.writing(f"the attack {attack.name} -> {out_dir}"):
            if checkpoint is None:
                save_tensors(work / "trigger.safetensors", artifacts)
                write_yaml(work / "config.yaml", run.config)
                checkpoint = Checkpoint(work / CHECKPOINT, run.config, {"poison_index": poison_index})
            _train(attack, cfg, spec, dataset, device, work, checkpoint, artifacts, poison_index, subset_index)
    logger = run_logger()
    logger.info("attack record finished: %s; defend it with, e.g., python defense/d3.py --result_file %s%s",
                out_dir, cfg.save_folder_name, "" if record_dir == Path("record") else f" --record_dir {record_dir}")
    return out_dir


def _train(attack, cfg, spec, dataset, device, work: Path, checkpoint: Checkpoint, artifacts, poison_index,
           subset_index) -> None:
    resumed = checkpoint.epochs_done()
    logger = open_log(work, "attack.log", f"attack {attack.name} (device {device})"
                      f"{f', resuming after epoch {resumed}' if resumed else ''}", cfg)
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
    model = place_model(new_model(cfg, spec.num_classes), device)
    optimizer = build_optimizer(model.parameters(), cfg)
    epochs = attack.classifier_epochs(cfg)
    scheduler = build_scheduler(optimizer, cfg, epochs)
    optimizer = _sam_optimizer(optimizer, model, cfg, logger)
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
        store_cached_set(cached_set_path(cfg.cache_dir, backdoor_test_fingerprint(bd_test)), bd_test)
    save_tensors(work / "model.safetensors", model.state_dict())
    summary = {"clean_acc": final["clean_acc"], "asr": final["asr"], "ra": final["ra"], "epochs": epochs,
               "train_seconds": sum(r["train_seconds"] for r in reporter.rows),
               "train_images_per_s": mean(r["train_images_per_s"] for r in reporter.rows),
               "eval_images_per_s": reporter.eval_images / max(reporter.eval_seconds, 1e-9),
               "wall_seconds": reporter.elapsed(), "device": str(device)}
    finish_run(work, summary, {
        "kind": "attack", "attack": attack.name, "model": cfg.model,
        "dataset": {"name": spec.name, "fingerprint": dataset.fingerprint, "num_classes": spec.num_classes,
                    "image_size": spec.image_size, "train_size": len(dataset.train), "test_size": len(dataset.test),
                    "train_subset": cfg.train_subset},
        "attack_label_trans": cfg.attack_label_trans, "attack_target": cfg.attack_target,
        "poisoned_train_fingerprint": tensor_fingerprint(poisoned.images, poisoned.labels),
        "backdoor_test_fingerprint": backdoor_test_fingerprint(bd_test),
    }, ATTACK_FILES)
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
