"""Poisoning, shared by every data-poisoning attack: which samples, which labels, and the poisoned sets.

Follows BackdoorBench's conventions: ``round(pratio * N)`` training samples drawn with the seed
from all classes; all2one relabels them to the target, all2all to ``(y + 1) mod K``; the backdoor
test set is every test sample whose true label differs from its attack label (for all2one: all
samples not of the target class), with the trigger applied.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from utils.datasets import ImageSet
from utils.errors import UserError

TriggerFn = Callable[[torch.Tensor], torch.Tensor]  # uint8 [N,C,H,W] -> uint8 [N,C,H,W]
LABEL_TRANSFORMS = ("all2one", "all2all")


def attack_labels(labels: torch.Tensor, rule: str, target: int, num_classes: int) -> torch.Tensor:
    """The label an attacker wants for each true label."""
    if rule == "all2one":
        return torch.full_like(labels, target)
    if rule == "all2all":
        return (labels + 1) % num_classes
    raise ValueError(f"unknown label transform {rule!r}; choose one of {LABEL_TRANSFORMS}")


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one named use of the seed, independent of every other use's draws."""
    digest = hashlib.sha256(f"{stream}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_subset(num_samples: int, count: int, seed: int, stream: str) -> torch.Tensor:
    """``count`` distinct indices in ``0..num_samples-1`` drawn uniformly, sorted. ``stream`` names the
    use, so that draws with the same seed for different purposes (poisoning, the defender's reserved
    data) are independent rather than prefixes of one permutation."""
    return torch.randperm(num_samples, generator=stream_generator(seed, stream))[:count].sort().values


def balanced_subset(labels: torch.Tensor, count: int, seed: int, num_classes: int, *,
                    stream: str = "train_subset", flag: str = "--train_subset") -> torch.Tensor:
    """``count`` indices drawn with the seed, as evenly over the classes as they allow (the first
    ``count mod K`` classes get one more), sorted: a smoke run's fraction of a dataset, or a
    defender's class-balanced reserve. ``stream`` keeps the draws of different uses independent;
    ``flag`` names the setting an error message points at."""
    labels = labels.cpu()
    if not 1 <= count <= len(labels):
        raise UserError(f"{flag} asks for {count} images; choose between 1 and the {len(labels)} training images")
    per_class = [torch.nonzero(labels == k).flatten() for k in range(num_classes)]
    quota = [count // num_classes + (1 if k < count % num_classes else 0) for k in range(num_classes)]
    short = [k for k in range(num_classes) if quota[k] > len(per_class[k])]
    if short:
        raise UserError(f"{flag} needs {quota[short[0]]} images of class {short[0]}, which has "
                        f"{len(per_class[short[0]])}; choose a smaller value")
    chosen = [idx[random_subset(len(idx), q, seed, f"{stream}:{k}")]
              for k, (idx, q) in enumerate(zip(per_class, quota))]
    return torch.cat(chosen).sort().values


def select_poison_indices(num_samples: int, pratio: float, seed: int) -> torch.Tensor:
    """``round(pratio * N)`` distinct indices drawn uniformly from all samples (all classes), sorted."""
    return random_subset(num_samples, round(pratio * num_samples), seed, "poison")


def backdoor_test_indices(labels: torch.Tensor, rule: str, target: int, num_classes: int) -> torch.Tensor:
    """Test samples an attack can flip: those whose attack label differs from the true one."""
    return torch.nonzero(attack_labels(labels, rule, target, num_classes) != labels).flatten()


def apply_in_batches(trigger: TriggerFn, images: torch.Tensor, batch_size: int = 4096,
                     index: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a batched trigger to many images without holding float copies of them all. With
    ``index`` (the images' positions in their clean set) the trigger is called as
    ``trigger(batch, batch_index)``: for attacks whose poisoned images are looked up, not computed."""
    out = torch.empty_like(images)
    for i in range(0, images.shape[0], batch_size):
        extra = () if index is None else (index[i:i + batch_size],)
        out[i:i + batch_size] = trigger(images[i:i + batch_size], *extra)
    return out


def poison_train_set(clean: ImageSet, poison_index: torch.Tensor, trigger: TriggerFn, rule: str, target: int,
                     num_classes: int, relabel: bool = True, indexed: bool = False) -> ImageSet:
    """The training set the victim sees: the chosen samples carry the trigger and (unless the attack
    is clean-label, ``relabel=False``) the attack label. ``indexed``: the trigger also takes the
    samples' indices (:func:`apply_in_batches`)."""
    images, labels = clean.images.clone(), clean.labels.clone()
    if len(poison_index):
        images[poison_index] = apply_in_batches(trigger, clean.images[poison_index],
                                                index=poison_index if indexed else None)
        if relabel:
            labels[poison_index] = attack_labels(clean.labels[poison_index], rule, target, num_classes)
    return ImageSet(images, labels)


@dataclass
class BackdoorTestSet:
    """Triggered test images with the attack's labels (for ASR) and their true labels (for RA)."""
    images: torch.Tensor
    target_labels: torch.Tensor
    true_labels: torch.Tensor
    index: torch.Tensor  # positions in the clean test set

    def __len__(self) -> int:
        return self.images.shape[0]


def backdoor_test_set(clean_test: ImageSet, trigger: TriggerFn, rule: str, target: int,
                      num_classes: int, indexed: bool = False) -> BackdoorTestSet:
    """``indexed``: the trigger also takes the test samples' indices (:func:`apply_in_batches`)."""
    index = backdoor_test_indices(clean_test.labels, rule, target, num_classes)
    true = clean_test.labels[index]
    return BackdoorTestSet(apply_in_batches(trigger, clean_test.images[index], index=index if indexed else None),
                           attack_labels(true, rule, target, num_classes), true, index)
