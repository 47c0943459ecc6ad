"""FP: Fine-Pruning.

Paper: Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018. Backdoor neurons tend to lie dormant on clean inputs, so:
    1. rank the channels of the last convolutional stage by their mean activation on clean data;
    2. prune the most dormant ones, ``once_prune_ratio`` (1%) of all channels per step, for as long
       as clean accuracy stays within ``acc_ratio`` (10%) relative drop of the unpruned model's;
    3. fine-tune the pruned model (pruned channels held at zero) on the clean data.
For PreAct-ResNet18 the channels are the 512 pooled layer4 features entering ``linear``, and pruning
channel c zeroes column c of ``linear.weight``, as BackdoorBench does. Each model names its layer
(``ModelLayers.pruned``): VGG19-BN's is ``classifier.0``, whose 25,088 inputs (512 channels x 7 x 7
after the adaptive pooling) BackdoorBench prunes one by one, as here. A ViT has no convolutional
stage, so FP refuses it with one line; BackdoorBench prunes the features entering its head instead,
which ``--prune_layer 1.heads.head`` reproduces.

Defaults: BackdoorBench's ``fp`` settings for CIFAR-10 (config/defense/fp/config.yaml): 1% per step,
10% allowed drop, fine-tuning 100 epochs, batch 256, SGD lr 0.01 momentum 0.9 wd 5e-4, cosine, the
attack's training augmentation, 5% reserved data.

Where BackdoorBench differs, on purpose:
    * the stopping rule reads **held-out clean data**: ``val_ratio`` (10%) of the reserved images
      are held out (``clean.split``) and the rest rank the channels and fine-tune. BackdoorBench
      stops on the **clean test set's** accuracy, a test-set leak;
    * a step prunes exactly the channels it counts (BackdoorBench's ``seq_sort[0:num_pruned - 1]``
      prunes one fewer) and the model kept is the last one within the allowed drop (BackdoorBench
      keeps the mask of the step that broke the rule, since its "last" model is the same object);
    * the channels are ranked on the 90% of the reserve left after the hold-out, without
      augmentation, so that the ranking reads the images as they are, not one random crop of them.
      BackdoorBench ranks on all of its 5% through its training transform (random crop, and a flip
      on CIFAR-10). Both rank in eval mode (BackdoorBench calls ``eval()`` on loading the model),
      so neither moves BatchNorm's running statistics;
    * precision: with ``--amp`` (the default) on CUDA the fine-tuning runs under bf16 autocast, where
      BackdoorBench's trainer runs it under fp16 autocast with a gradient scaler (its fp config sets
      ``amp: True``); the ranking and the accuracies that decide the pruning are fp32 in both.
      ``--amp false`` gives fp32 throughout. Whether bf16 changes the results is not yet measured here.
The accuracy-versus-pruned curve is saved as ``fp_pruning_curve.png`` and the ranking and pruned
channels as ``fp_pruning.safetensors``; the summary says how many channels were pruned.

    python defense/fp.py --result_file badnet_demo
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from defense.base import Defense
from defense.runner import run_defense
from models import model_layers
from utils.cli import cli_main
from utils.config import check_range
from utils.errors import UserError
from utils.train import build_optimizer, build_scheduler, cross_entropy_loss, fit


def add_arguments(parser) -> None:
    parser.add_argument("--val_ratio", type=float, help="share of the reserved data held out for the stopping rule")
    parser.add_argument("--acc_ratio", type=float, help="largest allowed relative drop of held-out accuracy")
    parser.add_argument("--once_prune_ratio", type=float, help="share of the channels pruned per step")
    parser.add_argument("--prune_layer", type=str, help="the Linear layer whose input channels are pruned "
                        "(default: the model's: linear for PreAct-ResNet18, classifier.0 for VGG19-BN; none for a ViT)")


def prune_layer(cfg, model) -> nn.Linear:
    if cfg.prune_layer is None:  # the model's own (models/registry.py: ModelLayers.pruned)
        cfg.prune_layer = model_layers(cfg.model, model).pruned
        if cfg.prune_layer is None:
            raise UserError(f"FP prunes the channels of the last convolutional stage and {cfg.model} has none; "
                            f"to prune the features entering a Linear layer instead (BackdoorBench prunes those of "
                            f"a ViT's head), name it with --prune_layer")
    layer = dict(model.named_modules()).get(cfg.prune_layer)
    if not isinstance(layer, nn.Linear):
        raise UserError(f"--prune_layer {cfg.prune_layer!r} is not a Linear layer of {cfg.model}; name the "
                        f"classifier that reads the last convolutional stage's pooled channels")
    check_range("acc_ratio", cfg.acc_ratio, 0.0, 1.0, low_open=False)
    check_range("once_prune_ratio", cfg.once_prune_ratio, 0.0, 1.0)
    check_range("val_ratio", cfg.val_ratio, 0.0, 1.0)
    return layer


@torch.no_grad()
def mean_channel_activation(model, layer: nn.Linear, loader) -> torch.Tensor:
    """Mean over the images of each input channel of ``layer`` (eval mode)."""
    total, count, captured = None, 0, []
    handle = layer.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0].float().sum(0)))
    model.eval()
    try:
        for x, _ in loader:
            captured.clear()
            model(x)
            total = captured[0] if total is None else total + captured[0]
            count += x.shape[0]
    finally:
        handle.remove()
    return total / count


@torch.no_grad()
def prune_channels(layer: nn.Linear, channels: torch.Tensor) -> None:
    layer.weight[:, channels] = 0.0


def purify(model, clean, cfg, report):
    layer = prune_layer(cfg, model)
    train, held_out = clean.split(cfg.val_ratio, cfg.random_seed)
    ranking = torch.argsort(mean_channel_activation(model, layer, train.loader(cfg.batch_size, cfg.random_seed,
                                                                                augment=False, shuffle=False)))
    original = layer.weight.detach().clone()
    step = math.ceil(len(ranking) * cfg.once_prune_ratio)
    base_acc = held_out.accuracy(model)
    curve, kept = [(0, base_acc)], 0
    for count in range(step, len(ranking) + 1, step):
        with torch.no_grad():
            layer.weight.copy_(original)
        prune_channels(layer, ranking[:count])
        acc = held_out.accuracy(model)
        curve.append((count, acc))
        if (base_acc - acc) / max(base_acc, 1e-12) > cfg.acc_ratio:
            break
        kept = count
    with torch.no_grad():
        layer.weight.copy_(original)
    pruned = ranking[:kept]
    prune_channels(layer, pruned)
    report.log("fp: pruned %d of %d channels entering %s (held-out accuracy %.4f -> %.4f on %d images)", kept,
               len(ranking), cfg.prune_layer, base_acc, dict(curve)[kept], len(held_out))
    report.note(pruned_channels=kept, channels=len(ranking), held_out_acc_before=base_acc,
                held_out_acc_pruned=dict(curve)[kept])
    report.save_tensors("fp_pruning.safetensors", {"ranking": ranking.cpu(), "pruned": pruned.cpu(),
                                                   "curve": torch.tensor(curve, dtype=torch.float64)})
    report.save_plot("fp_pruning_curve.png", [c for c, _ in curve], {"held-out clean accuracy": [a for _, a in curve]},
                     xlabel="channels pruned", ylabel="accuracy")

    optimizer = build_optimizer(model.parameters(), cfg)
    fit(model, train.loader(cfg.batch_size, cfg.random_seed), optimizer, build_scheduler(optimizer, cfg, cfg.epochs),
        cross_entropy_loss, epochs=cfg.epochs, amp=cfg.amp, after_step=lambda: prune_channels(layer, pruned),
        on_epoch_end=report, desc="fp fine-tuning")
    return model


DEFENSE = Defense("fp", purify, __doc__.splitlines()[0], add_arguments, validate=prune_layer)


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
