"""Models: `create(name, pretrained=..., num_classes=...)` for timm backbones and the custom CNN.

Every model outputs logits; softmax is applied by the loss and the metrics. Weight sources: None (random init),
"hub", "file:PATH" and "package" (see `blastscan.models.weights`). `preprocessing_for` says what input a model
expects; `freeze_backbone` / `unfreeze` support staged fine-tuning.
"""

from blastscan.models.custom_cnn import BlastscanCNN
from blastscan.models.factory import (
    create,
    freeze_backbone,
    model_names,
    preprocessing_for,
    register,
    unfreeze,
)

__all__ = [
    "BlastscanCNN",
    "create",
    "freeze_backbone",
    "model_names",
    "preprocessing_for",
    "register",
    "unfreeze",
]
