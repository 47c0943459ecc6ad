"""FT-SAM: fine-tuning with sharpness-aware minimisation.

Paper: Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023. The defender fine-tunes all weights on its reserved clean data with
adaptive SAM (:class:`utils.sam.SAM`): the ascent e_w = rho * w^2 * g / || |w| * g || with rho 2.0,
BatchNorm statistics not updated on the second pass, then the SGD step with the gradient at w + e_w.

Defaults: BackdoorBench's ``ft-sam`` settings for CIFAR-10 (config/defense/ft-sam/config.yaml):
100 epochs, batch 256, SGD lr 0.01 momentum 0.9 wd 5e-4, label smoothing 0.1 (BackdoorBench's
``smooth_crossentropy``: 1 - 0.1 on the true class, 0.1 / (K - 1) on each other one), 5% reserved
data drawn in equal numbers from every class (250 images per CIFAR-10 class; ``--index`` still
overrides). Its rho schedule runs from rho_max to rho_min, both 2.0, so rho is constant here.

The learning rate, as the paper's Table 1 measured it: BackdoorBench builds a cosine schedule with
T_max 100 and steps it after every batch, so the rate falls to zero in 100 steps and climbs back in
the next 100 -- a cycle of about 20 epochs at 10 batches per epoch (2,500 images, batch 256).
That is the default (``--lr_per_batch true --cos_t_max 100``); ``--lr_per_batch false`` gives one
cosine over the whole run instead, stepped per epoch with T_max = the epochs.
Not offered: BackdoorBench's gradient decomposition ``alpha`` (GSAM), 0 in its config.

The training loss reported is the cross-entropy against the smoothed targets (BackdoorBench logs the
KL divergence, which differs by the targets' constant entropy; the gradients are the same).

Precision: with ``--amp`` (the default) on CUDA both SAM passes (the gradient at w and the one at
w + e_w) run under bf16 autocast; BackdoorBench's SAM loop uses no autocast (its config's ``amp: True``
reaches none there), so it runs in fp32. ``--amp false`` gives fp32; whether bf16 changes the results
is not yet measured here.

    python defense/ft-sam.py --result_file badnet_demo
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from defense.base import Defense
from defense.runner import run_defense
from utils.cli import cli_main
from utils.config import Config, check_range, str2bool
from utils.sam import SAM
from utils.train import build_optimizer, build_scheduler, fit


def add_arguments(parser) -> None:
    parser.add_argument("--rho", "--rho_max", dest="rho", type=float,
                        help="SAM radius (BackdoorBench's rho_max = rho_min)")
    parser.add_argument("--adaptive", type=str2bool, help="adaptive SAM (weights scale the ascent)")
    parser.add_argument("--label_smoothing", type=float, help="mass spread over the other classes")
    parser.add_argument("--lr_per_batch", type=str2bool,
                        help="step the cosine every batch, as BackdoorBench does (false: once per epoch)")


def smooth_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against 1 - s on the true class and s / (K - 1) on each other class."""
    log_p = F.log_softmax(logits.float(), dim=1)
    k = logits.shape[1]
    target = torch.full_like(log_p, smoothing / (k - 1)).scatter_(1, labels[:, None], 1.0 - smoothing)
    return -(target * log_p).sum(1).mean()


def check_settings(cfg, model=None) -> None:
    check_range("label_smoothing", cfg.label_smoothing, 0.0, 1.0, low_open=False)
    check_range("rho", cfg.rho, 0.0, float("inf"), low_open=False)


def purify(model, clean, cfg, report):
    check_settings(cfg)
    base = build_optimizer(model.parameters(), cfg)
    optimizer = SAM(base, model, rho=cfg.rho, adaptive=cfg.adaptive)
    schedule = cfg if cfg.lr_per_batch else Config(**{**vars(cfg), "cos_t_max": None})  # one cosine per run
    scheduler = build_scheduler(base, schedule, cfg.epochs)

    def loss_fn(model, x, y):
        logits = model(x)
        loss = smooth_cross_entropy(logits, y, cfg.label_smoothing)
        return loss, {"train_loss": loss.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}

    fit(model, clean.loader(cfg.batch_size, cfg.random_seed), optimizer, scheduler, loss_fn, epochs=cfg.epochs,
        amp=cfg.amp, on_epoch_end=report, desc="ft-sam", scheduler_per_batch=cfg.lr_per_batch)
    return model


DEFENSE = Defense("ft-sam", purify, __doc__.splitlines()[0], add_arguments, validate=check_settings,
                  reserve_per_class=True)


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
