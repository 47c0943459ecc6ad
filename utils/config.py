"""Command-line flags and YAML files merged into one resolved configuration.

Merge order, each overriding the one before:
    attack:  config/attack/prototype/<dataset>.yaml < config/attack/<name>/default.yaml
    defense: config/defense/<name>/config.yaml
    then:    --yaml_path FILE (optional)  <  flags given on the command line.
Flag names follow BackdoorBench. Every key in a YAML file must be a known flag, so a typo is an
error rather than a silently ignored setting.
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"


def str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


class Config(SimpleNamespace):
    """The resolved configuration: attribute access, plus ``to_dict`` for logs and records."""

    def to_dict(self) -> dict:
        return dict(sorted(vars(self).items()))


def new_parser(description: str) -> argparse.ArgumentParser:
    """A parser whose unset flags stay absent, so YAML values are only overridden by given flags."""
    return argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_common_arguments(p: argparse.ArgumentParser, epochs_help: str = "training epochs") -> None:
    g = p.add_argument_group("common (BackdoorBench names)")
    g.add_argument("--yaml_path", type=str, help="extra YAML config, above the defaults and below flags")
    g.add_argument("--dataset", type=str, help="cifar10 | gtsrb | tiny")
    g.add_argument("--dataset_path", type=str, help="dataset folder or .zip (see README)")
    g.add_argument("--cache_dir", type=str, help="where decoded datasets are cached "
                   "(default: $BACKDOOR_CACHE_DIR or ~/.cache/backdoor-toolkit)")
    g.add_argument("--model", type=str, help="model name, e.g. preactresnet18, preactresnet18_w16, vgg19_bn, "
                   "vit_b_16, or timm/<name> for any timm model")
    g.add_argument("--pretrained", type=str2bool, help="start from pretrained weights (vit_b_16: true by default, "
                   "read from --pretrained_path; false trains from scratch)")
    g.add_argument("--pretrained_path", type=str, help="local weights file (.pth state dict or .safetensors, read "
                   "safely), e.g. torchvision's vit_b_16-c867db91.pth; no model hub is reached")
    g.add_argument("--epochs", type=int, help=epochs_help)
    g.add_argument("--batch_size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--lr_scheduler", type=str, help="CosineAnnealingLR | MultiStepLR | StepLR | none")
    g.add_argument("--steplr_milestones", type=int, nargs="+", help="MultiStepLR milestones (epochs)")
    g.add_argument("--steplr_stepsize", type=int, help="StepLR step size (epochs)")
    g.add_argument("--steplr_gamma", type=float, help="StepLR / MultiStepLR decay factor")
    g.add_argument("--cos_t_max", type=int, help="CosineAnnealingLR period in scheduler steps (default: the epochs)")
    g.add_argument("--client_optimizer", type=str, help="sgd | adam (with AMSGrad, as BackdoorBench) | adamw")
    g.add_argument("--sgd_momentum", type=float)
    g.add_argument("--wd", type=float, help="weight decay")
    g.add_argument("--random_seed", type=int)
    g.add_argument("--device", type=str, help="auto | cpu | cuda | cuda:N (auto takes CUDA when present)")
    g.add_argument("--amp", type=str2bool, help="bf16 autocast on CUDA (ignored on CPU)")
    g.add_argument("--num_workers", type=int, help="accepted for BackdoorBench compatibility; data stays "
                   "on the device, so no loader workers are used")
    g.add_argument("--eval_every", type=int, help="evaluate ACC/ASR/RA every N epochs (and always the last)")
    g.add_argument("--eval_batch_size", type=int)
    g.add_argument("--record_dir", type=str, help="folder holding the records")
    g.add_argument("--random_crop_padding", type=int, help="training augmentation: random crop with this padding")
    g.add_argument("--random_hflip", type=str2bool, help="training augmentation: random horizontal flip")
    g.add_argument("--overwrite", type=str2bool, nargs="?", const=True, help="replace an existing output")


# The lowest layer of every merge: settings that are not about the experiment itself.
COMMON_DEFAULTS = {
    "dataset_path": "./data", "cache_dir": None, "record_dir": "record", "device": "auto", "amp": True,
    "num_workers": 4, "eval_every": 1, "eval_batch_size": 512, "random_crop_padding": 0, "random_hflip": False,
    "overwrite": False, "resume": False, "index": None, "save_name": None, "train_subset": None, "pretrained": None,
    "pretrained_path": None, "reserve_dataset_path": None,
    "steplr_milestones": [], "steplr_stepsize": 30, "steplr_gamma": 0.1, "cos_t_max": None,
}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of flag names to values")
    return data


def _coerce(action: argparse.Action, key: str, value, source: Path):
    if value is None or action.type is None:
        return value
    try:
        if action.nargs in ("+", "*") and isinstance(value, (list, tuple)):
            return [action.type(v) for v in value]
        if action.type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if action.type is int and isinstance(value, bool):
            raise ValueError
        return action.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UserError(f"{source}: {key}={value!r} is not a valid value for --{key}") from None


def resolve_config(parser: argparse.ArgumentParser, layers, argv=None, ignored: dict | None = None,
                   dropped: list | None = None) -> Config:
    """Parse flags, then merge, each over the one before: :data:`COMMON_DEFAULTS`, ``layers`` (YAML
    paths, dicts, or ``(path, dict)`` for values read from that file and named by it in errors; or a
    callable taking the parsed flags and returning them), ``--yaml_path`` and the flags. ``ignored``:
    settings the script has no use for; a value the user gives for one (a flag, abbreviated or not,
    or a key of ``--yaml_path``) is left out of the config and its name appended to ``dropped``, for
    the script to log."""
    args = vars(parser.parse_args(argv))
    actions = {a.dest: a for a in parser._actions}
    ignored = ignored or {}
    user_given = []
    for key in [k for k in args if k in ignored]:
        args.pop(key)
        user_given.append(key)
    layers = list(layers(args) if callable(layers) else layers)
    if "yaml_path" in args:
        layers.append(Path(args["yaml_path"]))
    merged: dict = {k: v for k, v in COMMON_DEFAULTS.items() if k in actions}
    for i, layer in enumerate(layers):
        if isinstance(layer, tuple):
            source, values = Path(layer[0]), layer[1]
        elif isinstance(layer, dict):
            source, values = Path("<record>"), layer
        else:
            source = Path(layer)
            values = _read_yaml(source)
        from_user = "yaml_path" in args and i == len(layers) - 1
        for key, value in values.items():
            if key not in actions:
                raise UserError(f"{source}: unknown setting {key!r} (see --help for the accepted flags)")
            if from_user and key in ignored:
                user_given.append(key)
                continue
            merged[key] = _coerce(actions[key], key, value, source)
    if dropped is not None:
        dropped.extend(dict.fromkeys(user_given))
    merged.update(args)
    for key, value in merged.items():
        _check_finite(actions[key], key, value)
    return Config(**merged)


def _check_finite(action: argparse.Action, key: str, value) -> None:
    """Every number flag, from the command line or a YAML file, is finite: ``nan`` or ``inf`` would
    train garbage and still write a finished record."""
    if action.type is not float or value is None:
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise UserError(f"--{key} {v} is not a finite number; give a finite value")


def require(cfg: Config, *keys: str) -> None:
    missing = [k for k in keys if getattr(cfg, k, None) is None]
    if missing:
        raise UserError(f"missing setting(s) {', '.join('--' + k for k in missing)}: give them as flags or in YAML")


def check_training(cfg: Config) -> None:
    """Ranges of the training settings that are present (a defense without training may lack some)."""
    for key in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
        if getattr(cfg, key, 1) < 1:
            raise UserError(f"--{key} {getattr(cfg, key)} must be at least 1")
    if getattr(cfg, "lr", 1.0) <= 0:
        raise UserError(f"--lr {cfg.lr} must be positive")
    if getattr(cfg, "wd", 0.0) < 0:
        raise UserError(f"--wd {cfg.wd} must not be negative")
    # PyTorch's SGD refuses a negative momentum; at 1 or more the velocity never forgets a gradient
    # (an undamped or growing sum), so training diverges. BackdoorBench's configs use 0.9.
    momentum = getattr(cfg, "sgd_momentum", 0.0)
    if momentum is not None and not 0 <= momentum < 1:
        raise UserError(f"--sgd_momentum {momentum} is outside [0, 1); give e.g. 0.9 (BackdoorBench's value) or 0 "
                        f"for plain SGD")


def check_range(name: str, value: float, low: float, high: float, low_open: bool = True) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise UserError(f"--{name} {value} is outside {'(' if low_open else '['}{low}, {high}]; "
                        f"give a value in that range")


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but none is available; use --device cpu or auto")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
