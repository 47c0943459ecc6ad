"""Sharpness-aware minimisation as an optimiser wrapper, written once for every defense that wants it.

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization" (ICLR 2021),
and its adaptive form (ASAM, Kwon et al., ICML 2021) as BackdoorBench's FT-SAM uses it. Each step:
    1. the gradient g at the weights w (the first call of the closure);
    2. the ascent e_w = rho * g / ||g||, or, adaptive, e_w = rho * w^2 * g / || |w| * g ||
       (squared weights outside the norm, |w| inside, as BackdoorBench's SAM computes it);
    3. the gradient at w + e_w (the second call), with BatchNorm running statistics left as they
       were after the first pass;
    4. the weights go back to w and the base optimiser steps with the second gradient.

``SAM.step(closure)`` follows PyTorch's closure protocol, so :func:`utils.train.fit` drives it like
any optimiser. Schedulers and checkpoints use the base optimiser's state (``param_groups`` and
``state_dict`` are the base's).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _BatchNorm

PERTURB_EPS = 1e-12  # BackdoorBench's guard against a zero gradient norm


@contextmanager
def frozen_bn_statistics(model: torch.nn.Module):
    """BatchNorm layers normalise with the batch as usual but leave their running statistics alone."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


class SAM:
    def __init__(self, base: torch.optim.Optimizer, model: torch.nn.Module, rho: float, adaptive: bool = True):
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        self.base, self.model, self.rho, self.adaptive = base, model, rho, adaptive

    @property
    def param_groups(self):
        return self.base.param_groups

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.base.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def ascent(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """e_w for every parameter with a gradient, from the gradients now in ``.grad``."""
        params = self._params()
        if not params:
            return []
        scaled = [(p.abs() * p.grad) if self.adaptive else p.grad for p in params]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled]))
        scale = self.rho / (grad_norm + PERTURB_EPS)
        return [(p, p.grad * scale * (p * p if self.adaptive else 1.0)) for p in params]

    def step(self, closure):
        """One SAM update; returns what the first call of ``closure`` returned."""
        with torch.enable_grad():
            first = closure()
        perturbation = self.ascent()
        saved = [p.detach().clone() for p, _ in perturbation]
        with torch.no_grad():
            for p, e in perturbation:
                p.add_(e)
        with torch.enable_grad(), frozen_bn_statistics(self.model):
            closure()
        with torch.no_grad():  # back to w exactly (BackdoorBench subtracts e_w, which rounds)
            for (p, _), w in zip(perturbation, saved):
                p.copy_(w)
        self.base.step()
        return first
