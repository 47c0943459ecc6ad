"""Batches on the device (utils/loader.py): batched crop and flip equal to the per-sample reference, and
a deterministic permutation per epoch."""

import torch

from utils.datasets import ImageSet
from utils.loader import BatchLoader, Normalizer, random_crop_flip


def test_random_crop_flip_matches_per_sample_reference():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, 2, True, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # replay the same draws
    dy = torch.randint(0, 5, (16,), generator=gen)
    dx = torch.randint(0, 5, (16,), generator=gen)
    flip = torch.rand(16, generator=gen) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(16):
        ref = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        ref = ref.flip(2) if flip[i] else ref
        assert torch.equal(out[i], ref)
    assert flip.any() and not flip.all()


def test_batch_loader_is_a_deterministic_permutation_per_epoch():
    data = ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous(),
                    torch.arange(10))
    norm = Normalizer((0, 0, 0), (1 / 255, 1 / 255, 1 / 255), "cpu")
    loader = BatchLoader(data, 4, norm, device="cpu", seed=1)
    assert len(loader) == 3

    def epoch_labels(e):
        loader.set_epoch(e)
        return torch.cat([y for _, y in loader]).tolist()
    assert sorted(epoch_labels(0)) == list(range(10))
    assert epoch_labels(0) == epoch_labels(0) and epoch_labels(0) != epoch_labels(1)
    x, y = next(iter(loader))
    assert torch.allclose(x[:, 0, 0, 0], y.float())  # normalisation: (v - 0) / 1
