"""Batches on the device: uint8 images normalised, cropped, flipped (and rotated) in batches on the
training device, with per-epoch generators so a resumed run draws the same batches."""
from __future__ import annotations

import math
from typing import Callable

import torch

from utils.datasets import ImageSet



class Normalizer:
    """uint8 ``[N,C,H,W]`` -> normalised float, on the tensor's device."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() - self.mean) / self.std


def random_crop_flip(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding)`` (zero fill) and ``RandomHorizontalFlip`` on uint8 images."""
    n, _, h, w = images.shape
    dev = images.device
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        images = padded[torch.arange(n, device=dev)[:, None, None, None],
                        torch.arange(images.shape[1], device=dev)[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


def random_rotation(images: torch.Tensor, degrees: float, p: float, generator: torch.Generator,
                    fill: float = 0.0) -> torch.Tensor:
    """Batched ``RandomApply([RandomRotation(degrees)], p)`` as torchvision does it on tensors, one
    draw per image: an angle uniform in [-degrees, degrees] about the centre, nearest-neighbour
    sampling, ``fill`` outside. Float images out."""
    n, dev = images.shape[0], images.device
    apply = torch.rand(n, device=dev, generator=generator) < p
    angle = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * degrees * math.pi / 180
    angle = torch.where(apply, angle, torch.zeros_like(angle))
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    x = images.float() - fill  # zero padding of grid_sample is then the fill value
    return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False) + fill


# A per-batch hook of training-controlled attacks: (uint8 images [B,C,H,W], labels [B], the epoch's
# generator) -> (images as uint8 or float on the 0..255 scale, labels), before normalisation.
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class BatchLoader:
    """Shuffled, augmented, normalised batches from a GPU- (or CPU-) resident uint8 ImageSet.

    The order and augmentation of epoch ``e`` depend only on ``(seed, e)``, so a resumed run
    sees exactly the batches an uninterrupted one would. ``batch_hook`` (training-controlled
    attacks) replaces the default crop/flip: it gets each raw batch and the same generator.
    ``num_batches`` switches to sampling with replacement: that many batches per epoch, each
    drawn uniformly from all images (PyTorch's ``RandomSampler(replacement=True)``; ANP).
    """

    def __init__(self, data: ImageSet, batch_size: int, normalizer: Normalizer, *, device, shuffle: bool = True,
                 crop_padding: int = 0, hflip: bool = False, drop_last: bool = False, seed: int = 0,
                 channels_last: bool = True, batch_hook: BatchHook | None = None, num_batches: int | None = None):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.normalizer, self.device = batch_size, normalizer, torch.device(device)
        self.shuffle, self.crop_padding, self.hflip, self.drop_last = shuffle, crop_padding, hflip, drop_last
        self.seed, self.channels_last, self.epoch = seed, channels_last, 0
        self.batch_hook = batch_hook
        self.num_batches = num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, device=self.device, generator=gen) if self.shuffle else \
            torch.arange(n, device=self.device)
        for b in range(len(self)):
            if self.num_batches is not None:
                idx = torch.randint(0, n, (self.batch_size,), device=self.device, generator=gen)
            else:
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.transform(idx, self.images[idx], self.labels[idx], gen)
            x = self.normalizer(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


    def transform(self, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        """A raw batch (the images at positions ``idx``) to training images on the 0..255 scale and
        labels: the attack's batch hook, or crop and flip. A subclass adds per-sample steps (PDB's
        defensive samples) and calls this."""
        if self.batch_hook is not None:
            return self.batch_hook(x, y, gen)
        if self.crop_padding or self.hflip:
            x = random_crop_flip(x, self.crop_padding, self.hflip, gen)
        return x, y


class FixedBatches:
    """Batches made once (already augmented and normalised) and replayed in the same order every
    epoch: i-BAU's cached pass. Has the loader interface ``fit`` uses."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)
