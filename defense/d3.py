"""D3: Distance-Driven Detoxification.

Paper: Wei, Liu, Zha, "Backdoor Mitigation by Distance-Driven Detoxification", ICCV 2025
(Sec. 3.3, Eq. 4; settings of Sec. 4.1). With theta_s the weights of the selected layers, D3 solves

    min_{theta : ||theta_s|| = ||theta_init,s||}   lambda * mean(max(0, CE(f_theta(x), y) - eps))
                                                   - sum_layers ||theta_s - theta_init,s||_F

over all parameters by projected SGD: one unconstrained step on the objective, then each selected
weight is rescaled back onto the sphere of its initial Frobenius norm (the constraint set S, which
removes the "just scale the weights" way of gaining distance). Before training the selected
weights are re-initialised (``--warm_up_method``): ``uniform`` U(-0.5, 0.5) rescaled to the initial
norm (the official default, "random" there), ``near`` (keep), ``middle`` (zero), ``far``
(negated), ``noise`` (plus Gaussian noise of the weights' std).

Defaults: the paper's lambda = 10, eps = 0.1, 5% reserved clean data and theta_s = the layer named
``linear``; the official code's 100 epochs, batch 256, SGD lr 0.01 momentum 0.9 without weight
decay, cosine schedule, BN layers in training mode, and its scaling of the objective by
1 / (lambda + 1) when lambda > 1. ``config/defense/d3/official.yaml`` holds the official code's
own lambda = 0.5. ``--client_optimizer`` is honoured (``adam``: Adam with AMSGrad, as every script
builds it), the projection following each step of whichever optimizer.

Precision, where this differs from the official code: with ``--amp`` (the default) on CUDA the
optimisation's forward passes run under bf16 autocast (the projection rescales the fp32 weights after
each step); the official code's training loop uses no autocast, so it runs in fp32 (D3 is not in
BackdoorBench). ``--amp false`` gives fp32; whether bf16 changes the results is not yet measured here.

    python defense/d3.py --result_file badnet_demo
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.base import Defense
from defense.runner import run_defense
from models import model_layers
from utils.cli import cli_main
from utils.config import str2bool
from utils.errors import UserError
from utils.train import build_optimizer, build_scheduler, fit

WARM_UP_METHODS = ("uniform", "near", "middle", "far", "noise")


def add_arguments(parser) -> None:
    parser.add_argument("--lmd", type=float, help="lambda, weight of the clean-loss penalty")
    parser.add_argument("--eps", type=float, help="epsilon, the clean-loss threshold")
    parser.add_argument("--Lp", type=float, help="norm for the distance and the constraint (2 = Frobenius)")
    parser.add_argument("--select_layer_name", type=str,
                        help="theta_s: a module name (its Linear/Conv2d weights), several joined by commas, "
                             "or all_linear for every nn.Linear (default: the model's: linear for PreAct-ResNet18, "
                             "classifier (its 3 Linear layers) for VGG19-BN, 1.heads.head for ViT)")
    parser.add_argument("--warm_up_method", type=str, help="re-initialisation: " + " | ".join(WARM_UP_METHODS))
    parser.add_argument("--train_mode", type=str2bool, help="BN layers in training mode during D3")


def select_layers(model: nn.Module, spec: str) -> list[tuple[str, nn.Module]]:
    """The layers whose weights form theta_s."""
    modules = dict(model.named_modules())
    if spec == "all_linear":
        chosen = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    else:
        chosen = []
        for name in (s.strip() for s in spec.split(",")):
            if name not in modules:
                linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                shown = ", ".join(linear[-3:]) if len(linear) <= 3 else f"{len(linear) - 3} more ..., " + \
                    ", ".join(linear[-3:])
                raise UserError(f"--select_layer_name {name!r} is not a module of the model; its Linear layers: "
                                f"{shown} (the last is its final classifier), or all_linear")
            chosen += [(f"{name}.{n}" if n else name, m) for n, m in modules[name].named_modules()
                       if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not chosen:
        raise UserError(f"--select_layer_name {spec!r} selects no Linear or Conv2d layer")
    return chosen


def norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(), ord=p)


@torch.no_grad()
def warm_up(weights: list[torch.Tensor], method: str, p: float) -> None:
    """Re-initialise the selected weights in place (official code's ``warm_up_method``)."""
    for w in weights:
        if method == "near":
            continue  # starts at theta_init: slow to leave, since the distance gradient vanishes there
        if method == "middle":
            w.zero_()
        elif method == "far":
            w.neg_()  # the farthest point of the sphere ||w|| = ||w_init||
        elif method == "noise":
            w.add_(torch.randn_like(w) * w.std())
        elif method in ("uniform", "random"):
            target = norm(w, p)
            w.uniform_(-0.5, 0.5).mul_(target / norm(w, p))
        else:
            raise UserError(f"--warm_up_method {method!r}; choose one of: {', '.join(WARM_UP_METHODS)}")


@torch.no_grad()
def project(weights: list[torch.Tensor], init_norms: list[torch.Tensor], p: float) -> None:
    """Rescale each selected weight onto the sphere of its initial norm (the projection onto S)."""
    for w, target in zip(weights, init_norms):
        current = norm(w, p)
        if current > 0:
            w.mul_(target / current)


def d3_objective(logits, labels, weights, init_weights, lmd: float, eps: float, p: float = 2.0):
    """Eq. 4: lambda * mean(max(0, CE - eps)) - sum ||theta_s - theta_init,s||, divided by (lambda + 1)
    when lambda > 1 as in the official code. Returns (objective, clean penalty, distance)."""
    clean = F.relu(F.cross_entropy(logits.float(), labels, reduction="none") - eps).mean()
    distance = sum(norm(w - w0, p) for w, w0 in zip(weights, init_weights))
    objective = lmd * clean - distance
    if lmd > 1:
        objective = objective / (lmd + 1)  # keeps the step size comparable to plain fine-tuning
    return objective, clean, distance


def check_settings(cfg, model) -> None:
    if cfg.select_layer_name is None:  # the model's own choice (models/registry.py: ModelLayers.theta_s)
        cfg.select_layer_name = model_layers(cfg.model, model).d3_layers
    if cfg.lmd < 0 or cfg.eps < 0:
        raise UserError("--lmd and --eps must be non-negative")
    if cfg.Lp < 1:
        raise UserError(f"--Lp {cfg.Lp} gives no norm (the distance and the constraint need p >= 1); 2 is the "
                        f"paper's Frobenius norm")
    if cfg.warm_up_method not in WARM_UP_METHODS + ("random",):
        raise UserError(f"--warm_up_method {cfg.warm_up_method!r}; choose one of: {', '.join(WARM_UP_METHODS)}")
    select_layers(model, cfg.select_layer_name)


def purify(model, clean, cfg, report):
    check_settings(cfg, model)
    layers = select_layers(model, cfg.select_layer_name)
    weights = [m.weight for _, m in layers]
    init_weights = [w.detach().clone() for w in weights]
    init_norms = [norm(w, cfg.Lp) for w in init_weights]
    warm_up(weights, cfg.warm_up_method, cfg.Lp)

    def loss_fn(model, x, y):
        logits = model(x)
        objective, clean_penalty, distance = d3_objective(logits, y, weights, init_weights, cfg.lmd, cfg.eps, cfg.Lp)
        return objective, {"train_loss": objective.detach(), "clean_loss": F.cross_entropy(logits.detach().float(), y),
                           "clean_penalty": clean_penalty.detach(),
                           "distance": distance.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}

    optimizer = build_optimizer(model.parameters(), cfg)  # the default: the official code's SGD
    scheduler = build_scheduler(optimizer, cfg, cfg.epochs)
    fit(model, clean.loader(cfg.batch_size, cfg.random_seed), optimizer, scheduler, loss_fn, epochs=cfg.epochs,
        amp=cfg.amp, train_mode=cfg.train_mode,
        after_step=lambda: project(weights, init_norms, cfg.Lp), on_epoch_end=report, desc="d3")
    return model


DEFENSE = Defense("d3", purify, __doc__.splitlines()[0], add_arguments, validate=check_settings)


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
