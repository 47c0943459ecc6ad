"""Model registry. Importing this package registers every model file."""
from models.registry import create_model, list_models, register_model
from models import preact_resnet  # noqa: F401  (registers preactresnet18*)

__all__ = ["create_model", "list_models", "register_model"]
