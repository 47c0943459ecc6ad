"""ANP: Adversarial Neuron Pruning.

Paper: Wu & Wang, "Adversarial Neuron Perturbation Purifies Backdoored Deep Models", NeurIPS 2021.
Every BatchNorm neuron k gets a mask m_k in [0, 1] (start 1) and multiplicative noise on its weight
and bias: gamma_k * (m_k + d_k) and beta_k * (1 + e_k). On each batch (with replacement from the
clean data, the attack's augmentation, BatchNorm in training mode as in BackdoorBench):
    1. the noise is drawn from U(-eps, eps) and takes ``anp_steps`` signed ascent steps of size
       eps / anp_steps on the cross-entropy;
    2. the masks take one SGD step on alpha * CE(masked model) + (1 - alpha) * CE(masked, noisy
       model) and are clipped to [0, 1].
Neurons whose mask stays small are the ones the backdoor needs: pruning sets their BatchNorm weight
to zero in the attacked model (lowest mask first). The model is not fine-tuned afterwards.

Defaults: BackdoorBench's ``anp`` settings for CIFAR-10 (config/defense/anp/config.yaml): 2,000
batches of 256 (``nb_iter``), eps 0.4, one noise step, alpha 0.2, mask SGD lr 0.01 momentum 0.9,
thresholds 0 to 0.9 in steps of 0.05 (a neuron is pruned when its mask is <= the threshold), 10%
allowed relative accuracy drop, 5% reserved data.

Where BackdoorBench differs, on purpose: it picks the threshold with the **lowest test ASR** among
those within 10% relative **test** accuracy drop (its issue #35), which reads the test sets and the
trigger. Here ``val_ratio`` (10%) of the reserved images are held out (``clean.split``), the masks
learn on the rest, and the threshold is the largest whose held-out clean accuracy stays within the
allowed drop: the only signal a defender has. ``--pruning_number N`` prunes the N lowest-mask
neurons instead. The mask values are saved as ``anp_mask_values.safetensors`` (one tensor per
BatchNorm layer), the held-out accuracy per threshold as ``anp_thresholds.png``; the summary gives
the neurons pruned and the threshold.

Precision: with ``--amp`` (the default) on CUDA the mask training (the noise's ascent steps and the
mask steps) runs under bf16 autocast; BackdoorBench's anp.py uses no autocast, so it runs them in fp32.
The held-out accuracies that choose the threshold are fp32 here. ``--amp false`` gives fp32
throughout; whether bf16 changes the results is not yet measured here.

    python defense/anp.py --result_file badnet_demo
"""
from __future__ import annotations

import itertools
import math
from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from defense.base import Defense
from defense.runner import run_defense
from utils.cli import cli_main
from utils.config import check_range
from utils.errors import UserError
from utils.train import fit

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def add_arguments(parser) -> None:
    parser.add_argument("--val_ratio", type=float, help="share of the reserved data held out to choose the threshold")
    parser.add_argument("--nb_iter", type=int, help="batches of mask training")
    parser.add_argument("--print_every", type=int, help="batches per round (one metrics row)")
    parser.add_argument("--anp_eps", type=float, help="noise budget on the BatchNorm weights and biases")
    parser.add_argument("--anp_steps", type=int, help="signed ascent steps on the noise per batch")
    parser.add_argument("--anp_alpha", type=float, help="weight of the natural loss (1 - alpha: perturbed)")
    parser.add_argument("--pruning_by", type=str, help="threshold (search the held-out data) or number")
    parser.add_argument("--pruning_max", type=float, help="largest threshold tried")
    parser.add_argument("--pruning_step", type=float, help="step between thresholds")
    parser.add_argument("--pruning_number", type=int, help="prune this many lowest-mask neurons (no search)")
    parser.add_argument("--acc_ratio", type=float, help="largest allowed relative drop of held-out accuracy")


