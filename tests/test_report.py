"""What a run tells its user (utils/report.py, utils/progress.py): the time estimate with the quick
start's hint, and progress bars that stay out of redirected logs."""
import io
import logging

import torch

from models import create_model
from utils.datasets import ImageSet
from utils.loader import BatchLoader, Normalizer
from utils.progress import progress
from utils.report import announce_plan


def test_announce_plan_estimates_time_and_suggests_the_quick_start(caplog):
    model = create_model("preactresnet18_w8", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ImageSet(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,)))
    loader = BatchLoader(data, 32, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"), device="cpu")
    logger = logging.getLogger("test-announce")
    with caplog.at_level(logging.INFO, logger="test-announce"):
        announce_plan(logger, torch.device("cpu"), model, loader, epochs=100_000, images_per_epoch=50_000,
                      amp=False, evaluations=100, eval_images=19_000, cpu_hint="try the quick start")
    text = caplog.text
    assert "device cpu" in text and "training and" in text and "evaluation images/s" in text and " h" in text
    assert "long run for a CPU; try the quick start" in text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched


def test_progress_bars_are_off_when_stderr_is_not_a_terminal():
    assert progress(range(3), file=io.StringIO()).disable
