"""SAU: Shared Adversarial Unlearning.

Paper: Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared
Adversarial Examples", NeurIPS 2023 (the authors of D3; BackdoorBench's ``sau.py`` is their code and
the reference for every step here). A frozen copy of the attacked model, h0, is kept beside the
model h being purified. For each batch of the reserved clean data:
    1. shared PGD in [0, 1] pixel space (L_inf budget ``trigger_norm`` 0.2, started at +0.2, up to
       ``adv_steps`` 5 steps of ``adv_lr`` 0.2 * sign) descends
           beta_1 * L_adv + beta_2 * L_share,
       L_adv = -(CE of h + CE of h0, each over the samples it does not yet misclassify) / 2N and
       L_share = Jensen-Shannon divergence of h and h0 over the samples that are not yet a shared
       adversarial example (both fooled into the same label), / N. It stops after the step in
       which every sample was already shared.
    2. h steps on lmd_1 * CE(clean) + lmd_2 * CE(adversarial) + lmd_3 * L_sar, where L_sar, over
       the samples whose perturbation fools h0 (a label different from both the true one and h0's
       clean prediction), is -(log(1 - p) + log(1 - p)) / 2 with p the probability h gives h0's
       adversarial label (computed from both sides as BackdoorBench does, clamped to [0.001, 0.999]),
       summed and divided by N.

Defaults: BackdoorBench's ``sau`` settings for CIFAR-10 (config/defense/sau/config.yaml): 100
rounds over the reserved data (``--n_rounds``, here the epochs), batch 256, no augmentation, model
in eval mode (``--train_mode``), Adam (AMSGrad) lr 1e-4 at a constant rate (BackdoorBench builds a cosine
schedule but never steps it), beta_1 0.01, beta_2 1, lmd_1 1, lmd_2 0, lmd_3 1, one outer step per
batch, 5% reserved data. As there, the perturbed image is not clipped to [0, 1]. ``--norm_type``
also takes L2, L1 and Reg (no projection); ``--pgd_init`` zero, random, max or min.

Precision: with ``--amp`` (the default) on CUDA the shared PGD (with the fooled and shared masks it
reads from the two models' predictions) and the model's steps run under bf16 autocast; BackdoorBench's
sau.py uses no autocast (its ``--amp`` is parsed and never used), so it runs them in fp32.
``--amp false`` gives fp32; whether bf16 changes the results is not yet measured here.

    python defense/sau.py --result_file badnet_demo
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from defense.base import Defense
from defense.runner import run_defense
from utils.cli import cli_main
from utils.config import str2bool
from utils.errors import UserError
from utils.train import build_optimizer, build_scheduler, fit, frozen_copy

NORM_TYPES = ("L_inf", "L2", "L1", "Reg")
PGD_INITS = ("zero", "random", "max", "min")


def add_arguments(parser) -> None:
    parser.add_argument("--n_rounds", dest="epochs", type=int, help="unlearning rounds over the reserved data")
    parser.add_argument("--norm_type", type=str, help="perturbation budget: " + " | ".join(NORM_TYPES))
    parser.add_argument("--trigger_norm", type=float, help="perturbation budget in [0, 1] pixel units")
    parser.add_argument("--adv_lr", type=float, help="PGD step size")
    parser.add_argument("--adv_steps", type=int, help="PGD steps")
    parser.add_argument("--pgd_init", type=str, help="PGD start: " + " | ".join(PGD_INITS))
    parser.add_argument("--beta_1", type=float, help="weight of the adversarial loss in PGD")
    parser.add_argument("--beta_2", type=float, help="weight of the sharing (Jensen-Shannon) loss in PGD")
    parser.add_argument("--lmd_1", type=float, help="weight of the clean loss")
    parser.add_argument("--lmd_2", type=float, help="weight of the adversarial-training loss")
    parser.add_argument("--lmd_3", type=float, help="weight of the shared adversarial loss")
    parser.add_argument("--outer_steps", type=int, help="model steps per PGD perturbation")
    parser.add_argument("--train_mode", type=str2bool, help="BatchNorm in training mode for the model's steps")


def project(delta: torch.Tensor, norm_type: str, bound: float) -> torch.Tensor:
    """Each sample's perturbation back into its budget."""
    if norm_type == "L_inf":
        return delta.clamp(-bound, bound)
    if norm_type in ("L2", "L1"):
        norm = torch.linalg.vector_norm(delta.flatten(1), ord=2 if norm_type == "L2" else 1, dim=1)
        return delta * (bound / norm.clamp(min=bound)).view(-1, 1, 1, 1)
    return delta  # Reg: unconstrained


