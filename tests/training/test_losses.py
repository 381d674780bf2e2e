"""Imbalance losses checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blastscan.errors import ConfigError
from blastscan.training.losses import (
    FocalLoss,
    class_balanced_sampler,
    class_balanced_weights,
    inverse_frequency_weights,
    make_loss,
)

# Two samples, two classes. Sample A: logits [2, 0], target 0. Sample B: logits [0, 1], target 1.
LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
TARGET = torch.tensor([0, 1])
# softmax of [2, 0] at class 0: p_A = e^2 / (e^2 + 1) = 1 / (1 + e^-2) = 0.880797
# softmax of [0, 1] at class 1: p_B = 1 / (1 + e^-1) = 0.731059
P_A = 1 / (1 + math.exp(-2))
P_B = 1 / (1 + math.exp(-1))
# CE = -log p:  CE_A = log(1 + e^-2) = 0.126928,  CE_B = log(1 + e^-1) = 0.313262
CE_A = math.log(1 + math.exp(-2))
CE_B = math.log(1 + math.exp(-1))


def test_hand_numbers_are_what_we_think() -> None:
    assert pytest.approx(0.880797, abs=1e-6) == P_A
    assert pytest.approx(0.731059, abs=1e-6) == P_B
    assert pytest.approx(0.126928, abs=1e-6) == CE_A
    assert pytest.approx(0.313262, abs=1e-6) == CE_B


def test_ce() -> None:
    loss = make_loss("ce", [5, 5])
    assert loss(LOGITS[:1], TARGET[:1]).item() == pytest.approx(CE_A, rel=1e-6)
    # mean of the two: (0.126928 + 0.313262) / 2 = 0.220095
    assert loss(LOGITS, TARGET).item() == pytest.approx(0.220095, abs=1e-6)


def test_inverse_frequency_weights() -> None:
    # counts [1, 3]: 1/n = [1, 1/3], mean 2/3, so weights [1 / (2/3), (1/3) / (2/3)] = [1.5, 0.5]
    assert inverse_frequency_weights([1, 3]).tolist() == pytest.approx([1.5, 0.5])
    # counts [10, 20, 40]: 1/n = [0.1, 0.05, 0.025], mean 0.058333, weights [1.714286, 0.857143, 0.428571]
    assert inverse_frequency_weights([10, 20, 40]).tolist() == pytest.approx([12 / 7, 6 / 7, 3 / 7])
    assert inverse_frequency_weights([10, 20, 40]).mean().item() == pytest.approx(1.0)


def test_weighted_ce() -> None:
    loss = make_loss("weighted_ce", [1, 3])
    # weights [1.5, 0.5]; torch's weighted mean: (1.5 CE_A + 0.5 CE_B) / (1.5 + 0.5)
    # = (0.190392 + 0.156631) / 2 = 0.173512
    expected = (1.5 * CE_A + 0.5 * CE_B) / 2.0
    assert expected == pytest.approx(0.173512, abs=1e-6)
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_class_balanced_weights_by_hand() -> None:
    # beta = 0.9, counts [10, 100]
    # 0.9^10  = 0.3486784401   -> E_10  = (1 - 0.3486784401) / 0.1 = 6.513215599
    # 0.9^100 = 0.0000265614   -> E_100 = (1 - 0.0000265614) / 0.1 = 9.999734386
    # 1/E = [0.1535338, 0.1000027], sum 0.2535365; times C/sum = 2 / 0.2535365:
    # weights = [1.2111385, 0.7888615]  (sum 2)
    weights = class_balanced_weights([10, 100], beta=0.9)
    assert weights.tolist() == pytest.approx([1.2111385, 0.7888615], abs=1e-6)
    assert weights.sum().item() == pytest.approx(2.0)


def test_class_balanced_weights_limits() -> None:
    # beta = 0: E_n = 1 for every class, so equal weights.
    assert class_balanced_weights([10, 1000, 3], beta=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    # beta -> 1: E_n -> n, so inverse frequency (here normalised to sum 2): counts [1, 3] -> [1.5, 0.5]
    assert class_balanced_weights([1, 3], beta=0.999999).tolist() == pytest.approx([1.5, 0.5], abs=1e-4)
    with pytest.raises(ConfigError, match="beta"):
        class_balanced_weights([1, 3], beta=1.0)


def test_class_balanced_ce() -> None:
    loss = make_loss("class_balanced", [10, 100], beta=0.9)
    w0, w1 = 1.2111385, 0.7888615
    # (1.2111385 * 0.126928 + 0.7888615 * 0.313262) / 2 = (0.153725 + 0.247120) / 2 = 0.200423
    expected = (w0 * CE_A + w1 * CE_B) / (w0 + w1)
    assert expected == pytest.approx(0.200423, abs=1e-6)
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-5)


def test_focal_by_hand() -> None:
    # gamma = 2, sample A: (1 - 0.880797)^2 * 0.126928 = 0.119203^2 * 0.126928 = 0.0142094 * 0.126928 = 0.0018036
    focal = FocalLoss(gamma=2.0)
    assert focal(LOGITS[:1], TARGET[:1]).item() == pytest.approx(0.0018036, abs=1e-7)
    # sample B: (1 - 0.731059)^2 * 0.313262 = 0.0723295 * 0.313262 = 0.0226581; mean with A: 0.0122308
    fa = (1 - P_A) ** 2 * CE_A
    fb = (1 - P_B) ** 2 * CE_B
    assert fb == pytest.approx(0.0226581, abs=1e-7)
    assert focal(LOGITS, TARGET).item() == pytest.approx((fa + fb) / 2, rel=1e-5)
    assert (fa + fb) / 2 == pytest.approx(0.0122308, abs=1e-7)


def test_focal_with_alpha_and_gamma_zero() -> None:
    # alpha [0.25, 0.75]: plain mean of (0.25 * FL_A + 0.75 * FL_B)
    focal = FocalLoss(gamma=2.0, alpha=[0.25, 0.75])
    expected = (0.25 * (1 - P_A) ** 2 * CE_A + 0.75 * (1 - P_B) ** 2 * CE_B) / 2
    assert focal(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-5)
    # gamma = 0 without alpha is cross-entropy.
    assert FocalLoss(gamma=0.0)(LOGITS, TARGET).item() == pytest.approx((CE_A + CE_B) / 2, rel=1e-6)
    with pytest.raises(ConfigError, match="one weight per class"):
        FocalLoss(alpha=[1.0, 1.0, 1.0])(LOGITS, TARGET)


def test_make_loss_variants() -> None:
    focal = make_loss("focal", [3, 7], gamma=1.0)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.0 and focal.alpha is None
    cb_focal = make_loss("class_balanced", [10, 100], beta=0.9, base="focal")
    assert isinstance(cb_focal, FocalLoss)
    assert cb_focal.alpha.tolist() == pytest.approx([1.2111385, 0.7888615], abs=1e-6)
    cb_ce = make_loss("class_balanced", [10, 100])
    assert isinstance(cb_ce, nn.CrossEntropyLoss)
    # Buffers and weights move with the module.
    assert "alpha" in dict(cb_focal.named_buffers())
    # Gradients flow.
    logits = LOGITS.clone().requires_grad_(True)
    cb_focal(logits, TARGET).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_make_loss_errors() -> None:
    with pytest.raises(ConfigError, match="unknown loss 'dice'"):
        make_loss("dice", [1, 2])
    with pytest.raises(ConfigError, match="does not take beta"):
        make_loss("focal", [1, 2], beta=0.9)
    with pytest.raises(ConfigError, match="base must be"):
        make_loss("class_balanced", [1, 2], base="mse")
    with pytest.raises(ConfigError, match="class 1 has no samples"):
        make_loss("weighted_ce", [4, 0, 2])
    with pytest.raises(ConfigError, match="class 0 has no samples"):
        make_loss("ce", [0, 3])
    with pytest.raises(ConfigError, match="class 2 has no samples"):
        class_balanced_weights([5, 5, 0])


def test_sampler_draws_classes_roughly_equally() -> None:
    labels = [0] * 90 + [1] * 9 + [2] * 1
    sampler = class_balanced_sampler(labels, generator=torch.Generator().manual_seed(0), num_samples=30_000)
    drawn = torch.tensor(labels)[torch.tensor(list(sampler))]
    shares = torch.bincount(drawn, minlength=3).double() / len(drawn)
    # Each class should be ~1/3; the standard error at n=30000 is ~0.003.
    assert shares.tolist() == pytest.approx([1 / 3] * 3, abs=0.02)
    assert len(class_balanced_sampler(labels)) == 100


def test_sampler_is_reproducible_and_rejects_gaps() -> None:
    labels = [0, 0, 0, 1]
    first = list(class_balanced_sampler(labels, generator=torch.Generator().manual_seed(7)))
    second = list(class_balanced_sampler(labels, generator=torch.Generator().manual_seed(7)))
    assert first == second
    with pytest.raises(ConfigError, match="class 1 has no samples"):
        class_balanced_sampler([0, 2, 2])
    with pytest.raises(ConfigError, match="no labels"):
        class_balanced_sampler([])
