"""ACC, ASR, RA and DER, as fractions in [0, 1], in one place.

ACC = accuracy on the clean test set.
ASR = fraction of the backdoor test set classified as the attack's label.
RA  = fraction of the backdoor test set classified as its true label (robust accuracy).
DER = (max(0, dASR) - max(0, dACC) + 1) / 2                    (D3 paper, Eq. 5)
      with dASR = ASR_before - ASR_after and dACC = ACC_before - ACC_after, the drops that a
      defense causes; 1 is a perfect defense, 0.5 one that changes nothing.

``mean`` averages such figures (over seeds, over attacks): None when there is none to average.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels (0.0 for an empty set)."""
    if labels.numel() == 0:
        return 0.0
    return (predictions == labels).float().mean().item()


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """Defense effectiveness rating (Eq. 5 of the D3 paper); arguments are fractions."""
    delta_asr = asr_before - asr_after
    delta_acc = acc_before - acc_after
    return (max(0.0, delta_asr) - max(0.0, delta_acc) + 1.0) / 2.0


def mean(values: Iterable[float]) -> float | None:
    """The arithmetic mean of ``values`` (any iterable, read once), or None when there are none: a
    missing figure, never a made-up 0."""
    values = list(values)
    return sum(values) / len(values) if values else None