def initial_perturbation(x: torch.Tensor, init: str, norm_type: str, bound: float) -> torch.Tensor:
    start = {"zero": lambda: torch.zeros_like(x), "random": lambda: torch.rand_like(x),
             "max": lambda: torch.full_like(x, bound), "min": lambda: torch.full_like(x, -bound)}[init]()
    return project(start, norm_type, bound)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample JS divergence of two probability rows (as BackdoorBench computes it)."""
    m = 0.5 * (p + q)
    return (0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * m.log() + q * m.log())).sum(1)


def shared_pgd(model, reference, x, y, to_input, cfg) -> torch.Tensor:
    """The shared adversarial perturbation (pixel units) of a normalised batch ``x``."""
    was_training = model.training
    model.eval()
    n = x.shape[0]
    with torch.no_grad():
        clean_pred, clean_pred_ref = model(x).argmax(1), reference(x).argmax(1)
    delta = initial_perturbation(x, cfg.pgd_init, cfg.norm_type, cfg.trigger_norm)
    for _ in range(cfg.adv_steps):
        delta.requires_grad_(True)
        x_adv = x + to_input(delta)
        logits, logits_ref = model(x_adv).float(), reference(x_adv).float()
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        loss_adv = -((F.cross_entropy(logits, y, reduction="none") * ~fooled).sum()
                     + (F.cross_entropy(logits_ref, y, reduction="none") * ~fooled_ref).sum()) / 2 / n
        p_model = F.softmax(logits, 1).clamp(min=1e-8)
        p_ref = F.softmax(logits_ref, 1).clamp(min=1e-8)
        loss_share = (jensen_shannon(p_model, p_ref) * ~shared).sum() / n
        grad, = torch.autograd.grad(cfg.beta_1 * loss_adv + cfg.beta_2 * loss_share, delta)
        delta = project(delta.detach() - cfg.adv_lr * grad.sign(), cfg.norm_type, cfg.trigger_norm)
        if bool(shared.all()):
            break
    model.train(was_training)
    return delta.detach()


def shared_adversarial_loss(logits_adv: torch.Tensor, adv_label_ref: torch.Tensor, fools_ref: torch.Tensor):
    """L_sar: over the samples whose perturbation fools the frozen model, penalise the live model's
    probability p of that model's adversarial label by -(log(1 - p) from both sides) / 2; / N."""
    probs = F.softmax(logits_adv.float(), 1)
    one_hot = F.one_hot(adv_label_ref, probs.shape[1]).to(probs.dtype)
    pos = (probs * one_hot).sum(1)[fools_ref]
    neg = (probs * (1 - one_hot)).sum(1)[fools_ref]
    if pos.numel() == 0:
        return logits_adv.new_zeros((), dtype=torch.float32)
    return (-torch.log(1e-6 + neg.clamp(max=0.999)).sum()
            - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2 / logits_adv.shape[0]


class RepeatedBatches:
    """Each batch of ``loader`` handed out ``times`` times in a row (``--outer_steps``)."""

    def __init__(self, loader, times: int):
        self.loader, self.times = loader, times

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader) * self.times

    def __iter__(self):
        for batch in self.loader:
            for _ in range(self.times):
                yield batch


def check_settings(cfg, model=None) -> None:
    if cfg.norm_type not in NORM_TYPES or cfg.pgd_init not in PGD_INITS:
        raise UserError(f"--norm_type {cfg.norm_type!r} / --pgd_init {cfg.pgd_init!r}: choose a norm from "
                        f"{', '.join(NORM_TYPES)} and a start from {', '.join(PGD_INITS)}")
    if cfg.adv_steps < 1 or cfg.outer_steps < 1 or cfg.trigger_norm < 0:
        raise UserError("--adv_steps and --outer_steps must be at least 1 and --trigger_norm non-negative")


def purify(model, clean, cfg, report):
    check_settings(cfg)
    reference = frozen_copy(model)
    pixel_std = clean.normalizer.std / 255.0  # a [0, 1]-pixel perturbation, in the model's input units

    def to_input(delta):
        return delta / pixel_std

    last = {}  # with --outer_steps k, one perturbation serves the k steps on its batch

    def loss_fn(model, x, y):
        if last.get("batch") is not x:
            last.update(batch=x, delta=shared_pgd(model, reference, x, y, to_input, cfg))
        delta = last["delta"]
        x_adv = x + to_input(delta)
        logits, logits_adv = model(torch.cat([x, x_adv])).float().split(x.shape[0])
        with torch.no_grad():
            clean_ref, adv_ref = reference(x).argmax(1), reference(x_adv).argmax(1)
        fools_ref = (adv_ref != y) & (adv_ref != clean_ref)
        loss_clean = F.cross_entropy(logits, y)
        loss_adv = F.cross_entropy(logits_adv, y)
        loss_shared = shared_adversarial_loss(logits_adv, adv_ref, fools_ref)
        loss = cfg.lmd_1 * loss_clean + cfg.lmd_2 * loss_adv + cfg.lmd_3 * loss_shared
        return loss, {"train_loss": loss.detach(), "clean_loss": loss_clean.detach(),
                      "shared_adv_loss": loss_shared.detach(), "fools_reference": fools_ref.float().mean(),
                      "train_acc": (logits.argmax(1) == y).float().mean()}

    optimizer = build_optimizer(model.parameters(), cfg)  # Adam with AMSGrad, BackdoorBench's outer_opt
    loader = clean.loader(cfg.batch_size, cfg.random_seed, augment=False)
    if cfg.outer_steps > 1:
        loader = RepeatedBatches(loader, cfg.outer_steps)
    fit(model, loader, optimizer, build_scheduler(optimizer, cfg, cfg.epochs), loss_fn, epochs=cfg.epochs,
        amp=cfg.amp, train_mode=cfg.train_mode, on_epoch_end=report, desc="sau")
    return model


DEFENSE = Defense("sau", purify, __doc__.splitlines()[0], add_arguments, validate=check_settings,
                  ignored_flags={"random_crop_padding": "SAU trains on unaugmented batches, as BackdoorBench",
                                 "random_hflip": "SAU trains on unaugmented batches, as BackdoorBench"})


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
