import torch

from utils.backdoor import (
    attack_labels,
    backdoor_test_indices,
    backdoor_test_set,
    poison_train_set,
    select_poison_indices,
)
from utils.datasets import ImageSet


def test_poison_index_count_seed_and_spread():
    idx = select_poison_indices(1000, 0.1, seed=3)
    assert len(idx) == 100 and len(idx.unique()) == 100
    assert torch.equal(idx, idx.sort().values)
    assert idx.min() >= 0 and idx.max() < 1000
    assert torch.equal(idx, select_poison_indices(1000, 0.1, seed=3))
    assert not torch.equal(idx, select_poison_indices(1000, 0.1, seed=4))
    assert len(select_poison_indices(999, 0.0015, seed=0)) == round(0.0015 * 999)
    assert len(select_poison_indices(10, 1.0, seed=0)) == 10


def test_poison_indices_cover_all_classes():
    labels = torch.arange(10000) % 10
    idx = select_poison_indices(10000, 0.1, seed=0)
    assert set(labels[idx].tolist()) == set(range(10))


def test_label_transforms():
    y = torch.tensor([0, 1, 5, 9])
    assert attack_labels(y, "all2one", 3, 10).tolist() == [3, 3, 3, 3]
    assert attack_labels(y, "all2all", 0, 10).tolist() == [1, 2, 6, 0]


def test_backdoor_test_set_excludes_target_class():
    labels = torch.tensor([0, 1, 2, 0, 3, 0])
    assert backdoor_test_indices(labels, "all2one", 0, 10).tolist() == [1, 2, 4]
    assert backdoor_test_indices(labels, "all2all", 0, 10).tolist() == list(range(6))
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    bd = backdoor_test_set(ImageSet(images, labels), lambda x: x + 7, "all2one", 0, 10)
    assert (bd.true_labels != 0).all() and (bd.target_labels == 0).all()
    assert bd.index.tolist() == [1, 2, 4] and (bd.images == 7).all()


def test_poison_train_set_touches_only_chosen_samples():
    images = torch.zeros(20, 3, 4, 4, dtype=torch.uint8)
    labels = torch.arange(20) % 5
    idx = torch.tensor([2, 7, 11])
    out = poison_train_set(ImageSet(images, labels), idx, lambda x: x + 1, "all2one", 4, 5)
    assert (out.images[idx] == 1).all() and out.images.sum() == 3 * 3 * 16
    assert out.labels[idx].tolist() == [4, 4, 4]
    keep = torch.ones(20, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(out.labels[keep], labels[keep])
    assert images.sum() == 0  # the clean set is not modified


def test_reserved_and_poison_draws_are_independent():
    from utils.backdoor import random_subset
    poison = set(select_poison_indices(50000, 0.1, seed=0).tolist())
    reserved = set(random_subset(50000, 2500, 0, "reserved").tolist())
    assert 150 < len(poison & reserved) < 350  # about 10% overlap, as for independent draws
