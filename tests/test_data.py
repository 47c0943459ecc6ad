import pickle

import numpy as np
import pytest
import torch

from utils.datasets import ImageSet
from utils.errors import UserError
from utils.loader import BatchLoader, Normalizer, random_crop_flip
from utils.sources import load_dataset


def test_pickle_layout_loads_exact_pixels(tiny_data, tmp_path):
    ds = load_dataset("cifar10", tiny_data["pickles"], cache_dir=tmp_path)
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (200, 3, 32, 32)
    assert np.array_equal(ds.train.images.numpy(), tiny_data["x_train"])
    assert np.array_equal(ds.test.labels.numpy(), tiny_data["y_test"])
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10


def test_zip_image_folder_holds_the_same_pixels(tiny_data, tmp_path):
    """PNG is lossless: the zipped tree gives the pickles' images, ordered by class then file name."""
    from_zip = load_dataset("cifar10", tiny_data["zip"], cache_dir=tmp_path)
    assert from_zip.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"]
    order = np.argsort(tiny_data["y_train"], kind="stable")
    assert np.array_equal(from_zip.train.images.numpy(), tiny_data["x_train"][order])
    assert np.array_equal(from_zip.train.labels.numpy(), tiny_data["y_train"][order])
    assert from_zip.fingerprint != load_dataset("cifar10", tiny_data["pickles"], cache_dir=tmp_path).fingerprint


def test_cache_is_written_once_and_reused(tiny_data, tmp_path, monkeypatch):
    load_dataset("cifar10", tiny_data["zip"], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("cifar10-*.safetensors"))) == 1
    import utils.sources as sources
    monkeypatch.setattr(sources, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = load_dataset("cifar10", tiny_data["zip"], cache_dir=tmp_path)
    assert len(again.train) == 200


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no cifar10 data found"):
        load_dataset("cifar10", tmp_path / "nowhere.zip", cache_dir=tmp_path)
    with pytest.raises(UserError, match="no cifar10 data found"):
        load_dataset("cifar10", tmp_path / "empty_dir", cache_dir=tmp_path, download=False)
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("mnist", tmp_path, cache_dir=tmp_path)


def test_tampered_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}))
    with pytest.raises(UserError, match="not a readable CIFAR batch"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache", download=False)
    assert not (tmp_path / "pwned").exists()


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
