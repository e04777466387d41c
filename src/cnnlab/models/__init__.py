"""The model zoo. Each family lives in its own module and registers itself on import."""
from cnnlab.models import alexnet, googlenet, lenet, resnet, speednet, tutorial, vgg  # noqa: F401  (register)
from cnnlab.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
