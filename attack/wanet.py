"""WaNet: a fixed, smooth warping field as the trigger, trained in by poisoning every batch afresh.

Paper: Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021. Defaults
and procedure follow BackdoorBench's ``attack/wanet.py`` with its ``config/attack/wanet/default.yaml``
over ``config/attack/prototype/cifar10.yaml``: k 4, s 0.5, grid_rescale 1, cross_ratio 2, pratio 0.1,
target 0, all2one; random crop 5, random rotation 10; SGD lr 0.01, momentum 0.9, wd 5e-4, batch 128,
100 epochs; MultiStepLR with milestones 100/200/300/400 and gamma 0.1, so the learning rate never
decays within the 100 epochs (kept as BackdoorBench has it).

The trigger (built once, saved in the record):
    noise = U(-1, 1)^(1 x 2 x k x k) / mean|noise|          (mean absolute value normalised to 1)
    field = bicubic_upsample(noise, H x W, align_corners=True), as [1, H, W, 2] (x offset, y offset)
    grid  = clamp((identity + s * field / H) * grid_rescale, -1, 1)
with ``identity`` the pixel-centre grid of ``grid_sample(align_corners=True)`` in [-1, 1]. A
backdoored image is ``grid_sample(x, grid, bilinear, align_corners=True)`` computed in float on the
0..255 scale and rounded to uint8; :func:`warp` is that one function, used for the backdoor test
set (``apply_trigger``) and for the backdoor part of every training batch alike.

Training (the batch hook, :func:`poison_batch` then :func:`augment_batch`): in every shuffled batch
of B images the first ``num_bd = int(pratio * B)`` are warped with ``grid`` and relabelled (all2one:
the target; all2all: (y + 1) mod K); the next ``int(num_bd * cross_ratio)`` are warped with a noise
grid ``clamp(grid + U(-1, 1)^(H x W x 2) / H, -1, 1)`` (a fresh draw per image, about half a
pixel) and keep their true labels; the rest stay clean. When ``pratio * B < 1`` one sample is
poisoned with probability ``pratio * B`` (BackdoorBench's ``generalize_to_lower_pratio``). The
poisoned samples therefore change every epoch, and no training sample is poisoned once for all:
``select_poison_index`` is empty, so the record's ``train_poison_index`` is empty and its poisoned
training set is the clean one. Then WaNet's own augmentation replaces the default crop/flip, on the
whole batch as BackdoorBench applies its torchvision transforms to the batch tensor, so ONE draw per
batch: RandomCrop(padding 5) with probability 0.8, RandomRotation(10) with probability 0.5 (nearest
neighbour, torchvision's default interpolation), RandomHorizontalFlip(0.5) on CIFAR-10 only. The
crop is padding + slicing; the rotation is torchvision's tensor ``rotate`` grid (centre of the
image, ``grid_sample`` nearest, ``align_corners=False``) recomputed here batched; every random draw
comes from the loader's generator, so a resumed run is bit-identical. ``--random_crop_padding`` and
``--random_hflip`` (the default augmentation) are not used by this attack: a value given for either
is logged as ignored (``ignored_flags``).

Where this differs from BackdoorBench, and why:
  * BackdoorBench warps and augments normalised tensors; here the warp runs on the 0..255 scale
    (the same result, since the clamped grid never samples outside the image and bilinear weights
    sum to one) and the crop padding and rotation fill use the dataset mean colour, which is what
    BackdoorBench's zero fill is in normalised space;
  * warped training images are rounded to uint8, like the test ones, so the training and test
    triggers are the same function; BackdoorBench trains on unrounded floats, and its stored
    backdoor test images pass through ``ToPILImage`` (x * 255 truncated, not rounded);
  * noise-warped images are rounded to uint8 as well (one warp function);
  * the augmentation draws a crop offset, a rotation angle and a flip every batch, and uses them
    only when the crop / rotation is drawn to apply (BackdoorBench draws the offsets only then, from
    Python's and torch's global generators);
  * ``pratio * (1 + cross_ratio) > 1`` is refused (BackdoorBench's batch split fails there).

    python attack/wanet.py --save_folder_name wanet_demo
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attack.base import Attack, register_attack
from attack.runner import run_attack
from utils.backdoor import attack_labels, stream_generator
from utils.cli import cli_main
from utils.errors import UserError

CROP_P = 0.8       # BackdoorBench's ProbTransform(RandomCrop(...), p=0.8)
ROTATION_P = 0.5   # ProbTransform(RandomRotation(...), p=0.5)
FLIP_P = 0.5       # RandomHorizontalFlip() (p=0.5), CIFAR-10 only


# ----------------------------------------------------------------------------- the warping field

def identity_grid(size: int, device=None) -> torch.Tensor:
    """[1, size, size, 2]: the sampling grid that leaves an image unchanged under
    ``grid_sample(align_corners=True)``; last axis (x = column, y = row) in [-1, 1]."""
    a = torch.linspace(-1, 1, size, device=device)
    rows, cols = torch.meshgrid(a, a, indexing="ij")
    return torch.stack((cols, rows), dim=2)[None]


def random_field(k: int, generator: torch.Generator) -> torch.Tensor:
    """The k x k random field [1, 2, k, k]: uniform in [-1, 1], divided by its mean absolute value."""
    noise = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    return noise / noise.abs().mean()


def warp_grid(noise: torch.Tensor, s: float, grid_rescale: float, size: int) -> torch.Tensor:
    """The backdoor sampling grid [1, size, size, 2] from the k x k field (see the module docstring)."""
    field = F.interpolate(noise, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    grid = (identity_grid(size, noise.device) + s * field / size) * grid_rescale
    return grid.clamp(-1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """uint8 [N,C,H,W] sampled at ``grid`` ([1 or N, H, W, 2]) bilinearly with align_corners=True,
    in float on the 0..255 scale, rounded back to uint8. The trigger at training and test time."""
    if images.shape[0] == 0:
        return images
    grid = grid.to(images.device, torch.float32).expand(images.shape[0], -1, -1, -1)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def noise_grids(grid: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` noise-mode grids: the backdoor grid plus uniform noise in [-1, 1] / H, clamped."""
    _, h, w, _ = grid.shape
    noise = torch.rand(count, h, w, 2, device=grid.device, generator=generator) * 2 - 1
    return (grid + noise / h).clamp(-1, 1)


