"""Blended: a whole-image key pattern blended into poisoned training images, labels flipped to the target.

Paper: Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017 (arXiv:1712.05526), the blended-injection strategy. The trigger is

    x' = (1 - alpha) * x + alpha * t

over every pixel and channel, with t the key pattern resized to the data's size. Defaults follow
BackdoorBench's ``blended`` on CIFAR-10 (its config/attack/blended/default.yaml): alpha 0.2 at
training time (``--attack_train_blended_alpha``) and at test time (``--attack_test_blended_alpha``),
pratio 0.1, target 0, all2one; data poisoning only.

Taken from BackdoorBench (utils/aggregate_block/bd_attack_generate.py, utils/bd_img_transform/blended.py):
    * the key image is read as RGB, resized to the data's size with PIL bilinear interpolation
      (torchvision ``Resize`` on a PIL image), and used as float32 values 0..255;
    * the blend is computed in float (float64 for ``(1 - alpha) * x``, float32 for ``alpha * t``,
      summed in float64, as numpy does there), clipped to [0, 255] and converted to uint8 by
      **truncation** (numpy ``astype(uint8)``), not rounding: 0.8 * 101 + 0.2 * 0 = 80.8 gives 80.
      This implementation repeats those float steps, so its images equal BackdoorBench's bit for bit.

Differences from BackdoorBench:
    * the default key. BackdoorBench's default is its ``resource/blended/hello_kitty.jpeg``, which
      this project does not ship. Without ``--attack_trigger_img_path`` the key is a uniform noise image
      (every pixel and channel uniform in 0..255) drawn from numpy's legacy ``RandomState(0)``, a
      fixed seed independent of ``--random_seed``, so every run and seed shares one key as if it
      were a fixed file (Chen et al. use such a random-noise key beside the Hello Kitty one). To run
      BackdoorBench's benchmark setting pass
      ``--attack_trigger_img_path ../shared/data/backdoorbench-resource/blended/hello_kitty.jpeg``;
    * an image with an alpha channel or a palette is converted to RGB (BackdoorBench would fail on
      a 4-channel key); a greyscale key is repeated on the three channels, as its broadcasting does.

The record's ``trigger.safetensors`` holds ``trigger`` (the resized key, uint8 [C, H, W]),
``alpha_train`` and ``alpha_test`` (float64 scalars).

    python attack/blended.py --save_folder_name blended_demo \\
        --attack_trigger_img_path ../shared/data/backdoorbench-resource/blended/hello_kitty.jpeg
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from attack.base import Attack, register_attack
from attack.runner import run_attack
from utils.cli import cli_main
from utils.config import check_range
from utils.errors import UserError

NOISE_SEED = 0  # the default key's generator seed: fixed, not --random_seed


def read_key_image(path: str, size: int) -> np.ndarray:
    """The key image at ``path`` as uint8 [3, size, size]: RGB, resized with PIL bilinear
    interpolation as BackdoorBench's ``transforms.Resize`` on a PIL image does."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --attack_trigger_img_path {path} ({e}); give a PNG or JPEG file") from None


def noise_key(size: int) -> np.ndarray:
    """The default key: uniform noise in 0..255, uint8 [3, size, size], from the fixed seed ``NOISE_SEED``."""
    return np.random.RandomState(NOISE_SEED).randint(0, 256, size=(3, size, size)).astype(np.uint8)


def blend(images: torch.Tensor, key: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(1 - alpha) * images + alpha * key`` with BackdoorBench's float steps, clipped and truncated to uint8."""
    alpha = alpha.to(images.device, torch.float64)
    kept = images.to(torch.float64) * (1.0 - alpha)                                   # float64, as numpy
    added = key.to(images.device, torch.float32) * alpha.to(torch.float32)            # float32, as numpy
    return (kept + added.to(torch.float64)).clamp_(0, 255).to(torch.uint8)            # truncation


@register_attack
class Blended(Attack):
    """Blended whole-image key attack (Chen et al. 2017), BackdoorBench defaults (alpha 0.2)."""
    name = "blended"
    local_keys = ("attack_trigger_img_path",)

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--attack_trigger_img_path", type=str,
                            help="key image, any size, resized to the data's (default: the project's "
                            "fixed uniform-noise key; BackdoorBench's is resource/blended/hello_kitty.jpeg)")
        parser.add_argument("--attack_train_blended_alpha", type=float, help="blend ratio on poisoned training images")
        parser.add_argument("--attack_test_blended_alpha", type=float, help="blend ratio on backdoor test images")

    @classmethod
    def check_flags(cls, cfg, spec) -> None:
        for key in ("attack_train_blended_alpha", "attack_test_blended_alpha"):
            check_range(key, getattr(cfg, key), 0.0, 1.0)

    @classmethod
    def make_trigger(cls, cfg, spec, dataset=None) -> dict[str, torch.Tensor]:
        cls.check_flags(cfg, spec)
        path = getattr(cfg, "attack_trigger_img_path", None)
        key = read_key_image(path, spec.image_size) if path else noise_key(spec.image_size)
        return {"trigger": torch.from_numpy(key),
                "alpha_train": torch.tensor(float(cfg.attack_train_blended_alpha), dtype=torch.float64),
                "alpha_test": torch.tensor(float(cfg.attack_test_blended_alpha), dtype=torch.float64)}

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        return blend(images, artifacts["trigger"], artifacts["alpha_test"])

    @classmethod
    def apply_train_trigger(cls, images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        return blend(images, artifacts["trigger"], artifacts["alpha_train"])


def main(argv: list[str] | None = None):
    return run_attack(Blended, argv)


if __name__ == "__main__":
    cli_main(main)
