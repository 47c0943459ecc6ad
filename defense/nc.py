"""NC: Neural Cleanse.

Paper: Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE S&P 2019.
    1. For every class t, reverse-engineer the smallest trigger that sends clean images to t: a mask
       m (1 x H x W) and a pattern p (C x H x W), both tanh(.) / 2 + 1/2 of free parameters (start
       1), applied as (1 - m) x + m p, minimising CE(f(x'), t) + cost * |m|_1 with Adam (lr 0.1,
       betas (0.5, 0.9)) for 80 epochs over the clean data. The cost starts at 1e-3 and, after 5
       epochs in a row above (below) 98% attack success, is multiplied by 2 (divided by 2^1.5); the
       smallest mask reaching 98% is kept; a class stops early once its best norm has not improved
       by 1% for 25 epochs after the cost went both up and down (BackdoorBench's early stop).
    2. Outliers: with the L1 norms of the kept masks, median M and MAD = 1.4826 * median(|l1 - M|)
       (``torch.median``: the lower middle value for an even count, as BackdoorBench computes it), a
       class is flagged when its norm is at most M and its anomaly index |l1 - M| / MAD exceeds 2.
    3. Unlearning: when some class is flagged, fine-tune (100 epochs, SGD lr 0.01 momentum 0.9 wd 5e-4,
       cosine) on the clean data, whose last 20% (``unlearning_ratio``) are replaced by copies
       stamped with each flagged class's reversed trigger at their true labels (one stamped copy
       per flagged class). When no class is flagged the model is returned unchanged, and the log and
       the summary say so.
All classes' triggers are optimised together in one batched pass (``nc_classes_per_pass``, 0 = all):
each class keeps its own parameters, Adam state, cost schedule and early stop, so the result is that
of one class after another, but a GPU does the classes at once. On a CPU this saves little: the
arithmetic is the same.

Defaults: BackdoorBench's ``nc`` settings for CIFAR-10 (config/defense/nc/config.yaml), 5% reserved
data with the attack's augmentation. NC reads no test data in BackdoorBench either. Where it differs:
BackdoorBench stamps the unlearning images with its saved PNGs (min-max rescaled by
``save_image(normalize=True)``, then resized); here the exact mask and pattern are used. The
unlearning set is the defender's reserve, on purpose: BackdoorBench calls ``choose_index`` again for
it, which (without ``--index``) draws a second random 5% of the training set, but the defender holds
only its reserve and a second draw would use data the threat model does not grant. With ``--amp`` (the
default) on CUDA the trigger search and the unlearning run under bf16 autocast; BackdoorBench searches
in fp32 (no autocast in its nc.py) and unlearns under fp16 autocast with a gradient scaler (its
trainer, ``amp: True`` in its config). ``--amp false`` gives fp32; whether this changes the results is
not yet measured here.

Each class's mask and pattern are saved as ``nc_triggers.safetensors`` and ``nc_mask_<class>.png`` /
``nc_pattern_<class>.png``; the summary gives every class's L1 norm, its anomaly index and the
flagged classes.

    python defense/nc.py --result_file badnet_demo
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from defense.base import Defense
from defense.runner import run_defense
from utils.cli import cli_main
from utils.config import check_range, str2bool
from utils.datasets import ImageSet
from utils.errors import UserError
from utils.logs import run_logger
from utils.progress import progress
from utils.train import build_optimizer, build_scheduler, cross_entropy_loss, fit

TANH_EPS = 1e-7  # BackdoorBench's EPSILON: keeps tanh(.) / (2 + eps) + 1/2 strictly inside (0, 1)
MAD_CONSISTENCY = 1.4826
ANOMALY_THRESHOLD = 2.0


def add_arguments(parser) -> None:
    parser.add_argument("--nc_epoch", type=int, help="epochs of trigger reverse-engineering")
    parser.add_argument("--mask_lr", type=float, help="Adam rate of the mask and pattern")
    parser.add_argument("--init_cost", type=float, help="initial weight of the mask's norm")
    parser.add_argument("--atk_succ_threshold", type=float, help="attack success (%%) a reversed trigger must reach")
    parser.add_argument("--patience", type=int, help="epochs above / below the threshold before the cost moves")
    parser.add_argument("--cost_multiplier", type=float, help="cost up: x this; down: / this^1.5")
    parser.add_argument("--early_stop", type=str2bool, help="stop a class early once its best norm stalls")
    parser.add_argument("--early_stop_threshold", type=float, help="relative improvement that resets the early stop")
    parser.add_argument("--early_stop_patience", type=int, help="epochs without improvement before stopping")
    parser.add_argument("--use_norm", type=int, help="norm of the mask (1: L1)")
    parser.add_argument("--unlearning_ratio", type=float, help="share of the clean data stamped for unlearning")
    parser.add_argument("--nc_classes_per_pass", type=int, help="classes per batched pass (0: all)")


def check_settings(cfg, model=None) -> None:
    if cfg.nc_epoch < 1 or cfg.patience < 1 or cfg.nc_classes_per_pass < 0:
        raise UserError("--nc_epoch and --patience must be at least 1 and --nc_classes_per_pass 0 or more")
    check_range("unlearning_ratio", cfg.unlearning_ratio, 0.0, 1.0)


def squash(t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(t) / (2 + TANH_EPS) + 0.5


def anomaly_indices(norms: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(|l1 - median| / (1.4826 * MAD) per class, the flagged classes: norm <= median, index > 2)."""
    median = torch.median(norms)
    mad = MAD_CONSISTENCY * torch.median((norms - median).abs())
    index = (norms - median).abs() / mad
    flagged = [k for k in range(len(norms)) if norms[k] <= median and index[k] > ANOMALY_THRESHOLD]
    return index, sorted(flagged, key=lambda k: float(norms[k]))