# ----------------------------------------------------------------------------- per-batch poisoning

def batch_counts(pratio: float, cross_ratio: float, batch: int, generator: torch.Generator,
                 device=None) -> tuple[int, int]:
    """(backdoor, noise) sample counts of a batch: ``int(pratio * B)`` and ``int(that * cross_ratio)``;
    below one sample per batch, one with probability ``pratio * B`` (BackdoorBench's
    ``generalize_to_lower_pratio``, drawn here from the loader's generator)."""
    expected = pratio * batch
    if expected >= 1:
        num_bd = int(expected)
    else:
        num_bd = int(torch.rand(1, device=device, generator=generator).item() < expected)
    num_cross = min(int(num_bd * cross_ratio), batch - num_bd)
    return num_bd, num_cross


def poison_batch(images: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor, *, pratio: float,
                 cross_ratio: float, rule: str, target: int, num_classes: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """WaNet's training batch before augmentation: first the backdoor samples (warped with ``grid``,
    attack labels), then the noise samples (noise grids, true labels), then the clean rest."""
    num_bd, num_cross = batch_counts(pratio, cross_ratio, images.shape[0], generator, images.device)
    grid = grid.to(images.device)
    noisy = noise_grids(grid, num_cross, generator)
    images, labels = images.clone(), labels.clone()
    images[:num_bd] = warp(images[:num_bd], grid)
    labels[:num_bd] = attack_labels(labels[:num_bd], rule, target, num_classes)
    images[num_bd:num_bd + num_cross] = warp(images[num_bd:num_bd + num_cross], noisy)
    return images, labels


# ----------------------------------------------------------------------------- batch augmentation

@dataclass
class AugmentParams:
    """One draw of WaNet's augmentation for a whole batch (0-dim tensors on the batch's device)."""
    crop_top: torch.Tensor    # row offset into the padded batch, in 0..2*padding
    crop_left: torch.Tensor   # column offset
    angle: torch.Tensor       # degrees, counter-clockwise as torchvision's rotate; 0 = no rotation
    flip: torch.Tensor        # bool


def draw_augment_params(generator: torch.Generator, device, padding: int, degrees: float) -> AugmentParams:
    """Draw crop, rotation and flip for one batch; a crop or rotation not drawn to apply is the
    identity (offset ``padding``, angle 0). Always the same number of draws, and no host sync."""
    u = torch.rand(4, device=device, generator=generator)
    offsets = torch.randint(0, 2 * padding + 1, (2,), device=device, generator=generator)
    offsets = torch.where(u[0] < CROP_P, offsets, torch.full_like(offsets, padding))
    angle = (u[1].double() * 2 - 1) * degrees
    angle = torch.where(u[2] < ROTATION_P, angle, torch.zeros_like(angle))
    return AugmentParams(offsets[0], offsets[1], angle, u[3] < FLIP_P)


def crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int,
         fill: torch.Tensor) -> torch.Tensor:
    """torchvision ``RandomCrop(size, padding)`` with one offset for the batch: pad with ``fill``
    ([1,C,1,1]), then slice the original size at (top, left)."""
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = fill.to(images.dtype).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = images
    rows = top + torch.arange(h, device=images.device)
    cols = left + torch.arange(w, device=images.device)
    return padded.index_select(2, rows).index_select(3, cols)


