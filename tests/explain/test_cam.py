"""Grad-CAM family maps for every architecture family, and the explanation files of a tiny SYNTHETIC run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from blastscan.data.synthetic import generate_dataset
from blastscan.errors import ConfigError
from blastscan.explain.cam import (
    CAM_METHODS,
    compute_cams,
    explain_images,
    feature_map_grid,
    overlay_grid,
    target_layer,
)
from blastscan.models import create
from blastscan.training.config import parse_config
from blastscan.workflows.train import train
from training.conftest import fast_config

TINY = {"widths": [8, 16, 16, 32]}

# (model name, create() options, the layer target_layer must choose)
FAMILIES = [
    ("blastscan_cnn", TINY, "features.3"),
    ("resnet18", {}, "layer4.1"),
    ("densenet121", {}, "features.norm5"),
    ("efficientnet_b0", {}, "bn2"),
    ("tf_efficientnet_lite0", {}, "bn2"),
    ("mobilenetv3_large_100", {}, "blocks.6"),  # its conv_head runs after pooling, on a 1x1 map
]


def _name_of(model: nn.Module, layer: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is layer)


def _assert_maps(cams: np.ndarray, batch: int, size: int) -> None:
    assert cams.shape == (batch, size, size) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    for cam in cams:
        assert cam.max() > cam.min()  # a real map, not a constant


@pytest.mark.parametrize(("name", "options", "expected"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_gradcam_for_every_family(name: str, options: dict, expected: str) -> None:
    torch.manual_seed(0)
    model = create(name, pretrained=None, **options)
    layer = target_layer(model)
    assert _name_of(model, layer) == expected
    model.train()
    cams = compute_cams(model, torch.randn(1, 3, 64, 64), method="gradcam", layer=layer)
    _assert_maps(cams, 1, 64)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


@pytest.mark.parametrize("method", ["gradcam++", "eigencam", "scorecam"])
def test_other_methods_on_the_custom_cnn(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = create("blastscan_cnn", pretrained=None, **TINY).eval()
    cams = compute_cams(model, torch.randn(2, 3, 48, 48), method=method)
    _assert_maps(cams, 2, 48)
    assert capsys.readouterr().err == ""  # ScoreCAM's progress bar is kept quiet


def test_gradcam_plus_plus_and_eigencam_on_a_timm_model() -> None:
    torch.manual_seed(0)
    model = create("resnet18", pretrained=None).eval()
    for method in ("gradcam++", "eigencam"):
        _assert_maps(compute_cams(model, torch.randn(1, 3, 64, 64), method=method), 1, 64)


def test_generic_fallback_and_refusals() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.last = nn.Conv2d(4, 6, 3, padding=1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.last(torch.relu(self.stem(x)))).mean(dim=(2, 3)))

    plain = Plain()
    assert target_layer(plain) is plain.last
    _assert_maps(compute_cams(plain, torch.randn(1, 3, 16, 16)), 1, 16)
    with pytest.raises(ConfigError, match="no layer outputs"):
        target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2)))
    with pytest.raises(ConfigError, match="unknown CAM method"):
        compute_cams(plain, torch.randn(1, 3, 16, 16), method="nope")
    assert CAM_METHODS.names() == ["eigencam", "gradcam", "gradcam++", "scorecam"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("explain")
    generate_dataset(root / "data", n_patients=6, cells_per_patient=8, size=48, seed=0)
    config = parse_config(fast_config(root / "data" / "labels.csv", root / "runs", trainer__max_epochs=1))
    run_dir = train(config, progress_bar=False).run_dir
    images = sorted((root / "data").rglob("*.png"))[:3]
    return run_dir, images


def test_explain_images_writes_overlays_and_a_table(tiny_run: tuple[Path, list[Path]], tmp_path: Path) -> None:
    run_dir, images = tiny_run
    out = tmp_path / "explained"
    records = explain_images(run_dir, images, out, method="gradcam")
    assert [r.image for r in records] == images
    for record in records:
        assert 0.0 <= record.probability <= 1.0
        assert record.cam.shape == (32, 32) and 0.0 <= record.cam.min() <= record.cam.max() <= 1.0
        assert record.original == out / f"{record.image.stem}_original.png"
        assert record.overlay == out / f"{record.image.stem}_gradcam.png"
        with Image.open(record.overlay) as overlay, Image.open(record.image) as source:
            assert overlay.size == source.size and overlay.mode == "RGB"
    rows = list(csv.DictReader((out / "explanations.csv").open()))
    assert [row["image"] for row in rows] == [str(p) for p in images]
    assert rows[0]["method"] == "gradcam" and rows[0]["files"].split(";") == [
        records[0].original.name,
        records[0].overlay.name,
    ]
    # The same image twice gets a second stem instead of overwriting the first.
    twice = explain_images(run_dir, [images[0], images[0]], tmp_path / "twice", method="gradcam++")
    assert twice[1].overlay.name == f"{images[0].stem}_2_gradcampp.png"


def test_feature_map_grid_and_overlay_grid(tiny_run: tuple[Path, list[Path]], tmp_path: Path) -> None:
    run_dir, images = tiny_run
    grid = feature_map_grid(run_dir, images[0], tmp_path / "features.png", n_maps=6)
    with Image.open(grid) as picture:
        assert picture.width > picture.height > 100
    timm_grid = feature_map_grid(create("resnet18"), images[0], tmp_path / "resnet.png", image_size=64)
    assert timm_grid.is_file()
    picture = np.asarray(Image.open(images[0]).convert("RGB"))
    cam = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    gallery = overlay_grid([(picture, cam, "TP 0.97"), (picture, None, "FN 0.12")], tmp_path / "gallery.png")
    assert gallery.is_file()
    assert overlay_grid([], tmp_path / "empty.png").is_file()
