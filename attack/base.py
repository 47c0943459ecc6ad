"""The attack API: what an attack is, and the registry that finds one by the name a record stores.
``attack/<name>.py`` only says what makes that attack (its trigger, its flags, its defaults); the
runner (:mod:`attack.runner`) does everything they share.

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
      a :data:`utils.loader.BatchHook` called on every raw uint8 training batch before normalisation,
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

import torch

from utils.backdoor import select_poison_indices
from utils.config import Config
from utils.datasets import Dataset, DatasetSpec
from utils.errors import UserError
from utils.train import cross_entropy_loss

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
    # Common flags this attack has no use for, each with the reason (the rule every script follows,
    # defense.base.Defense too): accepted, and a value given for one is logged as ignored.
    ignored_flags: dict[str, str] = {}
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


def lookup_indexed(table: torch.Tensor, table_index: torch.Tensor, index, split: str, source: str) -> torch.Tensor:
    """The rows of ``table`` (stored poisoned images, sorted by ``table_index``) for the images at
    ``index``: the trigger of an ``indexed_trigger`` attack whose poisoned images are looked up, not
    computed; ``source`` names where they came from in the one-line errors."""
    if index is None:
        raise UserError(f"{source}: its {split} images are looked up by index; the caller gave no indices")
    index = torch.as_tensor(index, dtype=torch.long).cpu()
    pos = torch.searchsorted(table_index, index).clamp_(max=max(len(table_index) - 1, 0))
    if len(table_index) == 0 or not torch.equal(table_index[pos], index):
        raise UserError(f"{source}: a {split} image was asked for that it does not hold")
    return table[pos]


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
