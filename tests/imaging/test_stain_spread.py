"""The stain spread across real datasets and the stain-jitter sigma calibrated on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blastscan.data.images import load_resized
from blastscan.imaging.stain import StainJitter
from blastscan.imaging.stain_spread import MAX_SIGMA, measure_stain, stain_spread


@pytest.fixture(scope="module")
def images(allidb2_dir: Path, deepapl_dir: Path) -> dict[str, list[np.ndarray]]:
    allidb2 = sorted((allidb2_dir / "img").glob("*.tif"))[::13]
    deepapl = sorted(deepapl_dir.rglob("*.jpg"))[::320]
    return {"all-idb2": [load_resized(p, 96) for p in allidb2], "deepapl": [load_resized(p, 96) for p in deepapl]}


def test_each_image_gets_two_positive_stain_levels(images: dict[str, list[np.ndarray]]) -> None:
    measure = measure_stain(images["deepapl"][0])
    assert measure is not None and measure.levels.shape == (2,) and (measure.levels > 0).all()
    assert measure.angles is None or ((measure.angles >= 0) & (measure.angles <= 90)).all()
    assert measure_stain(np.full((64, 64, 3), 240, dtype=np.uint8)) is None  # nothing stained, nothing measured


def test_sigma_covers_the_spread_between_datasets_more_than_within_one(images: dict) -> None:
    across = stain_spread(images)
    deepapl = images["deepapl"]
    within = stain_spread({"first half": deepapl[::2], "second half": deepapl[1::2]})
    assert 0 < within.sigma < across.sigma <= MAX_SIGMA
    low, high = across.ratio_range
    assert across.sigma >= max(1 - low, high - 1) - 1e-9 or across.sigma == MAX_SIGMA
    assert set(across.per_dataset) == {"all-idb2", "deepapl"}
    text = across.markdown()
    assert "| all-idb2 |" in text and f"**{across.sigma:.2f}**" in text
    # The calibrated sigma is a valid StainJitter strength.
    StainJitter(sigma_alpha=across.sigma, sigma_beta=0.05)
