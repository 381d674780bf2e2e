"""Losses for imbalanced C-class problems, all taking logits (N, C) and integer targets (N,).

- "ce": plain cross-entropy.
- "weighted_ce": cross-entropy weighted by inverse class frequency (weights normalised to mean 1).
- "class_balanced": Cui et al. 2019, weights from the effective number of samples E_n = (1 - beta^n) / (1 - beta),
  weight proportional to 1 / E_n and normalised to sum to C; applied to cross-entropy or focal loss.
- "focal": Lin et al. 2017, FL = -alpha_t (1 - p_t)^gamma log p_t.

`class_balanced_sampler` is the data-side alternative: it draws every class equally often.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import WeightedRandomSampler

from blastscan.errors import ConfigError
from blastscan.registry import Registry

#: The losses, by name. Each builder below registers itself with `@LOSSES.register(name, params={...})`: it
#: takes the training split's checked class counts and the loss's options (`params` defaults updated by the
#: config's `loss.params`) and returns the loss module. `make_loss` is the door; the config accepts `LOSSES.names()`.
LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss")


def inverse_frequency_weights(class_counts: Sequence[int]) -> torch.Tensor:
    """Per-class weights proportional to 1 / count, normalised to mean 1 (float32, shape (C,))."""
    counts = _checked_counts(class_counts)
    inverse = 1.0 / counts
    return (inverse / inverse.mean()).float()


def class_balanced_weights(class_counts: Sequence[int], beta: float = 0.999) -> torch.Tensor:
    """Cui et al. 2019 weights: proportional to 1 / E_n with E_n = (1 - beta^n) / (1 - beta), summing to C.

    beta = 0 gives equal weights; beta -> 1 approaches inverse frequency.
    """
    counts = _checked_counts(class_counts)
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"class-balanced beta must be in [0, 1) (typically 0.9 to 0.9999), got {beta}")
    effective = (1.0 - beta**counts) / (1.0 - beta)
    inverse = 1.0 / effective
    return (inverse * len(counts) / inverse.sum()).float()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) on logits: mean over samples of -alpha_t (1 - p_t)^gamma log p_t.

    `alpha` is None (no class weights) or one weight per class. The mean is a plain mean over the batch (as in the
    paper), not the alpha-weighted mean that nn.CrossEntropyLoss uses. gamma = 0 and alpha = None is cross-entropy.
    """

    alpha: torch.Tensor | None

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"focal gamma must be >= 0 (2.0 in the paper), got {gamma}")
        self.gamma = float(gamma)
        if alpha is None:
            self.register_buffer("alpha", None)
        else:
            weights = torch.as_tensor(alpha, dtype=torch.float32).flatten()
            if (weights < 0).any():
                raise ConfigError(f"focal alpha must hold non-negative per-class weights, got {weights.tolist()}")
            self.register_buffer("alpha", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.alpha is not None and self.alpha.numel() != logits.shape[1]:
            raise ConfigError(
                f"focal alpha has {self.alpha.numel()} weights but the logits have {logits.shape[1]} classes; "
                "give one weight per class"
            )
        log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
        loss = -((1.0 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss.dtype)[target.long()]
        return loss.mean()

    def extra_repr(self) -> str:
        alpha = None if self.alpha is None else [round(a, 4) for a in self.alpha.tolist()]
        return f"gamma={self.gamma}, alpha={alpha}"


@LOSSES.register("ce", params={})
def _cross_entropy(counts: torch.Tensor) -> nn.Module:
    return nn.CrossEntropyLoss()


@LOSSES.register("weighted_ce", params={})
def _weighted_cross_entropy(counts: torch.Tensor) -> nn.Module:
    return nn.CrossEntropyLoss(weight=inverse_frequency_weights(counts.tolist()))


@LOSSES.register("focal", params={"gamma": 2.0, "alpha": None})
def _focal(counts: torch.Tensor, gamma: float, alpha: Sequence[float] | None) -> nn.Module:
    if alpha is not None and len(alpha) != len(counts):
        raise ConfigError(f"focal alpha has {len(alpha)} weights for {len(counts)} classes; give one per class")
    return FocalLoss(gamma=gamma, alpha=alpha)


@LOSSES.register("class_balanced", params={"beta": 0.999, "base": "ce", "gamma": 2.0})
def _class_balanced(counts: torch.Tensor, beta: float, base: str, gamma: float) -> nn.Module:
    weights = class_balanced_weights(counts.tolist(), beta=beta)
    if base == "ce":
        return nn.CrossEntropyLoss(weight=weights)
    if base == "focal":
        return FocalLoss(gamma=gamma, alpha=weights)
    raise ConfigError(f"class_balanced base must be 'ce' or 'focal', got {base!r}")


def make_loss(name: str, class_counts: Sequence[int], **params: Any) -> nn.Module:
    """The loss called `name`, with class weights derived from the training split's `class_counts`.

    Names and params: "ce"; "weighted_ce"; "class_balanced" (beta=0.999, base="ce" or "focal", gamma=2.0 for focal);
    "focal" (gamma=2.0, alpha=None or per-class weights). Weighted cross-entropy is nn.CrossEntropyLoss(weight=w),
    whose batch mean is weighted by w. Raises ConfigError for an unknown name or parameter, or an empty class.
    """
    build = LOSSES.get(name)
    defaults = LOSSES.meta(name)["params"]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        accepted = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        raise ConfigError(f"loss {name!r} does not take {', '.join(unknown)}; its parameters: {accepted}")
    counts = _checked_counts(class_counts)
    return build(counts, **{**defaults, **params})


def balanced_sample_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weight 1 / (count of its class), so weighted draws give every class equal probability.

    Classes are 0 .. max(labels); one with no sample raises ConfigError.
    """
    label_tensor = torch.as_tensor(list(labels), dtype=torch.long)
    if label_tensor.numel() == 0:
        raise ConfigError("class-balanced sampling got no labels; the training split is empty")
    if (label_tensor < 0).any():
        raise ConfigError(f"labels must be class indices >= 0, found {int(label_tensor.min())}")
    counts = torch.bincount(label_tensor)
    _checked_counts(counts.tolist())
    return (1.0 / counts.double())[label_tensor]


def class_balanced_sampler(
    labels: Sequence[int],
    generator: torch.Generator | None = None,
    num_samples: int | None = None,
) -> WeightedRandomSampler:
    """A sampler drawing (with replacement) every class equally often (weights from `balanced_sample_weights`).

    Draws len(labels) indices per epoch unless `num_samples` is given.
    """
    sample_weights = balanced_sample_weights(labels)
    return WeightedRandomSampler(
        sample_weights,
        num_samples=len(sample_weights) if num_samples is None else num_samples,
        replacement=True,
        generator=generator,
    )


def _checked_counts(class_counts: Sequence[int]) -> torch.Tensor:
    """Counts as float64; ConfigError for no classes, negative counts or an empty class."""
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ConfigError(f"class_counts must list one count per class, got {list(class_counts)!r}")
    for index, count in enumerate(counts.tolist()):
        if count < 0 or count != int(count):
            raise ConfigError(f"class {index} has count {count}; counts must be whole numbers >= 0")
        if count == 0:
            raise ConfigError(
                f"class {index} has no samples (class_counts={[int(c) for c in counts.tolist()]}); add images of "
                "that class to the training split or leave the class out"
            )
    return counts
