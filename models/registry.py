"""A small model registry in the spirit of timm: each model file registers its constructors."""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int, *, pretrained: bool | None = None, pretrained_path=None,
                 **kwargs) -> nn.Module:
    """``name`` from the registry, or any timm model as ``timm/<name>``. ``pretrained``: None is the
    model's own default (ViT-B/16 starts from ImageNet weights, read from ``pretrained_path``); False
    a random start (a record's weights replace it anyway); True requires ``pretrained_path``."""
    from utils.errors import UserError
    start = {k: v for k, v in (("pretrained", pretrained), ("pretrained_path", pretrained_path)) if v is not None}
    if name.startswith("timm/"):
        from models.timm_models import create_timm_model
        return create_timm_model(name[len("timm/"):], num_classes, **start, **kwargs)
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}, or timm/<name>")
    fn = _MODELS[name]
    if "pretrained_path" not in inspect.signature(fn).parameters:
        if pretrained or pretrained_path is not None:
            raise UserError(f"model {name!r} has no pretrained start; drop --pretrained / --pretrained_path")
        start = {}
    return fn(num_classes=num_classes, **start, **kwargs)


def is_model(name: str) -> bool:
    return name in _MODELS or name.startswith("timm/")
