"""`blastscan.models.create`: the custom CNN, timm backbones, preprocessing and freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blastscan.errors import ConfigError
from blastscan.models import (
    BlastscanCNN,
    create,
    factory,
    freeze_backbone,
    model_names,
    preprocessing_for,
    unfreeze,
)
from blastscan.registry import Registry

TIMM_NAMES = [
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "mobilenetv3_large_100",
]


@pytest.mark.parametrize("size", [64, 128, 224])
def test_custom_cnn_forwards_logits_at_several_sizes(size: int) -> None:
    model = create("blastscan_cnn", num_classes=2).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()
    # Logits, not probabilities: rows need not sum to 1.
    assert not torch.allclose(logits.sum(1), torch.ones(2))


def test_custom_cnn_works_at_512_and_non_square() -> None:
    model = create("blastscan_cnn", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 512, 512)).shape == (1, 3)
        assert model(torch.randn(1, 3, 96, 160)).shape == (1, 3)


def test_custom_cnn_architecture_is_the_papers() -> None:
    model = create("blastscan_cnn", num_classes=2, drop_rate=0.4)
    assert isinstance(model, BlastscanCNN)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(256, 256), (256, 2)]
    assert [m.p for m in model.head.modules() if isinstance(m, nn.Dropout)] == [0.4]
    assert model.get_classifier() is model.head


def test_custom_cnn_options_and_features_only() -> None:
    model = create("blastscan_cnn", num_classes=0, in_chans=1, widths=(8, 16, 16, 32), convs_per_block=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 32)
    with pytest.raises(ConfigError, match="does not know option"):
        create("blastscan_cnn", depth=5)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_backbones_build_and_forward_small_batch(name: str) -> None:
    model = create(name, num_classes=2).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()
    assert model.load_notes == ["no pretrained weights: random initialisation"]


def test_drop_rate_and_options_reach_timm() -> None:
    assert create("resnet18", num_classes=2, drop_rate=0.25).drop_rate == 0.25
    assert create("resnet18", num_classes=2, in_chans=1).conv1.in_channels == 1
    with pytest.raises(ConfigError, match="rejected the options"):
        create("resnet18", not_an_option=1)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet19'.*resnet18"):
        create("resnet19")


def test_bad_sources_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"not understood.*file:PATH"):
        create("resnet18", pretrained="imagenet")
    with pytest.raises(ConfigError, match="only available for 'tf_efficientnet_lite0'"):
        create("resnet18", pretrained="package")
    with pytest.raises(ConfigError, match="only available for 'tf_efficientnet_lite0'"):
        create("blastscan_cnn", pretrained="package")
    with pytest.raises(ConfigError, match="no hub weights"):
        create("blastscan_cnn", pretrained="hub")
    with pytest.raises(ConfigError, match="needs a path"):
        create("blastscan_cnn", pretrained="file:")


def test_preprocessing() -> None:
    half = (0.5, 0.5, 0.5)
    assert preprocessing_for("tf_efficientnet_lite0", "package") == {
        "mean": half,
        "std": half,
        "input_size": (3, 224, 224),
    }
    assert preprocessing_for("blastscan_cnn") == {"mean": half, "std": half, "input_size": (3, 224, 224)}
    resnet = preprocessing_for("resnet18")
    assert resnet["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert resnet["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert resnet["input_size"] == (3, 224, 224)
    with pytest.raises(ConfigError, match="only available"):
        preprocessing_for("resnet18", "package")


@pytest.mark.parametrize("name", ["blastscan_cnn", "resnet18"])
def test_freeze_backbone_leaves_only_the_head_trainable(name: str) -> None:
    model = create(name, num_classes=2)
    freeze_backbone(model)
    head = {id(p) for p in model.get_classifier().parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head and head

    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in head)
    assert all(p.grad is not None for p in model.get_classifier().parameters())

    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_registering_a_model_makes_it_creatable(monkeypatch: pytest.MonkeyPatch) -> None:
    # A private copy of the registry, so the test model does not outlive the test.
    models: Registry = Registry("model")
    for name, build in factory.MODELS.items():
        models.add(name, build, **factory.MODELS.meta(name))
    monkeypatch.setattr(factory, "MODELS", models)

    class Tiny(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.fc = nn.Linear(3, num_classes)

        def get_classifier(self) -> nn.Module:
            return self.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean((2, 3)))

    @models.register("tiny_test_model", input_size=(3, 32, 32))
    def tiny(num_classes: int, drop_rate: float, in_chans: int) -> nn.Module:
        return Tiny(num_classes)

    assert "tiny_test_model" in model_names()
    assert create("tiny_test_model", num_classes=4)(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    assert preprocessing_for("tiny_test_model")["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny_test_model")(tiny)
