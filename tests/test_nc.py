"""Neural Cleanse: end to end (flagged and not), its outlier rule and cost schedule by hand, and the
batched reverse-engineering against one class at a time."""
import importlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import copy_record, run_args

from models import create_model
from utils.datasets import ImageSet
from utils.loader import BatchLoader, Normalizer
from utils.record import load_tensors

nc = importlib.import_module("defense.nc")
FAST = ["--nc_epoch", "2", "--epochs", "1", "--batch_size", "50", "--ratio", "0.5"]


def test_anomaly_index_by_hand():
    norms = torch.tensor([10.0, 50, 52, 48, 55, 51, 49, 53, 47, 50])
    index, flagged = nc.anomaly_indices(norms)
    # torch.median is the lower middle value: 50; |l1 - 50| has lower median 2, so MAD = 1.4826 * 2
    assert index[0].item() == pytest.approx(40 / (1.4826 * 2)) and index[4].item() == pytest.approx(5 / (1.4826 * 2))
    assert flagged == [0]
    _, none = nc.anomaly_indices(torch.tensor([50.0, 80, 52, 48, 55, 51, 49, 53, 47, 50]))
    assert none == []  # a large norm is no trigger: only classes at or below the median are flagged


def test_cost_schedule_moves_after_patience_epochs():
    cfg = SimpleNamespace(init_cost=1e-3, atk_succ_threshold=98.0, patience=5, cost_multiplier=2.0, early_stop=True,
                          early_stop_threshold=0.99, early_stop_patience=25)
    s = nc.ClassSchedule(cfg)
    mask, pattern = torch.zeros(1, 2, 2), torch.zeros(3, 2, 2)
    for _ in range(5):
        s.end_epoch(99.0, 3.0, mask, pattern)
    assert s.cost == pytest.approx(2e-3) and s.best_norm == 3.0
    for _ in range(5):
        s.end_epoch(50.0, 1.0, mask + 1, pattern)
    assert s.cost == pytest.approx(2e-3 / 2 ** 1.5)
    assert s.best_norm == 3.0 and torch.equal(s.best_mask, mask)  # below the threshold: not a candidate


def test_batched_classes_match_one_class_at_a_time():
    torch.manual_seed(0)
    model = create_model("preactresnet18_w8", 10).eval().requires_grad_(False)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    normalizer = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu")
    loader = BatchLoader(ImageSet(images, torch.zeros(24, dtype=torch.long)), 12, normalizer, device="cpu", seed=0)
    cfg = SimpleNamespace(nc_epoch=2, mask_lr=0.1, init_cost=1e-3, atk_succ_threshold=98.0, patience=5,
                          cost_multiplier=2.0, early_stop=True, early_stop_threshold=0.99, early_stop_patience=25,
                          use_norm=1, amp=False)
    together = nc.reverse_engineer(model, loader, [0, 1], cfg, normalizer, (3, 32, 32))
    alone = nc.reverse_engineer(model, loader, [0], cfg, normalizer, (3, 32, 32)) + \
        nc.reverse_engineer(model, loader, [1], cfg, normalizer, (3, 32, 32))
    for a, b in zip(together, alone):
        assert torch.allclose(a.best_mask, b.best_mask, atol=1e-5)
        assert torch.allclose(a.best_pattern, b.best_pattern, atol=1e-5)


def test_stamp_is_the_blend_in_pixel_space():
    images = torch.full((1, 3, 2, 2), 100, dtype=torch.uint8)
    mask = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    pattern = torch.ones(3, 2, 2)
    out = nc.stamp(images, mask, pattern)
    assert out[0, 0].tolist() == [[100, 255], [178, 139]]  # 100 + m (255 - 100), rounded


@pytest.mark.parametrize("flag", [False, True])
def test_end_to_end(monkeypatch, tiny_data, tiny_record, tmp_path, flag):
    real = nc.anomaly_indices  # both paths, whatever the tiny model's norms say
    monkeypatch.setattr(nc, "anomaly_indices", lambda norms: (real(norms)[0], [0] if flag else []))
    rec = copy_record(tiny_record, tmp_path)
    nc.main(["--result_file", "badnet", *run_args(tiny_data, tmp_path), *FAST])
    out = rec / "defense" / "nc"
    files = {p.name for p in out.iterdir()}
    assert {"record.json", "model.safetensors", "metrics.csv", "summary.json", "nc_triggers.safetensors",
            "nc_mask_0.png", "nc_pattern_9.png"} <= files
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["nc_l1_norms"]) == 10 and len(summary["nc_anomaly_index"]) == 10
    triggers = load_tensors(out / "nc_triggers.safetensors")
    assert triggers["mask"].shape == (10, 1, 32, 32) and triggers["pattern"].shape == (10, 3, 32, 32)
    same = all(torch.equal(a, b) for a, b in zip(load_tensors(rec / "model.safetensors").values(),
                                                  load_tensors(out / "model.safetensors").values()))
    assert summary["nc_model_changed"] == flag and same == (not flag)
    if not flag:
        assert "returned unchanged" in (out / "defense.log").read_text() and summary["nc_flagged"] == []
