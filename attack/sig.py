"""SIG: a clean-label attack that adds a horizontal sinusoidal signal to target-class training images.

Paper: Barni, Kallas, Tondi, "A new backdoor attack in CNNs by training set corruption without label
poisoning", ICIP 2019 (arXiv:1902.11237), the sinusoidal signal. The trigger adds

    v(i, j) = delta * sin(2 * pi * j * f / W)

to every pixel of column j (W the image width), the same on every row i and every channel, then
clips to [0, 255]. Defaults follow BackdoorBench's ``sig`` on CIFAR-10 (its
config/attack/sig/default.yaml): delta 40, f 6 (``--sig_delta``, ``--sig_f``) at training and test
time, pratio 0.1, target 0, all2one.

Clean-label (BackdoorBench's ``clean_label=True`` poison-index selection): only training images of
the target class are poisoned, and no label changes. ``--pratio`` keeps BackdoorBench's meaning: a
fraction of the WHOLE training set, ``round(pratio * N)`` images drawn with the seed from the target
class only. CIFAR-10's default 0.1 therefore poisons all 5,000 images of class 0; the largest
possible pratio is (size of the target class) / N, and a larger one is refused before anything is
written (BackdoorBench's maintainers confirmed this reading in its issues #13 and #36). The backdoor
test set is every non-target test image with the signal. all2all is refused: a clean-label attack
cannot change labels.

Taken from BackdoorBench (utils/bd_img_transform/sig.py, utils/aggregate_block/bd_attack_generate.py,
utils/backdoor_generate_poison_index.py):
    * the signal: float32 values of ``delta * sin(2 * pi * j * f / W)`` computed in float64;
    * the image: ``uint32(x) + signal`` in float64, clipped to [0, 255] and converted to uint8 by
      **truncation** (numpy ``astype(uint8)``), so 100 - 15.31 gives 84. A consequence kept for
      bit-for-bit agreement: in the columns where the sine is zero in exact arithmetic, float64
      gives a tiny value (e.g. -2.9e-14 at j = 16 for W = 32, f = 6), and truncation lowers those
      pixels by one there when the value is negative;
    * the target-class draw, its count and its error when the class is too small (BackdoorBench
      lets numpy raise; here it is a one-line error naming the largest pratio).
Differences from BackdoorBench: the draw uses this project's seeded ``random_subset`` (stream
"sig_poison") rather than numpy's global generator, so the chosen images differ for a pratio
below the class's share (with the default 0.1 on CIFAR-10 every class-0 image is taken either way).
Older BackdoorBench versions blended the signal with an alpha; the current one, followed here, adds it.

The record's ``trigger.safetensors`` holds ``signal``, the float32 per-column values [W].

    python attack/sig.py --save_folder_name sig_demo
"""
from __future__ import annotations

import math

import torch

from attack.base import Attack, register_attack
from attack.runner import run_attack
from utils.backdoor import random_subset
from utils.cli import cli_main
from utils.errors import UserError


def sig_signal(width: int, delta: float, f: float) -> torch.Tensor:
    """float32 [width]: ``delta * sin(2 pi j f / width)`` per column j, computed in float64 as BackdoorBench does."""
    return torch.tensor([delta * math.sin(2 * math.pi * j * f / width) for j in range(width)], dtype=torch.float32)


def add_signal(images: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] plus the per-column signal [W], in float64, clipped and truncated to uint8."""
    total = images.to(torch.float64) + signal.to(images.device, torch.float64)  # broadcast over N, C, H
    return total.clamp_(0, 255).to(torch.uint8)


@register_attack
class SIG(Attack):
    """SIG clean-label attack (Barni et al. 2019). --pratio: fraction of the WHOLE training set, drawn from the target class only."""  # noqa: E501
    name = "sig"
    clean_label = True

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--sig_delta", type=float, help="amplitude of the sinusoid, in pixel levels 0..255")
        parser.add_argument("--sig_f", type=float, help="frequency: periods of the sinusoid across the image width")

    @classmethod
    def check_flags(cls, cfg, spec) -> None:
        _check_all2one(cfg)
        if not cfg.sig_delta > 0:
            raise UserError(f"--sig_delta {cfg.sig_delta} must be positive (BackdoorBench's default is 40)")
        if not cfg.sig_f > 0:
            raise UserError(f"--sig_f {cfg.sig_f} must be positive (BackdoorBench's default is 6)")

    @classmethod
    def make_trigger(cls, cfg, spec, dataset=None) -> dict[str, torch.Tensor]:
        cls.check_flags(cfg, spec)
        return {"signal": sig_signal(spec.image_size, cfg.sig_delta, cfg.sig_f)}

    @classmethod
    def select_poison_index(cls, cfg, labels: torch.Tensor) -> torch.Tensor:
        """``round(pratio * N)`` training images drawn with the seed from the target class only, sorted."""
        _check_all2one(cfg)
        candidates = torch.nonzero(labels.cpu() == cfg.attack_target).flatten()
        n, available = len(labels), len(candidates)
        count = round(cfg.pratio * n)
        if count > available:
            raise UserError(f"--pratio {cfg.pratio} asks for {count} of {n} training images, but SIG poisons only "
                            f"the target class {cfg.attack_target}, which has {available}; the largest possible "
                            f"--pratio is {available / n:.6g}")
        if count == 0:
            raise UserError(f"--pratio {cfg.pratio} poisons no image of the {n} training images; "
                            f"give at least {1 / n:.6g}")
        return candidates[random_subset(available, count, cfg.random_seed, "sig_poison")]

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        return add_signal(images, artifacts["signal"])


def _check_all2one(cfg) -> None:
    if cfg.attack_label_trans != "all2one":
        raise UserError(f"SIG is a clean-label attack and supports only --attack_label_trans all2one, "
                        f"not {cfg.attack_label_trans!r}")


def main(argv: list[str] | None = None):
    return run_attack(SIG, argv)


if __name__ == "__main__":
    cli_main(main)