def check_settings(cfg, model) -> None:
    if not any(isinstance(m, BN) and m.affine for m in model.modules()):
        raise UserError(f"ANP perturbs BatchNorm neurons and {cfg.model} has no affine BatchNorm layer")
    if cfg.nb_iter < 1 or cfg.print_every < 1 or cfg.anp_steps < 1:
        raise UserError("--nb_iter, --print_every and --anp_steps must be at least 1")
    if cfg.pruning_by not in ("threshold", "number"):
        raise UserError(f"--pruning_by {cfg.pruning_by!r}; choose threshold or number")
    if cfg.pruning_by == "number" and not cfg.pruning_number:
        raise UserError("--pruning_by number needs --pruning_number N")
    if cfg.anp_eps < 0:
        raise UserError(f"--anp_eps {cfg.anp_eps}: the noise budget is a size, 0 or more (BackdoorBench: 0.4)")
    check_range("anp_alpha", cfg.anp_alpha, 0.0, 1.0, low_open=False)
    check_range("acc_ratio", cfg.acc_ratio, 0.0, 1.0, low_open=False)
    check_range("val_ratio", cfg.val_ratio, 0.0, 1.0)


class MaskRounds:
    """ANP's ``nb_iter`` mask batches in rounds of ``print_every`` (one metrics row each), the last
    round holding what is left, so exactly ``nb_iter`` batches run, as BackdoorBench's loop does."""

    def __init__(self, loader, nb_iter: int, per_round: int):
        self.loader, self.nb_iter, self.per_round, self.epoch = loader, nb_iter, per_round, 0
        self.rounds = math.ceil(nb_iter / per_round)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return min(self.per_round, self.nb_iter - self.epoch * self.per_round)

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


class NeuronMask(nn.Module):
    """Parametrisation of a BatchNorm weight: gamma * (mask + noise) while perturbed, else gamma * mask."""

    def __init__(self, n: int, device, perturbed: dict):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(n, device=device))
        self.noise = nn.Parameter(torch.zeros(n, device=device))
        self.perturbed = perturbed

    def forward(self, gamma):
        return gamma * (self.mask + self.noise) if self.perturbed["on"] else gamma * self.mask


class BiasNoise(nn.Module):
    """Parametrisation of a BatchNorm bias: beta * (1 + noise) while perturbed, else beta."""

    def __init__(self, n: int, device, perturbed: dict):
        super().__init__()
        self.noise = nn.Parameter(torch.zeros(n, device=device))
        self.perturbed = perturbed

    def forward(self, beta):
        return beta * (1.0 + self.noise) if self.perturbed["on"] else beta


def perturbable_copy(model: nn.Module):
    """A copy of ``model`` whose BatchNorm neurons carry masks and noise; returns (copy, switch,
    {layer name: mask}, [noise tensors])."""
    net, switch = deepcopy(model), {"on": False}
    net.requires_grad_(False)
    masks, noises = {}, []
    for name, module in net.named_modules():
        if isinstance(module, BN) and module.affine:
            n, device = module.num_features, module.weight.device
            weight, bias = NeuronMask(n, device, switch), BiasNoise(n, device, switch)
            parametrize.register_parametrization(module, "weight", weight)
            parametrize.register_parametrization(module, "bias", bias)
            masks[name] = weight.mask
            noises += [weight.noise, bias.noise]
    return net, switch, masks, noises


def anp_loss(net, switch, noises, x, y, eps: float, steps: int, alpha: float):
    """The masks' objective on one batch, after the noise's ascent."""
    loss_rob = torch.zeros((), device=x.device)
    if eps > 0:
        with torch.no_grad():
            for noise in noises:
                noise.uniform_(-eps, eps)
        switch["on"] = True
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(net(x).float(), y), noises)
            with torch.no_grad():
                for noise, g in zip(noises, grads):
                    noise.add_(g.sign(), alpha=eps / steps)
        loss_rob = F.cross_entropy(net(x).float(), y)
    switch["on"] = False
    logits = net(x).float()
    loss_nat = F.cross_entropy(logits, y)
    loss = alpha * loss_nat + (1 - alpha) * loss_rob
    return loss, {"train_loss": loss.detach(), "natural_loss": loss_nat.detach(), "perturbed_loss": loss_rob.detach(),
                  "train_acc": (logits.argmax(1) == y).float().mean()}


