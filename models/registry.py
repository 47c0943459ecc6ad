"""A small model registry in the spirit of timm: each model file registers its constructors."""
from __future__ import annotations

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


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    if name not in _MODELS:
        from utils.errors import UserError
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[name](num_classes=num_classes, **kwargs)
