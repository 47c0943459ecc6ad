"""One training loop for attacks and defenses, plus optimizer and scheduler builders.

``fit`` is deliberately small: a loss function ``(model, x, y) -> (loss, logs)`` says what is
optimised, ``after_step`` runs after every optimiser step (D3's projection; a trained trigger's own
optimiser), ``on_epoch_start`` before every epoch (i-BAU's perturbation of the round), ``after_epoch``
after every epoch's scheduler step (a trained trigger's scheduler), and ``on_epoch_end`` receives the
epoch's training statistics (the runner's reporting hook; its return value is ignored). Each step goes through
``optimizer.step(closure)``, PyTorch's protocol for optimisers that re-evaluate the loss, so a
two-pass optimiser (:class:`utils.sam.SAM`) needs nothing else from the loop.

Resuming is part of the loop, so every attack and defense gets it without code of its own: when
``on_epoch_end`` is an :class:`EpochHook`, ``fit`` asks it to restore the state of this training
stage (named by ``desc``; a script may run several stages) before the first epoch, and to save it
after every epoch: model, optimizer, scheduler, any ``extra_state`` objects, the epoch and the RNG
state, so a resumed run continues with exactly the numbers an uninterrupted one would have.
"""
from __future__ import annotations

import math
import time
from copy import deepcopy
from typing import Callable

import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.progress import progress

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def cross_entropy_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, {"train_loss": loss.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}


# BackdoorBench's adam_betas (set in its SAU and i-BAU configs, config/defense/{sau,i-bau}/*.yaml): PyTorch's default.
ADAM_BETAS = (0.9, 0.999)


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """``--client_optimizer`` as BackdoorBench's ``argparser_opt_scheduler`` builds it: SGD with momentum, or Adam
    with AMSGrad (``amsgrad=True``, betas 0.9 and 0.999), the model optimizer of SAU and i-BAU. ``adamw`` is
    PyTorch's AdamW, which BackdoorBench does not offer."""
    name = cfg.client_optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=ADAM_BETAS, weight_decay=cfg.wd, amsgrad=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd)
    raise UserError(f"unknown --client_optimizer {cfg.client_optimizer!r}; choose sgd, adam or adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, epochs: int):
    """Schedulers with BackdoorBench's names. The cosine's period is ``epochs`` unless the config sets
    ``cos_t_max`` (BackdoorBench's key; its builder fixes T_max at 100 whatever the run's length)."""
    name = str(cfg.lr_scheduler).lower()
    if name in ("cosineannealinglr", "cosine"):
        t_max = getattr(cfg, "cos_t_max", None) or epochs
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    if name == "multisteplr":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.steplr_milestones),
                                                    gamma=cfg.steplr_gamma)
    if name == "steplr":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.steplr_stepsize,
                                               gamma=cfg.steplr_gamma)
    if name == "reducelronplateau":  # BackdoorBench's Tiny-ImageNet prototype; stepped on the epoch's train loss
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    if name in ("none", "constant"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise UserError(f"unknown --lr_scheduler {cfg.lr_scheduler!r}; choose CosineAnnealingLR, MultiStepLR, "
                    f"StepLR, ReduceLROnPlateau or none")


class EpochHook:
    """An ``on_epoch_end`` hook that can also checkpoint: ``fit`` calls ``start`` and ``restore`` once
    before training and ``save`` after each epoch's ``__call__``. The base class keeps nothing."""

    def __call__(self, epoch: int, stats: dict) -> None:
        pass

    def start(self, stage: str, epochs: int, model: torch.nn.Module) -> None:
        """A training stage begins: its name, its number of epochs and the model it trains."""

    def restore(self, stage: str, objects: dict) -> int:
        """Load the saved state of ``stage`` into ``objects``; return the first epoch still to run."""
        return 0

    def save(self, stage: str, epoch: int, objects: dict) -> None:
        pass


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode with no trainable parameters: a fixed reference (SAU's attacked
    model, NAD's teacher once it is trained)."""
    copy = deepcopy(model).eval()
    copy.requires_grad_(False)
    return copy


def fit(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, loss_fn: LossFn, *,
        epochs: int, start_epoch: int = 0, amp: bool = False, train_mode: bool = True,
        after_step: Callable[[], None] | None = None, on_epoch_start: Callable[[int], None] | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None, desc: str = "train",
        extra_state: dict | None = None, scheduler_per_batch: bool = False,
        after_epoch: Callable[[], None] | None = None) -> None:
    """Train for ``epochs`` epochs; ``extra_state`` names further objects with ``state_dict`` /
    ``load_state_dict`` that a checkpoint must hold (a trigger generator, a second optimizer).
    ``scheduler_per_batch`` steps the scheduler after every batch instead of every epoch."""
    device = next(model.parameters()).device
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **(extra_state or {})}
    checkpointing = isinstance(on_epoch_end, EpochHook)
    if checkpointing:
        on_epoch_end.start(desc, epochs, model)
        start_epoch = max(start_epoch, on_epoch_end.restore(desc, objects))
    for epoch in progress(range(start_epoch, epochs), desc=desc, initial=start_epoch, total=epochs, unit="epoch"):
        loader.set_epoch(epoch)
        model.train(train_mode)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
            model.train(train_mode)
        lr = optimizer.param_groups[0]["lr"]
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        start = time.perf_counter()
        for x, y in progress(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="batch"):
            def closure():
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                    enabled=amp and device.type == "cuda"):
                    loss, logs = loss_fn(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                return loss, logs

            loss, logs = optimizer.step(closure)
            if after_step is not None:
                after_step()
            if scheduler_per_batch:
                scheduler.step()
            n = y.shape[0]
            seen += n
            for k, v in logs.items():  # summed on the device: no host sync per step
                sums[k] = sums.get(k, 0) + v.detach().float() * n
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        stats = {k: (v / max(seen, 1)).item() for k, v in sums.items()}
        stats.update(lr=lr, train_seconds=seconds, train_images_per_s=seen / max(seconds, 1e-9))
        if not math.isfinite(stats.get("train_loss", 0.0)):  # before anything is saved or reported as done
            raise UserError(f"{desc}: the training loss became {stats['train_loss']} in epoch {epoch + 1}/{epochs}, "
                            f"so the weights are no longer numbers; the likely cause is a learning rate too high "
                            f"for this model and data (--lr {lr:g}). Nothing of this epoch was kept")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(stats.get("train_loss", 0.0))
        elif not scheduler_per_batch:
            scheduler.step()
        if after_epoch is not None:
            after_epoch()
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
        if checkpointing:
            on_epoch_end.save(desc, epoch, objects)
