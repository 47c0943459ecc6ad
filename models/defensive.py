"""A classifier whose defensive backdoor is switched on at inference (PDB: Wei, Zha & Wu, "Mitigating
Backdoor Attack by Injecting Proactive Defensive Backdoor", NeurIPS 2024).

:class:`DefensiveTriggerModel` takes normalised images like any classifier: it returns them to pixel
space, stamps the defender's trigger (``x * (1 - mask) + value * mask``), normalises again, runs the
inner model and maps the prediction back through the reversible label map (the score of class ``i``
is the inner logit of ``label_map[i]``; PDB's map is y -> (y + 1) mod K, so ``label_map[i] = (i + 1)
mod K``). Every metric, later defense and saved model therefore sees a plain classifier, where the
official code's wrapper is a separate object that BackdoorBench's analysis tools do not know.

Everything the wrapper needs is a buffer (the mask, the value, the label map and the dataset's
normalisation), saved in ``model.safetensors`` beside the inner weights (``model.*``), so a record
holds data, not code; the record's ``model_wrapper: pdb`` says to rebuild it (:func:`wrap_model`).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class DefensiveTriggerModel(nn.Module):
    wrapper_name = "pdb"

    def __init__(self, model: nn.Module, mask: torch.Tensor, value: float, label_map: torch.Tensor,
                 mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("trigger_mask", mask.float().reshape(1, *mask.shape[-2:]).clone())  # [1, H, W]
        self.register_buffer("trigger_value", torch.tensor(float(value)))  # in [0, 1] pixel space
        self.register_buffer("label_map", label_map.long().clone())
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).clone())

    def stamp(self, pixels: torch.Tensor) -> torch.Tensor:
        """The defensive trigger on images in [0, 1] pixel space."""
        mask = self.trigger_mask.to(pixels.dtype)
        return pixels * (1 - mask) + self.trigger_value.to(pixels.dtype) * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stamped = self.stamp(x * self.std + self.mean)
        logits = self.model((stamped - self.mean) / self.std)
        return logits[:, self.label_map]

    @property
    def unwrapped(self) -> nn.Module:
        """The inner model alone: predictions without the defensive trigger (a diagnostic)."""
        return self.model


def shifted_label_map(num_classes: int, shift: int) -> torch.Tensor:
    """``label_map`` of the reversible mapping y -> (y + shift) mod K (PDB's ``target_type``)."""
    return (torch.arange(num_classes) + shift) % num_classes


def wrap_model(kind: str, model: nn.Module, num_classes: int, image_size: int, channels: int = 3) -> nn.Module:
    """An empty wrapper of ``kind`` (the name a record stores) around ``model``, its buffers shaped to
    be filled by loading a state dict."""
    if kind != DefensiveTriggerModel.wrapper_name:
        from utils.errors import UserError
        raise UserError(f"the record names the model wrapper {kind!r}, which this toolkit does not have")
    return DefensiveTriggerModel(model, torch.zeros(image_size, image_size), 0.0, torch.arange(num_classes),
                                 [0.0] * channels, [1.0] * channels)
