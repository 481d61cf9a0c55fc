"""Architectures: Fovea's own (mlp, cnn, rnn/lstm/gru, the classical hog-svm family), every timm model by name,
torchvision's alexnet and googlenet."""

from fovea.models import _classical, _sequence, _small  # noqa: F401 - register Fovea's own models
from fovea.models._architectures import (
    check_input_size,
    create_model,
    default_config,
    describe_model,
    list_models,
    register_model,
    source_of,
)
from fovea.models._summary import summarize

__all__ = ["check_input_size", "create_model", "default_config", "describe_model", "list_models", "register_model",
           "source_of", "summarize"]
