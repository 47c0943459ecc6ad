"""What a defense is: the :class:`Defense` declaration each ``defense/<name>.py`` makes, the data the
defender holds, and the threat model that fixes both (the runner, :mod:`defense.runner`, does the rest).

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

An in-training defense (PDB; ``Defense(..., holds="poisoned_train")``) has the same signature
with other arguments: ``model`` is a freshly initialised model of the record's architecture, and the
data is the record's poisoned training set as the victim holds it (images and labels as given,
poisoned samples unmarked; :func:`attack.record.poisoned_train_set`), still without the poison
indices, the trigger or the test sets. It may return a wrapper (:mod:`models.defensive`), which is
saved and reloaded as data (``model_wrapper`` in record.json) and evaluated like any classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from utils.backdoor import balanced_subset, random_subset
from utils.config import Config, check_range
from utils.datasets import DatasetSpec, ImageSet
from utils.errors import UserError
from utils.evaluate import predict
from utils.loader import BatchLoader, Normalizer


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


HOLDS = ("reserve", "poisoned_train")


@dataclass(frozen=True)
class Defense:
    """A defense declares what it is; :func:`defense.runner.run_defense` reads nothing else.

    ``purify`` its algorithm (the threat model above); ``description`` the first line of ``--help``;
    ``add_arguments(group)`` its own flags; ``validate(cfg, model)`` checks its settings (against the
    attacked model where they name layers) before anything is written, raising :class:`UserError`
    with one line. What it holds: ``holds="reserve"`` (post-training: the attacked model and the
    reserved clean data, drawn per class when ``reserve_per_class``) or ``"poisoned_train"``
    (in-training: a fresh model and the poisoned training set as given). ``reads_clean_train(cfg)``
    true hands it the clean training set too, to reproduce official code that reads it (outside the
    threat model; the log says so). ``images_per_epoch(cfg, held, num_classes)``: the images one epoch
    trains on, for the time estimate, where that is not the held images (PDB adds its defensive
    copies). ``ignored_flags``: common flags (BackdoorBench's, passed to every defense by sweeps) this
    defense has no use for, each with the reason; they are accepted, and a value given for one is
    logged as ignored, never silently dropped."""
    name: str
    purify: Purify
    description: str
    add_arguments: Callable | None = None
    validate: Callable[[Config, torch.nn.Module], None] | None = None
    holds: str = "reserve"
    reserve_per_class: bool = False
    reads_clean_train: Callable[[Config], bool] | None = None
    images_per_epoch: Callable[[Config, int, int], int] | None = None
    ignored_flags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.holds not in HOLDS:
            raise ValueError(f"holds={self.holds!r}; one of {HOLDS}")


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
