"""Models: `create(name, pretrained=..., num_classes=...)` for timm backbones and the custom CNN.

Every model outputs logits; softmax is applied by the loss and the metrics. Weight sources: None (random init),
"hub", "file:PATH" and "package" (see `blastscan.models.weights`). `preprocessing_for` says what input a model
expects; `freeze_backbone` / `unfreeze` support staged fine-tuning. A new model is one module here whose builder
is decorated with `@MODELS.register(name, mean=..., std=..., input_size=...)`, imported below.
"""

# Importing the built-in models registers them with MODELS; the factory itself imports none of them.
from blastscan.models.custom_cnn import BlastscanCNN
from blastscan.models.factory import (
    MODELS,
    create,
    freeze_backbone,
    model_names,
    preprocessing_for,
    unfreeze,
)
from blastscan.models.weights import WEIGHT_SOURCES

__all__ = [
    "MODELS",
    "WEIGHT_SOURCES",
    "BlastscanCNN",
    "create",
    "freeze_backbone",
    "model_names",
    "preprocessing_for",
    "unfreeze",
]
