"""Any timm model (Wightman, "PyTorch Image Models", github.com/huggingface/pytorch-image-models) by
name, plus the loading of pretrained weights from a local file that every model file shares.

``create_timm_model(name, K)`` is ``timm.create_model(name, pretrained=False, num_classes=K)``: a
random start; images are fed at their own size (``img_size`` goes to models that take one, e.g.
ViTs, whose default is 224). These machines reach no model hub, so pretrained weights come only
from a local file: ``pretrained_path``, a safetensors file or a plain state dict (read with
``torch.load(weights_only=True)``) in timm's key names, e.g. the ``model.safetensors`` of a
``timm/<name>`` Hugging Face repository downloaded elsewhere. Every key but the classifier's is
loaded strictly; the classifier stays a random K-way layer. timm's own conversions (e.g. resampling
a ViT's position embedding to another ``img_size``) are not applied: such a file is refused with
the mismatched key named.

Layers for D3: the final linear layer is timm's classifier, ``model.pretrained_cfg["classifier"]``
(``fc`` for ResNets, ``head`` for ViTs, ``head.fc`` for ConvNeXts); ``all_linear`` selects every
``nn.Linear``.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch.nn as nn

from utils.errors import UserError
from utils.record import load_weights
from utils.vision import import_vision


def pretrained_file(model: str, pretrained: bool | None, pretrained_path, weights: str, note: str = ""):
    """The weights file to start ``model`` from, or None for a random start. ``pretrained`` False: a
    random start, ``pretrained_path`` ignored (e.g. when a record's weights replace them anyway);
    None: the file if one is given; True: the file, which must be given."""
    if pretrained is False:
        return None
    if pretrained and pretrained_path is None:
        raise UserError(f"{model} starts from pretrained weights and this machine reaches no model hub: download "
                        f"{weights} elsewhere and pass it with --pretrained_path, or pass --pretrained false to "
                        f"train from scratch{note}")
    return pretrained_path


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")


def load_pretrained(model: nn.Module, path, classifier: tuple[str, ...], weights: str) -> None:
    """Load the weights file ``path`` (safely: safetensors or ``weights_only``) into ``model``: every
    key but those of the ``classifier`` modules, strictly, with one clear line when the file does not
    fit. The classifier keeps its own (random, K-way) weights."""
    skip = tuple(f"{c}." for c in classifier)
    state = {k: v for k, v in load_weights(Path(path)).items() if not k.startswith(skip)}
    own = model.state_dict()
    wanted = {k: v for k, v in own.items() if not k.startswith(skip)}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    mismatched = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"missing {_few(missing)}"] if missing else []
        parts += [f"unexpected {_few(unexpected)}"] if unexpected else []
        if mismatched:
            k = mismatched[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, model needs {tuple(wanted[k].shape)}")
        raise UserError(f"--pretrained_path {path} does not fit {type(model).__name__}: {'; '.join(parts)}; "
                        f"pass {weights}")
    model.load_state_dict({**own, **state})  # strict: only the classifier's entries are the model's own


def create_timm_model(name: str, num_classes: int, pretrained_path=None, img_size: int | None = None,
                      pretrained: bool | None = None) -> nn.Module:
    """``timm/<name>`` in the registry. ``pretrained``: see :func:`pretrained_file`."""
    timm = import_vision("timm")  # takes seconds: only when a timm model is asked for

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown timm model {name!r}; {hint}timm.list_models('<pattern>') lists them")
    weights = f"timm's weights for {name}, in timm's key names (e.g. model.safetensors of a timm/{name} repository)"
    path = pretrained_file(f"timm/{name}", pretrained, pretrained_path, weights)
    extra = {} if img_size is None else {"img_size": img_size}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **extra)
    except TypeError as e:  # e.g. img_size for a convolutional network
        raise UserError(f"timm model {name!r} cannot be built with {extra}: {e}") from None
    if path is not None:
        classifier = model.pretrained_cfg.get("classifier") or ()
        load_pretrained(model, path, (classifier,) if isinstance(classifier, str) else tuple(classifier), weights)
    return model