def rotation_grid(angle: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[1, h, w, 2] sampling grid of torchvision's tensor ``rotate(img, angle)`` about the image
    centre (no expansion): output pixel centres, inverse-rotated, over ``grid_sample(align_corners=False)``."""
    rad = torch.deg2rad(-angle.double())
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    theta = torch.stack([cos, sin, zero, -sin, cos, zero]).float().view(1, 2, 3)
    dev = theta.device
    base = torch.ones(1, h, w, 3, device=dev)
    base[..., 0] = torch.arange(w, device=dev, dtype=torch.float32) - w * 0.5 + 0.5
    base[..., 1] = (torch.arange(h, device=dev, dtype=torch.float32) - h * 0.5 + 0.5)[:, None]
    scale = torch.tensor([0.5 * w, 0.5 * h], device=dev)
    return base.view(1, h * w, 3).bmm(theta.transpose(1, 2) / scale).view(1, h, w, 2)


def rotate(images: torch.Tensor, angle: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """torchvision ``RandomRotation`` for a given angle, on a float batch: nearest neighbour, pixels
    from outside the image take ``fill`` ([1,C,1,1])."""
    n, c, h, w = images.shape
    grid = rotation_grid(angle, h, w).expand(n, -1, -1, -1)
    ones = torch.ones(n, 1, h, w, device=images.device, dtype=images.dtype)
    out = F.grid_sample(torch.cat([images, ones], 1), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    inside = out[:, -1:] >= 0.5
    return torch.where(inside, out[:, :-1], fill.to(images.dtype))


def apply_augment(images: torch.Tensor, params: AugmentParams, *, padding: int, degrees: float, hflip: bool,
                  fill: torch.Tensor) -> torch.Tensor:
    """Crop, rotation, flip (BackdoorBench's PostTensorTransform order) with given parameters; float out."""
    x = images.float()
    fill = fill.to(x.device, torch.float32).view(1, -1, 1, 1)
    x = crop(x, params.crop_top, params.crop_left, padding, fill)
    if degrees > 0:
        x = rotate(x, params.angle, fill)
    if hflip:
        x = torch.where(params.flip, x.flip(3), x)
    return x


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, padding: int, degrees: float,
                  hflip: bool, fill: torch.Tensor) -> torch.Tensor:
    """WaNet's augmentation of a whole batch, one draw per batch from ``generator``; float 0..255 out."""
    params = draw_augment_params(generator, images.device, padding, degrees)
    return apply_augment(images, params, padding=padding, degrees=degrees, hflip=hflip, fill=fill)


# ----------------------------------------------------------------------------- the attack

@register_attack
class WaNet(Attack):
    """WaNet warping-based attack (Nguyen & Tran, ICLR 2021), BackdoorBench defaults."""
    name = "wanet"
    ignored_flags = {"random_crop_padding": "WaNet augments with its own --random_crop and --random_rotation",
                     "random_hflip": "WaNet flips CIFAR-10 batches in its own augmentation"}

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--k", type=int, help="side of the random control field (k x k)")
        parser.add_argument("--s", type=float, help="warping strength")
        parser.add_argument("--grid_rescale", type=float, help="scale of the warped grid before clamping")
        parser.add_argument("--cross_ratio", type=float, help="noise-mode samples per backdoor sample in "
                            "each batch (rho_n = pratio * cross_ratio)")
        parser.add_argument("--random_crop", type=int, help="WaNet augmentation: random crop padding "
                            "(applied with probability 0.8)")
        parser.add_argument("--random_rotation", type=float, help="WaNet augmentation: random rotation "
                            "in degrees (applied with probability 0.5)")

    @classmethod
    def check_flags(cls, cfg, spec) -> None:
        checks = [
            (1 <= cfg.k <= spec.image_size, f"--k {cfg.k} must be between 1 and the image size {spec.image_size} "
                                            f"(the control grid's side; BackdoorBench's default is 4)"),
            (math.isfinite(cfg.s) and cfg.s >= 0, f"--s {cfg.s} must be a finite number >= 0"),
            (math.isfinite(cfg.grid_rescale) and cfg.grid_rescale > 0,
             f"--grid_rescale {cfg.grid_rescale} must be a finite number > 0"),
            (math.isfinite(cfg.cross_ratio) and cfg.cross_ratio >= 0,
             f"--cross_ratio {cfg.cross_ratio} must be a finite number >= 0"),
            (0 <= cfg.random_crop <= spec.image_size,
             f"--random_crop {cfg.random_crop} must be between 0 and the image size {spec.image_size}"),
            (math.isfinite(cfg.random_rotation) and 0 <= cfg.random_rotation <= 180,
             f"--random_rotation {cfg.random_rotation} must be between 0 and 180 degrees"),
            (cfg.pratio * (1 + cfg.cross_ratio) <= 1,
             f"--pratio {cfg.pratio} with --cross_ratio {cfg.cross_ratio} asks for more than the whole batch; "
             f"pratio * (1 + cross_ratio) must be at most 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @classmethod
    def make_trigger(cls, cfg, spec, dataset=None) -> dict[str, torch.Tensor]:
        cls.check_flags(cfg, spec)
        noise = random_field(cfg.k, stream_generator(cfg.random_seed, "wanet-field"))
        grid = warp_grid(noise, cfg.s, cfg.grid_rescale, spec.image_size)
        return {"grid": grid.contiguous(), "noise": noise,
                "s": torch.tensor(float(cfg.s), dtype=torch.float64), "k": torch.tensor(int(cfg.k)),
                "grid_rescale": torch.tensor(float(cfg.grid_rescale), dtype=torch.float64)}

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        return warp(images, artifacts["grid"])

    @classmethod
    def select_poison_index(cls, cfg, labels: torch.Tensor) -> torch.Tensor:
        """None: WaNet poisons a fresh share of every batch (see :meth:`batch_hook`), so the record's
        ``train_poison_index`` is empty and its poisoned training set is the clean one."""
        return torch.empty(0, dtype=torch.long)

    @classmethod
    def batch_hook(cls, cfg, artifacts, spec):
        grid = artifacts["grid"]
        fill = torch.tensor(spec.mean) * 255.0  # zero after normalisation, as BackdoorBench's zero fill
        padding, degrees, hflip = int(cfg.random_crop), float(cfg.random_rotation), spec.name == "cifar10"
        options = dict(pratio=float(cfg.pratio), cross_ratio=float(cfg.cross_ratio), rule=cfg.attack_label_trans,
                       target=int(cfg.attack_target), num_classes=spec.num_classes)
        cache: dict = {}

        def hook(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
            if cache.get("device") != x.device:
                cache.update(device=x.device, grid=grid.to(x.device), fill=fill.to(x.device))
            x, y = poison_batch(x, y, cache["grid"], generator=generator, **options)
            return augment_batch(x, generator, padding=padding, degrees=degrees, hflip=hflip,
                                 fill=cache["fill"]), y
        return hook

    @classmethod
    def snapshot_hook(cls, cfg, artifacts, spec):
        """The poisoning of :meth:`batch_hook` without its augmentation: BackdoorBench's poisoned
        training set after training (backdoor and noise samples at the head of every batch)."""
        options = dict(pratio=float(cfg.pratio), cross_ratio=float(cfg.cross_ratio), rule=cfg.attack_label_trans,
                       target=int(cfg.attack_target), num_classes=spec.num_classes)
        return lambda x, y, generator: poison_batch(x, y, artifacts["grid"].to(x.device), generator=generator,
                                                    **options)


def main(argv: list[str] | None = None):
    return run_attack(WaNet, argv)


if __name__ == "__main__":
    cli_main(main)
