"""Field crops are framed like the classifier's training images: the cell fills the same share of the crop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from blastscan.data.images import resize_rgb
from blastscan.data.synthetic import draw_field
from blastscan.imaging.segmentation import WORKING_SIZE, segment_cell
from blastscan.smear.find import find_leukocytes
from blastscan.smear.framing import DEFAULT_CELL_FRACTION, Framing, crop_cells, measure_framing


def _cell_share(image: np.ndarray) -> float:
    segmentation = segment_cell(resize_rgb(image, WORKING_SIZE))
    assert segmentation.ok, segmentation.note
    return 2 * math.sqrt(segmentation.cell.sum() / math.pi) / WORKING_SIZE


def test_deepapl_and_all_idb2_are_framed_differently(deepapl_dir: Path, allidb2_dir: Path) -> None:
    """CellaVision (DeepAPL) centres a smaller share of the square on the cell than ALL-IDB2's hand-cut crops."""
    deepapl = sorted((deepapl_dir / "Data" / "All").rglob("*.jpg"))
    allidb2 = sorted((allidb2_dir / "img").glob("*.tif"))
    cellavision = measure_framing(deepapl, limit=24)
    hand_cut = measure_framing(allidb2, limit=24)
    assert cellavision.measured_on >= 20 and hand_cut.measured_on >= 20
    assert 0.3 <= cellavision.cell_fraction <= 0.45
    assert 0.4 <= hand_cut.cell_fraction <= 0.55
    assert cellavision.cell_fraction < hand_cut.cell_fraction


@pytest.mark.parametrize("fraction", [0.35, 0.5])
def test_a_field_crop_shows_the_cell_at_the_training_share(fraction: float) -> None:
    field = draw_field(np.random.default_rng(7), 640, 480, red_cell_diameter=40, touching_pair=False, border_cell=False)
    finding = find_leukocytes(field.image, red_cell_diameter=40)
    assert finding.cells
    framing = Framing(fraction, 1, "test")
    crops = crop_cells(
        field.image, [c.centroid for c in finding.cells], [framing.crop_side(c.diameter) for c in finding.cells]
    )
    shares = [_cell_share(crop) for crop in crops]
    assert np.median(shares) == pytest.approx(fraction, rel=0.25)


def test_crops_past_the_border_are_padded_with_glass_and_keep_their_size() -> None:
    image = np.full((100, 120, 3), 200, np.uint8)
    image[:10, :10] = 50
    (crop,) = crop_cells(image, [(2.0, 2.0)], [40.0])
    assert crop.shape == (40, 40, 3)
    assert (crop[:10, :10] == 200).all()  # outside the field: glass colour
    assert (crop[18:25, 18:25] == 50).all()


def test_unmeasurable_training_images_fall_back_to_the_default(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (230, 230, 230)).save(blank)
    framing = measure_framing([blank, tmp_path / "missing.png"])
    assert framing.cell_fraction == DEFAULT_CELL_FRACTION and framing.measured_on == 0
