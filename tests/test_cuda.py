"""CUDA paths (skipped without a GPU; CI has none): device-resident batches, bf16 evaluation."""
import pytest
import torch

from models import create_model
from utils.backdoor import backdoor_test_set
from utils.config import Config
from utils.datasets import ImageSet
from utils.evaluate import Evaluator
from utils.loader import BatchLoader, Normalizer
from utils.train import build_optimizer, build_scheduler, cross_entropy_loss, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_training_and_evaluation_on_cuda():
    dev = torch.device("cuda")
    data = ImageSet(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (256,)))
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), dev)
    loader = BatchLoader(data, 64, norm, device=dev, crop_padding=4, hflip=True, channels_last=True)
    x, y = next(iter(loader))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    model = create_model("preactresnet18_w8", 10).to(dev).to(memory_format=torch.channels_last)
    cfg = Config(client_optimizer="sgd", lr=0.01, sgd_momentum=0.9, wd=5e-4, lr_scheduler="CosineAnnealingLR")
    opt = build_optimizer(model.parameters(), cfg)
    rows = []
    fit(model, loader, opt, build_scheduler(opt, cfg, 1), cross_entropy_loss, epochs=1, amp=True,
        on_epoch_end=lambda e, s: rows.append(s))
    assert rows and rows[0]["train_images_per_s"] > 0
    bd = backdoor_test_set(data, lambda im: im, "all2one", 0, 10)
    metrics = Evaluator(data, bd, norm, device=dev, amp=True, channels_last=True)(model)
    assert 0 <= metrics["clean_acc"] <= 1 and 0 <= metrics["asr"] <= 1
