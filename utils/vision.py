"""Importing torchvision (and what imports it, timm) with one clear line when it does not match torch.

A torch/torchvision pair built for each other is required: pip falls back to an unmatched pair when
the CPU-wheel index is unreachable, and ``import torchvision`` then fails deep inside its operator
registration ("operator torchvision::nms does not exist"). Every import of it goes through here, so
that failure becomes a :class:`UserError` naming the versions to install."""
from __future__ import annotations

import importlib

import torch

from utils.errors import UserError


def matching_torchvision(torch_version: str) -> str:
    """The torchvision release built for ``torch_version``: torch 2.x pairs with torchvision 0.(x + 15)."""
    major, minor = (int(p) for p in torch_version.split("+")[0].split(".")[:2])
    return f"0.{minor + 15}" if major == 2 else "the one listed for it on pytorch.org"


def mismatch_message(error: Exception) -> str:
    wanted = matching_torchvision(torch.__version__)
    return (f"torchvision does not match torch {torch.__version__} ({str(error).splitlines()[0]}); install the "
            f"pair built together: pip install 'torchvision=={wanted}.*' (with the same --index-url as torch)")


def import_vision(module: str = "torchvision"):
    """``importlib.import_module(module)`` for torchvision or a package built on it (timm)."""
    try:
        return importlib.import_module(module)
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        raise UserError(mismatch_message(e)) from None