def ranked_neurons(masks: dict[str, torch.Tensor]) -> list[tuple[float, str, int]]:
    """(mask value, layer, index) of every neuron, lowest mask first."""
    return sorted((float(v), name, i) for name, m in masks.items() for i, v in enumerate(m.detach().cpu().tolist()))


@torch.no_grad()
def prune_neurons(model: nn.Module, neurons: list[tuple[float, str, int]]) -> None:
    modules = dict(model.named_modules())
    for _, name, index in neurons:
        modules[name].weight[index] = 0.0


def choose_threshold(model, ranking, thresholds, accuracy, acc_ratio: float):
    """The largest threshold whose pruning keeps ``accuracy(model)`` within ``acc_ratio`` relative
    drop; returns (threshold, neurons pruned at it, [(threshold, accuracy)])."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = accuracy(model)
    best, curve = (0.0, 0), []
    for t in thresholds:
        model.load_state_dict(original)
        count = sum(1 for value, _, _ in ranking if value <= t)
        prune_neurons(model, ranking[:count])
        acc = accuracy(model)
        curve.append((t, acc))
        if (base - acc) / max(base, 1e-12) <= acc_ratio:
            best = (t, count)
    model.load_state_dict(original)
    return best[0], best[1], curve


def purify(model, clean, cfg, report):
    check_settings(cfg, model)
    train, held_out = clean.split(cfg.val_ratio, cfg.random_seed)
    net, switch, masks, noises = perturbable_copy(model)
    optimizer = torch.optim.SGD(list(masks.values()), lr=cfg.lr, momentum=cfg.sgd_momentum)
    loader = MaskRounds(train.loader(cfg.batch_size, cfg.random_seed, num_batches=cfg.print_every), cfg.nb_iter,
                        cfg.print_every)

    def clip_masks():
        with torch.no_grad():
            for m in masks.values():
                m.clamp_(0.0, 1.0)

    fit(net, loader, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        lambda net, x, y: anp_loss(net, switch, noises, x, y, cfg.anp_eps, cfg.anp_steps, cfg.anp_alpha),
        epochs=loader.rounds, amp=cfg.amp, after_step=clip_masks, on_epoch_end=report, desc="anp masks")
    report.save_tensors("anp_mask_values.safetensors", {name: m.detach().cpu() for name, m in masks.items()})

    ranking = ranked_neurons(masks)
    if cfg.pruning_by == "number":
        threshold, count = None, min(cfg.pruning_number, len(ranking))
    else:
        steps = int(round(cfg.pruning_max / cfg.pruning_step))
        thresholds = [round(i * cfg.pruning_step, 10) for i in range(steps + 1)]
        threshold, count, curve = choose_threshold(model, ranking, thresholds,
                                                   held_out.accuracy, cfg.acc_ratio)
        report.save_plot("anp_thresholds.png", [t for t, _ in curve],
                         {"held-out clean accuracy": [a for _, a in curve]}, xlabel="mask threshold",
                         ylabel="accuracy")
    prune_neurons(model, ranking[:count])
    report.log("anp: pruned %d of %d BatchNorm neurons (threshold %s; held-out accuracy %.4f on %d images)", count,
               len(ranking), threshold, held_out.accuracy(model), len(held_out))
    report.note(pruned_neurons=count, neurons=len(ranking), threshold=threshold)
    return model


DEFENSE = Defense("anp", purify, __doc__.splitlines()[0], add_arguments, validate=check_settings,
                  ignored_flags={"epochs": "ANP counts mask batches: --nb_iter, in rounds of --print_every",
                                 "client_optimizer": "the masks always take SGD steps (--lr, --sgd_momentum)",
                                 "wd": "the masks' SGD has no weight decay",
                                 "lr_scheduler": "no schedule: the masks' rate stays at --lr",
                                 "steplr_milestones": "no schedule: the masks' rate stays at --lr",
                                 "steplr_stepsize": "no schedule: the masks' rate stays at --lr",
                                 "steplr_gamma": "no schedule: the masks' rate stays at --lr",
                                 "cos_t_max": "no schedule: the masks' rate stays at --lr"})


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