class ClassSchedule:
    """One class's cost, best mask and early stop, updated once per epoch (BackdoorBench's Recorder)."""

    def __init__(self, cfg):
        self.cfg, self.cost = cfg, cfg.init_cost
        self.best_norm, self.early_best = float("inf"), float("inf")
        self.best_mask = self.best_pattern = None
        self.up = self.down = self.set_counter = self.early_counter = 0
        self.went_up = self.went_down = self.stopped = False

    def end_epoch(self, acc: float, norm: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        cfg = self.cfg
        if acc >= cfg.atk_succ_threshold and norm < self.best_norm:
            self.best_mask, self.best_pattern, self.best_norm = mask.clone(), pattern.clone(), norm
        if cfg.early_stop:
            if self.best_norm < float("inf"):
                stalled = self.best_norm >= cfg.early_stop_threshold * self.early_best
                self.early_counter = self.early_counter + 1 if stalled else 0
            self.early_best = min(self.early_best, self.best_norm)
            if self.went_up and self.went_down and self.early_counter >= cfg.early_stop_patience:
                self.stopped = True
                return
        if self.cost == 0 and acc >= cfg.atk_succ_threshold:
            self.set_counter += 1
            if self.set_counter >= cfg.patience:
                self.cost, self.up, self.down, self.went_up, self.went_down = cfg.init_cost, 0, 0, False, False
        else:
            self.set_counter = 0
        if acc >= cfg.atk_succ_threshold:
            self.up, self.down = self.up + 1, 0
        else:
            self.up, self.down = 0, self.down + 1
        if self.up >= cfg.patience:
            self.up, self.cost, self.went_up = 0, self.cost * cfg.cost_multiplier, True
        elif self.down >= cfg.patience:
            self.down, self.cost, self.went_down = 0, self.cost / cfg.cost_multiplier ** 1.5, True
        if self.best_mask is None:  # never reached the threshold yet: keep the first epoch's
            self.best_mask, self.best_pattern = mask.clone(), pattern.clone()


def reverse_engineer(model, loader, classes: list[int], cfg, normalizer, shape) -> list[ClassSchedule]:
    """Triggers of ``classes``, optimised together; returns each class's schedule (best mask, pattern)."""
    c, h, w = shape
    device = next(model.parameters()).device
    masks = [torch.nn.Parameter(torch.ones(1, h, w, device=device)) for _ in classes]
    patterns = [torch.nn.Parameter(torch.ones(c, h, w, device=device)) for _ in classes]
    optimizer = torch.optim.Adam(masks + patterns, lr=cfg.mask_lr, betas=(0.5, 0.9))
    schedules = [ClassSchedule(cfg) for _ in classes]
    mean, std = normalizer.mean / 255.0, normalizer.std / 255.0
    for epoch in progress(range(cfg.nc_epoch), desc=f"nc classes {classes[0]}-{classes[-1]}", unit="epoch"):
        active = [i for i, s in enumerate(schedules) if not s.stopped]
        if not active:
            break
        loader.set_epoch(epoch)
        acc_sum, norm_sum = torch.zeros(len(classes), device=device), torch.zeros(len(classes), device=device)
        batches, bf16 = 0, cfg.amp and device.type == "cuda"
        for x, _ in loader:
            m = torch.stack([squash(masks[i]) for i in active])  # [A, 1, H, W]
            p = (torch.stack([squash(patterns[i]) for i in active]) - mean) / std  # normalised patterns
            stamped = (1 - m[:, None]) * x[None] + m[:, None] * p[:, None]  # [A, B, C, H, W]
            target = torch.tensor([classes[i] for i in active], device=device).repeat_interleave(x.shape[0])
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(stamped.flatten(0, 1)).float()
            ce = F.cross_entropy(logits, target, reduction="none").view(len(active), -1).mean(1)
            norms = torch.linalg.vector_norm(m.flatten(1), ord=cfg.use_norm, dim=1)
            costs = torch.tensor([schedules[i].cost for i in active], device=device)
            optimizer.zero_grad(set_to_none=True)  # stopped classes keep no gradient, so Adam leaves them
            (ce + costs * norms).sum().backward()
            optimizer.step()
            hits = (logits.argmax(1) == target).float().view(len(active), -1).mean(1) * 100.0
            acc_sum[active] += hits.detach()
            norm_sum[active] += norms.detach()
            batches += 1
        for i in active:
            schedules[i].end_epoch(float(acc_sum[i]) / batches, float(norm_sum[i]) / batches,
                                   squash(masks[i]).detach(), squash(patterns[i]).detach())
        if (epoch + 1) % max(1, cfg.nc_epoch // 8) == 0:  # the search takes most of NC's time: say where it is
            run_logger().info("nc: epoch %d/%d, classes %d-%d: smallest mask L1 norm reaching %.0f%% so far %s; "
                              "%d still searching", epoch + 1, cfg.nc_epoch, classes[0], classes[-1],
                              cfg.atk_succ_threshold, [round(s.best_norm, 1) for s in schedules],
                              sum(not s.stopped for s in schedules))
    return schedules


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """uint8 images with a reversed trigger: (1 - m) x + m p in [0, 255]."""
    out = (1 - mask) * images.float() + mask * pattern * 255.0
    return out.round().clamp(0, 255).to(torch.uint8)


def purify(model, clean, cfg, report):
    check_settings(cfg)
    spec = clean.spec
    num_classes = spec.num_classes
    shape = tuple(clean.data.images.shape[1:])
    model.eval().requires_grad_(False)
    per_pass = cfg.nc_classes_per_pass or num_classes
    schedules = []
    for first in range(0, num_classes, per_pass):
        classes = list(range(first, min(first + per_pass, num_classes)))
        schedules += reverse_engineer(model, clean.loader(cfg.batch_size, cfg.random_seed), classes, cfg,
                                      clean.normalizer, shape)
    model.requires_grad_(True)
    masks = torch.stack([s.best_mask for s in schedules]).cpu()
    patterns = torch.stack([s.best_pattern for s in schedules]).cpu()
    norms = torch.linalg.vector_norm(masks.flatten(1), ord=cfg.use_norm, dim=1)
    index, flagged = anomaly_indices(norms)
    report.save_tensors("nc_triggers.safetensors", {"mask": masks, "pattern": patterns, "l1_norm": norms,
                                                    "anomaly_index": index})
    for k in range(num_classes):
        report.save_image(f"nc_mask_{k}.png", masks[k].expand(3, -1, -1))
        report.save_image(f"nc_pattern_{k}.png", patterns[k])
    report.note(nc_l1_norms=[round(float(v), 4) for v in norms], nc_anomaly_index=[round(float(v), 4) for v in index],
                nc_flagged=flagged, nc_model_changed=bool(flagged))
    report.log("nc: mask L1 norms %s; anomaly indices %s", [round(float(v), 1) for v in norms],
               [round(float(v), 2) for v in index])
    if not flagged:
        report.log("nc: no class flagged (every anomaly index <= %.1f or above the median): the model is returned "
                   "unchanged", ANOMALY_THRESHOLD)
        return model
    report.log("nc: flagged class(es) %s; unlearning with their reversed triggers", flagged)

    data = clean.data
    keep = int(len(data) * (1 - cfg.unlearning_ratio))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.random_seed))
    kept, stamped_part = data.subset(order[:keep]), data.subset(order[keep:])
    images, labels = [kept.images], [kept.labels]
    for k in flagged:
        images.append(stamp(stamped_part.images, masks[k].to(stamped_part.images.device),
                            patterns[k].to(stamped_part.images.device)))
        labels.append(stamped_part.labels)
    unlearn = clean.with_data(ImageSet(torch.cat(images), torch.cat(labels)))
    optimizer = build_optimizer(model.parameters(), cfg)
    fit(model, unlearn.loader(cfg.batch_size, cfg.random_seed), optimizer, build_scheduler(optimizer, cfg, cfg.epochs),
        cross_entropy_loss, epochs=cfg.epochs, amp=cfg.amp, on_epoch_end=report, desc="nc unlearning")
    return model


DEFENSE = Defense("nc", purify, __doc__.splitlines()[0], add_arguments, validate=check_settings)


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
