"""PDB: a proactive defensive backdoor injected while training a new model on the poisoned data.

Wei, Zha & Wu, "Mitigating Backdoor Attack by Injecting Proactive Defensive Backdoor", NeurIPS 2024;
settings of the official code (shawkui/Proactive_Defensive_Backdoor, ``defense/pdb.py`` and
``config/defense/pdb/config.yaml``), in config/defense/pdb/config.yaml:

* an in-training defense: the defender holds the poisoned training set (images and labels as given,
  the poisoned samples unmarked) and trains a new model from scratch on all of it plus defensive
  samples -- 100 epochs, batch 256 (last partial batch dropped), SGD lr 0.01 momentum 0.9 wd 5e-4,
  cosine schedule, plain cross-entropy;
* defensive samples: ``--ratio`` 0.1 of the training set, equally from every class (500 per CIFAR-10
  class), each with the defensive trigger -- a 7x7 patch in the top-left corner set to ``--pix_value``
  2.0 in [0, 1] pixel space, deliberately outside the valid range (``--trigger_type`` 0 and 2: the
  official border patterns) -- stamped before augmentation, and the label mapped by the reversible
  y -> (y + ``--target_type``) mod K; repeated ``--sample_frequency`` 5 times in every epoch;
* augmentation: the training set's crop (padding 4) and flip for every sample; defensive samples
  first get a brightness scaling x * U(0.5, 1) (p 0.2), Gaussian noise of std ``--aug`` (0 by
  default, so none; p lmd_3 / (lmd_2 + lmd_3)) and a rotation up to 10 degrees (p 0.5), each drawn
  per sample as torchvision does, here batched on the device;
* at inference the defensive trigger is stamped on every input and the prediction mapped back,
  inside :class:`models.defensive.DefensiveTriggerModel`, so every metric, later defense and saved
  model sees a plain classifier (the official wrapper is a separate object and the official code
  saves the inner model alone). The summary also gives the inner model's figures without the
  trigger (``without_wrapper_*``).

Deliberate difference: the official code draws the defensive indices by the poisoned labels but then
takes the images and labels at those indices from the *clean* training set, which a defender who
holds a poisoned set does not have. Here they come from the set as given (a poisoned sample drawn as
a defensive one keeps its malicious trigger and gets the defensive one too). ``--defensive_source
clean`` reproduces the official behaviour for comparison: it hands the defense the clean training
set, outside the threat model, and the summary says so.

Other differences from the official code: the horizontal flip follows the record's augmentation
(``random_hflip``: on for CIFAR-10, off for GTSRB and Tiny-ImageNet, as in BackdoorBench's training
transform), for the training set and the defensive samples alike, so that the new model is trained
as the attack trained its own (a flip changes the meaning of some traffic signs); the official code
flips every sample on every dataset. With ``--amp`` (the default) on CUDA the training runs under
bf16 autocast; the official training loop uses no autocast (its config's ``amp: True`` reaches none),
so it runs in fp32. ``--amp false`` gives fp32; whether this changes the results is not yet measured
here.

    python defense/pdb.py --result_file badnet_demo
"""
from __future__ import annotations

import torch

from defense.base import Defense
from defense.runner import run_defense
from models.defensive import DefensiveTriggerModel, shifted_label_map
from utils.backdoor import random_subset
from utils.cli import cli_main
from utils.config import check_range
from utils.datasets import ImageSet
from utils.errors import UserError
from utils.loader import BatchLoader, random_rotation
from utils.train import build_optimizer, build_scheduler, cross_entropy_loss, fit


def trigger_mask(trigger_type: int, size: int, dataset: str) -> torch.Tensor:
    """The official defensive trigger shapes, as an [H, W] mask of ones where it is stamped."""
    mask = torch.zeros(size, size)
    if trigger_type == 0:  # a border, 5 pixels wide on Tiny-ImageNet, 1 elsewhere
        w = 5 if dataset == "tiny" else 1
        mask[:, :w] = mask[:, -w:] = mask[:w, :] = mask[-w:, :] = 1
    elif trigger_type == 1:  # a 7x7 patch in the top-left corner
        mask[:7, :7] = 1
    elif trigger_type == 2:  # every other pixel of the border
        mask[::2, 0] = mask[::2, -1] = mask[0, ::2] = mask[-1, ::2] = 1
    else:
        raise UserError(f"--trigger_type {trigger_type}; choose 0 (border), 1 (7x7 corner patch) or 2 (dotted border)")
    return mask


def defensive_per_class(n: int, ratio: float, num_classes: int) -> int:
    """Defensive samples drawn from each class of an ``n``-image training set: int(N * ratio / K)."""
    return int(n * ratio / num_classes)


def epoch_images(cfg, held: int, num_classes: int) -> int:
    """Images in one PDB epoch: the training set and ``sample_frequency`` copies of the defensive samples."""
    return held + cfg.sample_frequency * defensive_per_class(held, cfg.ratio, num_classes) * num_classes


def defensive_index(labels: torch.Tensor, ratio: float, num_classes: int, seed: int) -> torch.Tensor:
    """:func:`defensive_per_class` indices of every class (by the labels as given), drawn with the seed."""
    per_class = defensive_per_class(len(labels), ratio, num_classes)
    chosen = []
    for k in range(num_classes):
        idx = torch.nonzero(labels == k).flatten()
        if len(idx) < per_class:
            raise UserError(f"--ratio {ratio} asks for {per_class} defensive samples of class {k}, which has "
                            f"{len(idx)}; lower --ratio")
        chosen.append(idx[random_subset(len(idx), per_class, seed, f"pdb-defensive:{k}")])
    return torch.cat(chosen)


