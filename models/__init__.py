"""Model registry. Importing this package registers every model file."""
from models.registry import (ModelLayers, create_model, is_model, list_models, model_layers, new_model,
                             register_model)
from models import preact_resnet  # noqa: F401  (registers preactresnet18*)
from models import vgg  # noqa: F401  (registers vgg19_bn*)
from models import vit  # noqa: F401  (registers vit_b_16, vit_tiny_test)
from models.timm_models import create_timm_model

__all__ = ["ModelLayers", "create_model", "create_timm_model", "is_model", "list_models", "model_layers",
           "new_model", "register_model"]
