"""CAM localisation on hand-made arrays, and the shortcut audit end to end on a tiny run on the real ALL-IDB2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blastscan.data.images import load_rgb, resize_rgb
from blastscan.data.manifest import read_manifest
from blastscan.explain.localisation import cam_energy_in_mask, localisation_summary
from blastscan.explain.shortcuts import CONDITIONS, PROBE, cell_mask, remove_background, remove_cell
from blastscan.training.config import parse_config
from blastscan.workflows.shortcuts import shortcut_audit
from blastscan.workflows.train import train


def _quadrant_mask() -> np.ndarray:
    mask = np.zeros((16, 16), dtype=bool)
    mask[:8, :8] = True  # the top-left 8x8 quadrant
    return mask


def test_cam_energy_block_inside_quadrant() -> None:
    cam = np.zeros((16, 16))
    cam[2:6, 2:6] = 1.0  # 16 units inside the quadrant
    assert cam_energy_in_mask(cam, _quadrant_mask()) == 1.0
    cam[10:14, 10:14] = 0.5  # 8 units outside
    assert cam_energy_in_mask(cam, _quadrant_mask()) == pytest.approx(16 / 24)


def test_cam_energy_half_inside_and_zero() -> None:
    cam = np.zeros((16, 16))
    cam[2:6, 6:10] = 1.0  # columns 6-7 inside the quadrant, 8-9 outside
    assert cam_energy_in_mask(cam, _quadrant_mask()) == pytest.approx(0.5)
    assert np.isnan(cam_energy_in_mask(np.zeros((16, 16)), _quadrant_mask()))


def test_cam_energy_resizes_mask_nearest() -> None:
    small = np.zeros((4, 4), dtype=bool)
    small[:2, :2] = True  # the same quadrant at a quarter of the size
    cam = np.zeros((16, 16))
    cam[2:6, 6:10] = 1.0
    assert cam_energy_in_mask(cam, small) == pytest.approx(0.5)


def test_localisation_summary_per_class() -> None:
    inside, outside, empty = np.zeros((3, 16, 16))
    inside[:4, :4] = 1.0
    outside[12:, 12:] = 1.0
    cams = np.stack([inside, outside, inside, empty])
    masks = np.stack([_quadrant_mask()] * 4)
    table = localisation_summary(cams, masks, ["leukemic", "leukemic", "normal", "normal"], "gradcam")
    leukemic = table.set_index("label").loc["leukemic"]
    normal = table.set_index("label").loc["normal"]
    assert leukemic["mean"] == pytest.approx(0.5) and leukemic["sd"] == pytest.approx(np.sqrt(0.5))
    assert leukemic["n"] == 2 and normal["n"] == 1 and normal["n_undefined"] == 1
    assert normal["mean"] == 1.0 and np.isnan(normal["sd"]) and set(table["method"]) == {"gradcam"}


def tiny_tree(root: Path, runs_dir: Path) -> dict:
    return {
        "name": "tiny_shortcuts",
        "runs_dir": str(runs_dir),
        "data": {"root": str(root), "image_size": 48, "cache_dir": str(runs_dir / "cache")},
        "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [8, 16, 16, 32]}},
        "trainer": {"max_epochs": 1, "batch_size": 32},
    }


@pytest.fixture(scope="module")
def tiny_run(allidb2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("shortcuts")
    return train(parse_config(tiny_tree(allidb2_dir, workdir)), progress_bar=False).run_dir


def test_masking_real_cell(allidb2_dir: Path) -> None:
    image = resize_rgb(load_rgb(sorted((allidb2_dir / "img").glob("*.tif"))[0]), 128)
    mask, ok = cell_mask(image, 128)
    assert ok and 0.02 < mask.mean() < 0.9
    neutral = np.array([200.0, 190.0, 210.0])
    no_cell = remove_cell(image, mask)
    assert (no_cell[~mask] == image[~mask]).all() and (no_cell[mask] != image[mask]).any(axis=1).mean() > 0.5
    assert len(np.unique(no_cell[mask], axis=0)) == 1  # one fill colour
    only_cell = remove_background(image, mask, neutral)
    assert (only_cell[mask] == image[mask]).all() and (only_cell[~mask] == neutral.astype(np.uint8)).all()


def test_shortcut_audit_end_to_end(tiny_run: Path, tmp_path: Path) -> None:
    logged: list[str] = []
    report = shortcut_audit(tiny_run, out_dir=tmp_path / "audit", n_boot=50, log=logged.append)
    for name in ("shortcuts.json", "shortcuts.md", "shortcuts.png", "shortcut_examples.png"):
        assert (tmp_path / "audit" / name).is_file(), name
    assert set(report.conditions) == {*CONDITIONS, PROBE} and logged
    for name, metrics in report.conditions.items():
        assert np.isfinite(metrics["roc_auc"]), name
        assert metrics["n_images"] == report.n_images
    saved = json.loads((tmp_path / "audit" / "shortcuts.json").read_text())
    assert set(saved["conditions"]) == {*CONDITIONS, PROBE}
    assert saved["n_unsegmented"] == report.n_unsegmented == len(saved["unsegmented_paths"])
    assert 0 < report.n_images < len(read_manifest(tiny_run / "manifest.csv"))  # the test split only
    table = (tmp_path / "audit" / "shortcuts.md").read_text()
    assert "| condition | AUROC (95% CI) | F1 (95% CI) | accuracy |" in table and "background-only probe" in table

    # The views really differ where they should, and only there.
    ex = report.examples
    original, no_cell, no_background, masks = (
        ex["original"],
        ex["cell_removed"],
        ex["background_removed"],
        ex["cell_mask"],
    )
    assert len(original) == 4 and original.shape[1:] == (48, 48, 3)
    for i in range(len(original)):
        mask = masks[i]
        if not mask.any():
            continue  # an unsegmented image stays as it was
        assert (no_cell[i][~mask] == original[i][~mask]).all()
        assert (no_cell[i][mask] != original[i][mask]).any()
        assert (no_background[i][mask] == original[i][mask]).all()
        assert (no_background[i][~mask] != original[i][~mask]).any()
        assert len(np.unique(no_background[i][~mask], axis=0)) == 1
