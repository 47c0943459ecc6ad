"""What a dataset is: its spec (size, classes, normalisation), uint8 image sets held as tensors, and
the content fingerprint that ties a record to the data it was made from."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from utils.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    """What the code needs to know about a dataset; augmentation settings live in its prototype yaml."""
    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Normalisation constants are BackdoorBench's (utils/aggregate_block/dataset_and_transform_generate.py).
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "gtsrb": DatasetSpec("gtsrb", 43, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": DatasetSpec("tiny", 200, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


@dataclass
class ImageSet:
    """Images as uint8 ``[N, C, H, W]`` and labels as int64 ``[N]``, on any device."""
    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] and match the images")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class Dataset:
    spec: DatasetSpec
    train: ImageSet
    test: ImageSet
    classes: list[str]
    fingerprint: str = field(default="")


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A content hash of tensors (shape, dtype and bytes): names data independent of where it lives."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
