"""One training loop for attacks and defenses, plus optimizer and scheduler builders.

``fit`` is deliberately small: a loss function ``(model, x, y) -> (loss, logs)`` says what is
optimised, ``after_step`` runs after every optimiser step (D3's projection), and ``on_epoch_end``
receives the epoch's training statistics (the runner's reporting hook; its return value is ignored).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.errors import UserError

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def cross_entropy_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, {"train_loss": loss.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    name = cfg.client_optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd)
    raise UserError(f"unknown --client_optimizer {cfg.client_optimizer!r}; choose sgd, adam or adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, epochs: int):
    """Per-epoch schedulers with BackdoorBench's names."""
    name = str(cfg.lr_scheduler).lower()
    if name in ("cosineannealinglr", "cosine"):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "multisteplr":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.steplr_milestones),
                                                    gamma=cfg.steplr_gamma)
    if name == "steplr":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.steplr_stepsize,
                                               gamma=cfg.steplr_gamma)
    if name in ("none", "constant"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise UserError(f"unknown --lr_scheduler {cfg.lr_scheduler!r}; choose CosineAnnealingLR, MultiStepLR, "
                    f"StepLR or none")


def fit(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, loss_fn: LossFn, *,
        epochs: int, start_epoch: int = 0, amp: bool = False, train_mode: bool = True,
        after_step: Callable[[], None] | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None, desc: str = "train") -> None:
    device = next(model.parameters()).device
    for epoch in tqdm(range(start_epoch, epochs), desc=desc, initial=start_epoch, total=epochs, unit="epoch"):
        loader.set_epoch(epoch)
        model.train(train_mode)
        lr = optimizer.param_groups[0]["lr"]
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        start = time.perf_counter()
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="batch"):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                loss, logs = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            n = y.shape[0]
            seen += n
            for k, v in logs.items():  # summed on the device: no host sync per step
                sums[k] = sums.get(k, 0) + v.detach().float() * n
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        stats = {k: (v / max(seen, 1)).item() for k, v in sums.items()}
        stats.update(lr=lr, train_seconds=seconds, train_images_per_s=seen / max(seconds, 1e-9))
        scheduler.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
