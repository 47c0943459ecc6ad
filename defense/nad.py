"""NAD: Neural Attention Distillation.

Paper: Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from
Deep Neural Networks", ICLR 2021. Two stages on the defender's reserved clean data:
    1. teacher: a copy of the attacked model fine-tuned with cross-entropy (``--te_epochs``);
    2. student: the attacked model trained with cross-entropy plus, for each chosen stage i,
       beta_i * MSE(A(student_i), A(teacher_i)), where the attention map A(a) is the sum over
       channels of |a|^p, flattened and L2-normalised (BackdoorBench's ``AT``; eps 1e-6).
The stage activations come from forward hooks in one pass of each network (BackdoorBench re-runs the
network's prefixes three times for the student and three for the teacher); the teacher is frozen
and in eval mode while the student learns.

Defaults: BackdoorBench's ``nad`` settings for CIFAR-10 (config/defense/nad/config.yaml): teacher
10 epochs, SGD lr 0.01 momentum 0.9 wd 5e-4, cosine with BackdoorBench's fixed T_max 100 (so the
rate only falls to 0.0098); student 10 epochs (BackdoorBench runs it for ``te_epochs`` and ignores
``epochs``) at a constant lr 0.01 (its ``adjust_learning_rate`` keeps 0.01 below epoch 20), same
optimiser settings; p 2; 5% reserved data with the attack's training augmentation.

The attention layers, as the paper's Table 1 measured them: BackdoorBench's PreAct-ResNet18 branch
distils the outputs of ``layer3`` (beta1 500), ``layer4`` (beta2 1000) and the global pooling (beta3
1000). The pooled map is 1x1, so it normalises to a constant and that third term is always zero.
The default is therefore ``--nad_layers layer3,layer4`` with betas 500 / 1000 (each model names its
own last two stages, ``ModelLayers.stages``; VGG19-BN: the last two convolutional stages, ViT: the
last two encoder layers, whose [N, tokens, dim] outputs give an attention map over the tokens).
BackdoorBench's VGG19-BN and ViT-B/16 branches distil one map only, the output of everything but the
classifier: for 32-pixel images that is VGG's 1x1 map copied to 7x7 by the adaptive pooling, and for
the ViT the resized input image itself, so their attention term is constant and NAD there is plain
fine-tuning; here it distils feature maps that vary over positions. ``--nad_layers``
takes up to three module names, paired in order with beta1..beta3 (the paper's own choice is
``layer2,layer3,layer4`` with 500 / 1000 / 1000). ``--teacher_model_loc`` takes a teacher instead of
fine-tuning one: a defense output or attack record folder (its ``model.safetensors``, verified against
its ``record.json``) or a ``.safetensors`` file; a torch pickle (``.pt``) is refused, since
unpickling can run code.

Where this differs from BackdoorBench, beyond the layers above:
    * BatchNorm: the single hooked pass of the student updates its running statistics once per
      batch. BackdoorBench's PreAct-ResNet18 branch runs the student four times per batch in
      training mode (the whole network, then its prefixes up to the pooling, ``layer4`` and
      ``layer3``), so ``layer1``-``layer3`` update them 4 times and ``layer4`` 3 times (VGG19-BN:
      twice): the loss is the same, but the statistics that eval mode reads move with an effective
      momentum of 1 - 0.9^4 = 0.34 (``layer4``: 0.27) per batch instead of 0.1;
    * precision: with ``--amp`` (the default) on CUDA the teacher's fine-tuning and the student's
      distillation run under bf16 autocast; BackdoorBench fine-tunes the teacher under fp16 autocast
      with a gradient scaler (its trainer, ``amp: True`` in its config) and trains the student in
      fp32 (its NAD loop uses no autocast). ``--amp false`` gives fp32; whether this changes the
      results is not yet measured here.

    python defense/nad.py --result_file badnet_demo
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from attack.record import load_model
from defense.base import Defense
from defense.runner import run_defense
from models import model_layers
from utils.cli import cli_main
from utils.config import require
from utils.errors import UserError
from utils.record import is_torch_pickle, load_into, load_tensors
from utils.train import build_optimizer, build_scheduler, cross_entropy_loss, fit, frozen_copy

ATTENTION_EPS = 1e-6


def add_arguments(parser) -> None:
    parser.add_argument("--te_epochs", type=int, help="epochs of the teacher's fine-tuning")
    parser.add_argument("--nad_layers", type=str, help="up to three module names whose outputs are distilled "
                        "(default: the model's last two stages: layer3,layer4 for PreAct-ResNet18)")
    parser.add_argument("--beta1", type=float, help="weight of the first layer's attention loss")
    parser.add_argument("--beta2", type=float, help="weight of the second layer's attention loss")
    parser.add_argument("--beta3", type=float, help="weight of the third layer's attention loss")
    parser.add_argument("--p", type=float, help="power of |activation| in the attention map")
    parser.add_argument("--teacher_model_loc", type=str,
                        help="a teacher to use instead of fine-tuning one: a defense output or attack record folder, "
                        "or a .safetensors file (.pt pickles are refused: they can run code)")


def attention_map(activation: torch.Tensor, p: float) -> torch.Tensor:
    """sum_c |a_c|^p over the channels, per sample, divided by its L2 norm over the positions. A
    transformer's [N, tokens, dim] output has its channels last: the map is then over the tokens."""
    if activation.dim() == 3:
        activation = activation.transpose(1, 2)[..., None]  # [N, dim, tokens, 1]
    am = activation.float().abs().pow(p).sum(1, keepdim=True)
    return am / (torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True) + ATTENTION_EPS)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