class DefensiveBatches(BatchLoader):
    """The training set and ``sample_frequency`` copies of the defensive samples in one shuffled
    epoch; a defensive sample gets the trigger and its own augmentation before the shared crop/flip."""

    def __init__(self, data: ImageSet, defensive: torch.Tensor, stamp, cfg, **kwargs):
        super().__init__(data, **kwargs)
        self.defensive = defensive.to(self.device)
        self.stamp, self.cfg = stamp, cfg

    def transform(self, idx, x, y, gen):
        chosen = self.defensive[idx]
        if chosen.any():
            cfg, d = self.cfg, self.stamp(x[chosen].float())
            n, dev = d.shape[0], d.device
            scale = torch.where(torch.rand(n, device=dev, generator=gen) < 0.2,
                                0.5 + 0.5 * torch.rand(n, device=dev, generator=gen), torch.ones(n, device=dev))
            d = d * scale[:, None, None, None]
            if cfg.aug > 0:  # official: RandomApply(x + aug * randn, p = lmd_3 / (lmd_2 + lmd_3)), in [0, 1] space
                noisy = torch.rand(n, device=dev, generator=gen) < cfg.lmd_3 / (cfg.lmd_2 + cfg.lmd_3)
                noise = torch.randn(d.shape, device=dev, generator=gen) * cfg.aug * 255
                d = d + noise * noisy[:, None, None, None]
            x = x.float()
            x[chosen] = random_rotation(d, 10.0, 0.5, gen)
        return super().transform(idx, x, y, gen)


def validate(cfg, model) -> None:
    check_range("ratio", cfg.ratio, 0.0, 1.0)
    trigger_mask(cfg.trigger_type, 8, cfg.dataset)
    if cfg.sample_frequency < 1:
        raise UserError(f"--sample_frequency {cfg.sample_frequency} must be at least 1")
    if cfg.defensive_source not in ("given", "clean"):
        raise UserError(f"--defensive_source {cfg.defensive_source!r}; choose given (the threat model's) or clean "
                        f"(the official code's, for comparison)")
    if cfg.aug < 0 or (cfg.aug > 0 and cfg.lmd_2 + cfg.lmd_3 <= 0):
        raise UserError("--aug must be >= 0, and with --aug > 0, lmd_2 + lmd_3 must be positive")


def purify(model, held, cfg, report):
    """``model``: a new, randomly initialised model; ``held``: the poisoned training set as given."""
    spec, k = held.spec, held.spec.num_classes
    mask = trigger_mask(cfg.trigger_type, spec.image_size, spec.name)
    label_map = shifted_label_map(k, cfg.target_type)
    pick = defensive_index(held.data.labels, cfg.ratio, k, cfg.random_seed)
    source = held.data if cfg.defensive_source == "given" else held.clean_train  # clean: official, for comparison
    images = torch.cat([held.data.images] + [source.images[pick]] * cfg.sample_frequency)
    labels = torch.cat([held.data.labels] + [(source.labels[pick] + cfg.target_type) % k] * cfg.sample_frequency)
    defensive = torch.arange(len(images)) >= len(held.data)
    report.log("defensive samples: %d (%d per class) from the %s training set, x%d per epoch: %d of %d images",
               len(pick), len(pick) // k, "poisoned" if cfg.defensive_source == "given" else "CLEAN (official)",
               cfg.sample_frequency, int(defensive.sum()), len(images))
    report.note(defensive_samples=len(pick), defensive_source=cfg.defensive_source)

    mask_dev = mask.to(held.device)

    def stamp(x):  # on the 0..255 scale, before augmentation
        return x * (1 - mask_dev) + cfg.pix_value * 255.0 * mask_dev

    loader = DefensiveBatches(ImageSet(images, labels), defensive, stamp, cfg, batch_size=cfg.batch_size,
                              normalizer=held.normalizer, device=held.device, shuffle=True,
                              crop_padding=held.crop_padding, hflip=held.hflip, drop_last=True, seed=cfg.random_seed)
    wrapped = DefensiveTriggerModel(model, mask, cfg.pix_value, label_map, spec.mean, spec.std).to(held.device)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, cfg.epochs)
    # The inner model trains; the wrapper (trigger stamped, labels mapped back) is what the reports evaluate.
    fit(wrapped, loader, optimizer, scheduler, lambda m, x, y: cross_entropy_loss(m.model, x, y),
        epochs=cfg.epochs, amp=cfg.amp, on_epoch_end=report, desc="pdb")
    return wrapped


def add_arguments(g) -> None:
    g.add_argument("--pix_value", type=float, help="defensive trigger value in [0, 1] pixel space (2.0: outside it)")
    g.add_argument("--trigger_type", type=int, help="0: border, 1: 7x7 top-left patch, 2: dotted border")
    g.add_argument("--target_type", type=int, help="label shift of the reversible map y -> (y + t) mod K")
    g.add_argument("--sample_frequency", type=int, help="copies of the defensive samples per epoch")
    g.add_argument("--aug", type=float, help="std of Gaussian noise on defensive samples ([0, 1] space)")
    g.add_argument("--lmd_1", type=float, help="official flag, unused: the loss is plain cross-entropy")
    g.add_argument("--lmd_2", type=float, help="with --lmd_3: the --aug noise is applied with p lmd_3/(lmd_2+lmd_3)")
    g.add_argument("--lmd_3", type=float, help="see --lmd_2")
    g.add_argument("--defensive_source", type=str, help="given: from the training set as the defender holds it; "
                   "clean: the official code's clean images and labels (outside the threat model, for comparison)")


DEFENSE = Defense("pdb", purify, __doc__.splitlines()[0], add_arguments, validate=validate, holds="poisoned_train",
                  reads_clean_train=lambda cfg: cfg.defensive_source == "clean", images_per_epoch=epoch_images)


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
