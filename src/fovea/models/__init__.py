"""Architectures: Fovea's own (mlp, cnn), every timm model by name, torchvision's alexnet and googlenet."""

from fovea.models import _small  # noqa: F401 - registers mlp and cnn
from fovea.models._architectures import (
    check_input_size,
    create_model,
    default_config,
    list_models,
    register_model,
    source_of,
)
from fovea.models._summary import summarize

__all__ = ["check_input_size", "create_model", "default_config", "list_models", "register_model", "source_of", "summarize"]
