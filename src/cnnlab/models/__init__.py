"""The model zoo. Each family lives in its own module and registers itself on import."""
from cnnlab.models import (  # noqa: F401  (register)
    alexnet,
    efficientnet_lite,
    googlenet,
    lenet,
    resnet,
    speednet,
    torchvision_nets,
    tutorial,
    vgg,
)
from cnnlab.models.registry import (
    InputSize,
    ModelInfo,
    check_input_size,
    create_model,
    default_image_size,
    list_models,
    min_input_size,
    model_info,
    register_model,
)

__all__ = ["InputSize", "ModelInfo", "check_input_size", "create_model", "default_image_size", "list_models",
           "min_input_size", "model_info", "register_model"]
