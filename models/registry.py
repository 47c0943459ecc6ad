"""A small model registry in the spirit of timm: each model file registers its constructors, and
with them the names of the layers that layer-based defenses work on (:class:`ModelLayers`)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


@dataclass(frozen=True)
class ModelLayers:
    """Module names a model offers to the defenses that act on named layers; their defaults.

    ``classifier``: the final Linear layer. ``stages``: the outputs of the last two feature stages,
    NAD's default attention maps. ``pruned``: the Linear layer whose inputs are the last
    convolutional stage's pooled channels, which FP ranks and prunes; ``None`` where the model has no
    convolutional stage (a ViT), so FP refuses with one line unless ``--prune_layer`` names a layer.
    ``theta_s``: D3's default ``--select_layer_name`` (the paper's "weights of the linear layers",
    "one or a few layers"), the classifier unless the model file says otherwise and why."""
    classifier: str
    stages: tuple[str, ...]
    pruned: str | None
    theta_s: str | None = None

    @property
    def d3_layers(self) -> str:
        return self.theta_s or self.classifier


_LAYERS: dict[str, ModelLayers] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, layers: ModelLayers | None = None):
    """``@register_model`` or ``@register_model(layers=ModelLayers(...))``."""
    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} registered twice")
        _MODELS[fn.__name__] = fn
        if layers is not None:
            _LAYERS[fn.__name__] = layers
        return fn
    return register(fn) if fn is not None else register


def model_layers(name: str, model: nn.Module) -> ModelLayers:
    """The named layers of model ``name`` (built as ``model``): declared by its model file, or, for
    ``timm/<name>``, read from timm's own metadata (``pretrained_cfg["classifier"]`` and
    ``feature_info``). A model that declares none gets its last Linear layer as classifier only."""
    from utils.errors import UserError
    if name in _LAYERS:
        return _LAYERS[name]
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    classifier = None
    if name.startswith("timm/"):
        classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
        classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    classifier = classifier or (linear[-1] if linear else None)
    if classifier is None:
        raise UserError(f"model {name!r} has no Linear layer to act on; name the layers explicitly")
    stages = tuple(f["module"] for f in getattr(model, "feature_info", [])[-2:] if isinstance(f, dict))
    modules = dict(model.named_modules())
    last = modules.get(stages[-1]) if stages else None
    convolutional = last is not None and any(isinstance(m, nn.Conv2d) for m in last.modules())
    return ModelLayers(classifier, stages, classifier if convolutional else None)


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


def new_model(cfg, num_classes: int) -> nn.Module:
    """The model a run trains from its start (``cfg.model``): random, or pretrained from ``--pretrained_path``."""
    return create_model(cfg.model, num_classes, pretrained=getattr(cfg, "pretrained", None),
                        pretrained_path=getattr(cfg, "pretrained_path", None))


def is_model(name: str) -> bool:
    return name in _MODELS or name.startswith("timm/")
