"""`data.cell_focus`: framing real cells of each dataset on their leukocyte, the neutral background of `mask`, the
reported failures, and the segmentation measured against the public BCCD boxes and ALL-IDB1 centroids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from blastscan.data.cache import ImageCache
from blastscan.data.images import load_rgb
from blastscan.data.manifest import Manifest
from blastscan.data.scan import scan
from blastscan.imaging.cell_focus import NEUTRAL_FILL, CellFocus
from blastscan.imaging.preprocess import prepare_image_and_flag, prepare_with_cell_mask, prepared_cache
from blastscan.imaging.segmentation import segment_cell
from blastscan.smear.field_truth import bccd_wbc_boxes, framing_against_boxes, framing_against_marks, read_marks


@pytest.fixture(scope="module")
def real_cells(allidb2_dir: Path, deepapl_dir: Path) -> dict[str, np.ndarray]:
    deepapl = sorted(deepapl_dir.rglob("*.jpg"))
    return {
        "all-idb2 blast": load_rgb(allidb2_dir / "img" / "Im001_1.tif"),
        "all-idb2 normal": load_rgb(allidb2_dir / "img" / "Im150_0.tif"),
        "deepapl": load_rgb(deepapl[0]),
        "deepapl other": load_rgb(deepapl[len(deepapl) // 2]),
    }


def on_black(cell_image: np.ndarray) -> np.ndarray:
    """A C-NMC-style image made from a real cell: the segmented cell kept, everything else black."""
    seg = segment_cell(np.asarray(Image.fromarray(cell_image).resize((128, 128))))
    mask = np.asarray(Image.fromarray(seg.cell).resize(cell_image.shape[1::-1], Image.Resampling.NEAREST))
    out = np.zeros_like(cell_image)
    out[mask] = cell_image[mask]
    return out


@pytest.mark.parametrize("name", ["all-idb2 blast", "all-idb2 normal", "deepapl", "deepapl other", "c-nmc style"])
def test_crop_frames_the_cell_with_a_margin_proportional_to_its_size(real_cells: dict, name: str) -> None:
    image = on_black(real_cells["deepapl"]) if name == "c-nmc style" else real_cells[name]
    focus = CellFocus("crop", margin=0.25)
    framed = focus.frame(image)
    assert framed.ok, framed.note
    h, w = framed.image.shape[:2]
    assert h == w and framed.mask is not None and framed.mask.shape == (h, w)
    # The cell spans 1 / (1 + 2 x margin) of the box and sits in its middle.
    rows, cols = np.nonzero(framed.mask)
    extent = max(np.ptp(rows), np.ptp(cols)) + 1
    assert extent / h == pytest.approx(1 / 1.5, abs=0.05)
    centre = np.array([(rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2])
    assert np.all(np.abs(centre - (h - 1) / 2) <= 0.05 * h)
    # A larger margin shows more around the same cell.
    wider = CellFocus("crop", margin=0.75).frame(image)
    assert wider.image.shape[0] > h


@pytest.mark.parametrize("name", ["all-idb2 blast", "deepapl", "c-nmc style"])
def test_mask_sets_everything_outside_the_cell_to_one_neutral_value(real_cells: dict, name: str) -> None:
    image = on_black(real_cells["deepapl"]) if name == "c-nmc style" else real_cells[name]
    prepared, mask = prepare_with_cell_mask(image, 96, focus=CellFocus("mask"))
    assert prepared.shape == (96, 96, 3) and mask is not None
    neutral = np.all(prepared == NEUTRAL_FILL, axis=2)
    assert neutral[~mask].mean() > 0.8  # outside the cell (less its thin halo) is neutral
    assert neutral[0].all() and neutral[:, 0].all()  # the corners and edges are background
    assert not neutral[mask].any()  # the cell itself is untouched
    # C-NMC's black surround is "just another background": no black is left.
    assert (prepared.max(axis=2) <= 20).mean() < 0.01


def test_a_blank_image_is_reported_and_used_whole_never_silently(tmp_path: Path) -> None:
    blank = np.full((120, 120, 3), 230, dtype=np.uint8)
    framed = CellFocus("mask").frame(blank)
    assert not framed.ok and framed.mask is None and "no cell found" in framed.note
    assert framed.image is blank
    image, found = prepare_image_and_flag(blank, 64, focus=CellFocus("mask"))
    assert not found and image.shape == (64, 64, 3) and not np.all(image == NEUTRAL_FILL)


def test_the_cache_records_which_rows_had_no_cell(allidb2_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("Im001_1.tif", "Im150_0.tif"):
        (data / name).write_bytes((allidb2_dir / "img" / name).read_bytes())
    Image.new("RGB", (100, 100), (235, 230, 225)).save(data / "empty.png")
    table = {"path": ["Im001_1.tif", "Im150_0.tif", "empty.png"], "label": ["leukemic", "normal", "normal"],
             "patient_id": [None] * 3, "group_id": ["a", "b", "c"], "dataset": ["t"] * 3}  # fmt: skip
    manifest = Manifest(table=pd.DataFrame(table), root=data, format="test")
    focus = CellFocus("crop")
    cache = prepared_cache(manifest, 48, cache_dir=tmp_path / "cache", focus=focus)
    assert cache.row_flags().tolist() == [True, True, False]
    # Rows equal what prepare_image gives for the same file, and the flags survive a reopen of the entry.
    np.testing.assert_array_equal(cache[0], prepare_image_and_flag(data / "Im001_1.tif", 48, focus=focus)[0])
    again = prepared_cache(manifest, 48, cache_dir=tmp_path / "cache", focus=focus)
    assert again.path == cache.path and again.row_flags().tolist() == [True, True, False]
    # Each framing has its own entry: a plain cache of the same manifest is another folder.
    assert ImageCache(manifest, 48, cache_dir=tmp_path / "cache").path != cache.path


def test_framing_matches_the_public_bccd_leukocyte_boxes(bccd_dir: Path) -> None:
    manifest = scan(bccd_dir, format="bccd", verify=False).manifest
    records = []
    for path, boxes in list(zip(manifest.absolute_paths(), manifest.table["boxes"], strict=True))[:12]:
        wbc = bccd_wbc_boxes(json.loads(boxes) if isinstance(boxes, str) else None)
        records += framing_against_boxes(load_rgb(path), wbc, CellFocus("crop"))
    iou = np.array([r["iou"] for r in records])
    assert len(records) >= 10 and all(r["found"] for r in records)
    assert np.median(iou) >= 0.6 and (iou >= 0.5).mean() >= 0.8


def test_framing_finds_the_annotated_allidb1_blasts(allidb1_dir: Path) -> None:
    records = []
    for stem in ("Im001_1", "Im006_1", "Im007_1"):
        marks = read_marks(allidb1_dir / "xyc" / f"{stem}.xyc")
        records += framing_against_marks(load_rgb(allidb1_dir / "im" / f"{stem}.jpg"), marks, CellFocus("crop"))
    assert len(records) >= 10
    assert np.mean([r["inside"] for r in records]) >= 0.9
    assert np.median([r["distance"] for r in records if r["found"]]) <= 30  # blasts are ~100-150 px across here