class StageOutputs:
    """Forward hooks that keep the outputs of named modules from the latest forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.outputs = {}
        self.handles = [modules[name].register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.outputs[name]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.outputs.clear()


def attention_layers(cfg, model) -> list[str]:
    """The ``--nad_layers`` names, checked against the model."""
    require(cfg, "te_epochs")
    if cfg.te_epochs < 1 and not cfg.teacher_model_loc:
        raise UserError(f"--te_epochs {cfg.te_epochs} fine-tunes no teacher, so NAD would distil the attacked model "
                        f"into itself; give at least 1, or a teacher with --teacher_model_loc")
    if cfg.nad_layers is None:  # the model's last two feature stages (models/registry.py: ModelLayers)
        cfg.nad_layers = ",".join(model_layers(cfg.model, model).stages) or None
        if cfg.nad_layers is None:
            raise UserError(f"{cfg.model} names no feature stages for NAD; name one to three modules with "
                            f"--nad_layers")
    layers = [n.strip() for n in str(cfg.nad_layers).split(",") if n.strip()]
    if not 1 <= len(layers) <= 3:
        raise UserError(f"--nad_layers {cfg.nad_layers!r}: name one to three modules, e.g. layer3,layer4")
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        top = ", ".join(n for n in modules if n and "." not in n)
        raise UserError(f"--nad_layers: the model has no module {missing[0]!r}; its top-level modules are: {top}")
    if cfg.teacher_model_loc:  # read and fitted now, before anything is written
        load_into(frozen_copy(model), teacher_weights(cfg), cfg.teacher_model_loc)
    return layers


def teacher_weights(cfg) -> dict[str, torch.Tensor]:
    """The weights ``--teacher_model_loc`` names: a finished defense output or attack record folder (its
    model, verified), or a ``.safetensors`` file. A torch pickle is refused unread."""
    loc, path = cfg.teacher_model_loc, Path(cfg.teacher_model_loc)
    hint = (f"give a defense output or attack record folder of a {cfg.model} (e.g. record/<name>/defense/ft) or its "
            f"model.safetensors, or leave it out to fine-tune a teacher")
    if path.is_dir():
        return load_model(path).state_dict()
    if not path.is_file():
        raise UserError(f"--teacher_model_loc {loc} not found; {hint}")
    if is_torch_pickle(path):
        raise UserError(f"--teacher_model_loc {loc} is a torch pickle (.pt): refused unread, since unpickling can "
                        f"run code; {hint}")
    try:
        return load_tensors(path)
    except UserError as e:
        raise UserError(f"--teacher_model_loc: {e}") from None


def purify(model, clean, cfg, report):
    layers = attention_layers(cfg, model)
    betas = [cfg.beta1, cfg.beta2, cfg.beta3][:len(layers)]
    loader = clean.loader(cfg.batch_size, cfg.random_seed)

    teacher = frozen_copy(model)
    if cfg.teacher_model_loc:
        load_into(teacher, teacher_weights(cfg), cfg.teacher_model_loc)
    else:
        teacher.requires_grad_(True)
        optimizer = build_optimizer(teacher.parameters(), cfg)
        fit(teacher, loader, optimizer, build_scheduler(optimizer, cfg, cfg.te_epochs), cross_entropy_loss,
            epochs=cfg.te_epochs, amp=cfg.amp, on_epoch_end=report, desc="nad teacher")
        teacher.eval().requires_grad_(False)

    student_out, teacher_out = StageOutputs(model, layers), StageOutputs(teacher, layers)

    def loss_fn(model, x, y):
        logits = model(x)
        with torch.no_grad():
            teacher(x)
        ce = F.cross_entropy(logits, y)
        at = [beta * attention_loss(student_out[n], teacher_out[n], cfg.p) for n, beta in zip(layers, betas)]
        loss = ce + sum(at)
        logs = {"train_loss": loss.detach(), "ce_loss": ce.detach(),
                "train_acc": (logits.argmax(1) == y).float().mean()}
        logs.update({f"at_loss_{n}": a.detach() for n, a in zip(layers, at)})
        return loss, logs

    optimizer = build_optimizer(model.parameters(), cfg)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # BackdoorBench: 0.01 throughout
    fit(model, loader, optimizer, constant, loss_fn, epochs=cfg.epochs, amp=cfg.amp, on_epoch_end=report,
        desc="nad student")
    student_out.remove()
    teacher_out.remove()
    return model


DEFENSE = Defense("nad", purify, __doc__.splitlines()[0], add_arguments, validate=attention_layers)


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
