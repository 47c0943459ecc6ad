"""The shared evaluator: ACC / ASR / RA and the matching losses, for reporting only.

Defenses never call this and never see what it returns: the runner does, after the fact or from
an epoch callback whose return value is discarded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.backdoor import BackdoorTestSet
from utils.datasets import ImageSet
from utils.loader import Normalizer
from utils.metrics import accuracy


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, normalizer: Normalizer, *, device,
            batch_size: int = 512, amp: bool = False, channels_last: bool = True) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 images, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = normalizer(images[i:i + batch_size].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=amp and torch.device(device).type == "cuda"):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


class Evaluator:
    """Holds the clean and backdoor test sets on the device; ``__call__(model)`` gives the metrics."""

    def __init__(self, clean_test: ImageSet, backdoor_test: BackdoorTestSet, normalizer: Normalizer, *,
                 device, batch_size: int = 512, amp: bool = False, channels_last: bool = True):
        self.clean_images = clean_test.images.to(device)
        self.clean_labels = clean_test.labels
        self.device = device
        self.set_backdoor(backdoor_test)
        self.kw = dict(normalizer=normalizer, device=device, batch_size=batch_size, amp=amp,
                       channels_last=channels_last)

    def set_backdoor(self, backdoor_test: BackdoorTestSet) -> None:
        """Replace the backdoor test set: an attack whose trigger is trained with the classifier
        (Input-aware) remakes it from the current trigger before each evaluation."""
        self.bd_images = backdoor_test.images.to(self.device)
        self.bd_target, self.bd_true = backdoor_test.target_labels, backdoor_test.true_labels

    @property
    def num_images(self) -> int:
        return self.clean_images.shape[0] + self.bd_images.shape[0]

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        clean_logits = predict(model, self.clean_images, **self.kw)
        bd_logits = predict(model, self.bd_images, **self.kw)
        bd_pred = bd_logits.argmax(1)
        return {
            "clean_acc": accuracy(clean_logits.argmax(1), self.clean_labels),
            "asr": accuracy(bd_pred, self.bd_target),
            "ra": accuracy(bd_pred, self.bd_true),
            "clean_test_loss": F.cross_entropy(clean_logits, self.clean_labels).item(),
            "bd_test_loss": F.cross_entropy(bd_logits, self.bd_target).item() if len(self.bd_target) else 0.0,
            "ra_test_loss": F.cross_entropy(bd_logits, self.bd_true).item() if len(self.bd_true) else 0.0,
        }
