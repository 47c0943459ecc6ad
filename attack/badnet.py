"""BadNets: a patch trigger stamped on poisoned training images, labels flipped to the target.

Paper: Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
Model Supply Chain", 2017. Defaults follow BackdoorBench's ``badnet`` on CIFAR-10 (the setting of
the D3 paper's Table 1): a 3x3 white patch in the bottom-right corner (BackdoorBench's
``resource/badnet/trigger_image.png``), pratio 0.1, target 0, all2one; data poisoning only.

The trigger is ``x * (1 - mask) + patch * mask`` per pixel and channel. ``--patch_path`` takes any
image; its mask is ``--mask_path`` when given (non-zero = trigger), else the patch's non-zero
pixels, as BackdoorBench's ``AddMaskPatchTrigger`` does.

Other image sizes: BackdoorBench's trigger is a 32x32 frame (``trigger_image.png``) that it resizes
to the dataset's size (torchvision ``Resize`` on the PIL image: bilinear), so on Tiny-ImageNet's
64-pixel images the 3x3 corner becomes a solid 5x5 one inside a soft 7x7 edge. The default trigger
is drawn on that 32-pixel frame and resized the same way, and a ``--patch_path`` / ``--mask_path``
image of 32x32 (BackdoorBench's frames) or of the dataset's size is resized likewise; any other,
smaller image is a patch placed in the bottom-right corner unscaled.

    python attack/badnet.py --save_folder_name badnet_demo
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from attack.base import Attack, register_attack
from attack.runner import run_attack
from utils.cli import cli_main
from utils.errors import UserError

FRAME = 32  # BackdoorBench's trigger images are 32x32 frames, resized to the dataset's image size


def _to_size(frame: np.ndarray, size: int) -> np.ndarray:
    """A [C, FRAME, FRAME] uint8 frame resized to ``size`` as BackdoorBench's ``transforms.Resize``
    does to a PIL image (bilinear)."""
    if frame.shape[1] == size:
        return frame
    return np.asarray(Image.fromarray(frame.transpose(1, 2, 0)).resize((size, size), Image.BILINEAR),
                      dtype=np.uint8).transpose(2, 0, 1)


def _trigger_image(path: str, size: int, what: str) -> np.ndarray:
    image = _read_image(path, what)
    if image.shape[1:] in ((FRAME, FRAME), (size, size)):
        return _to_size(image, size)
    return _place_bottom_right(image, size, what)


def _read_image(path: str, what: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} image {path} ({e}); give a PNG or JPEG file") from None


def _place_bottom_right(array: np.ndarray, size: int, what: str) -> np.ndarray:
    c, h, w = array.shape
    if h > size or w > size:
        raise UserError(f"the {what} is {h}x{w}, larger than the {size}x{size} images; give a smaller one")
    canvas = np.zeros((c, size, size), dtype=np.uint8)
    canvas[:, size - h:, size - w:] = array
    return canvas


@register_attack
class BadNet(Attack):
    """BadNets patch-trigger attack (Gu et al. 2017), BackdoorBench defaults."""
    name = "badnet"
    local_keys = ("patch_path", "mask_path")

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--patch_path", type=str, help="trigger image (default: 3x3 white, bottom-right)")
        parser.add_argument("--mask_path", type=str, help="mask image, non-zero = trigger (default: the "
                            "patch's non-zero pixels)")
        parser.add_argument("--patch_size", type=int, help="side of the default white square patch")

    @classmethod
    def check_flags(cls, cfg, spec) -> None:
        if not cfg.patch_path and not 1 <= cfg.patch_size <= FRAME:
            raise UserError(f"--patch_size {cfg.patch_size} must be between 1 and {FRAME} (the patch is drawn on "
                            f"BackdoorBench's {FRAME}-pixel frame, then resized to the image size)")

    @classmethod
    def make_trigger(cls, cfg, spec, dataset=None) -> dict[str, torch.Tensor]:
        cls.check_flags(cfg, spec)
        size = spec.image_size
        if cfg.patch_path:
            patch = _trigger_image(cfg.patch_path, size, "patch")
        else:
            side = cfg.patch_size
            frame = np.zeros((3, FRAME, FRAME), dtype=np.uint8)
            frame[:, FRAME - side:, FRAME - side:] = 255
            patch = _to_size(frame, size)
        if cfg.mask_path:
            mask = _trigger_image(cfg.mask_path, size, "mask") > 0
        else:
            mask = patch > 0
        # A file's pixels come as a read-only view of the PIL image: copy them into the tensor.
        return {"patch": torch.tensor(patch), "mask": torch.from_numpy(mask.astype(np.uint8))}

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = artifacts["mask"].to(images.device).bool()
        return torch.where(mask, artifacts["patch"].to(images.device), images)


def main(argv: list[str] | None = None):
    return run_attack(BadNet, argv)


if __name__ == "__main__":
    cli_main(main)
