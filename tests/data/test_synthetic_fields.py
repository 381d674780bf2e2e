"""Synthetic whole smear fields: image, true leukocyte positions, touching and border cells, sizes, the writer."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from blastscan.data.synthetic import (
    SYNTHETIC_TAG,
    FieldCell,
    StainStyle,
    SyntheticField,
    draw_field,
    generate_dataset,
    generate_fields,
)
from blastscan.errors import DatasetError

SEEDS = (0, 1, 2)
SMALL = {"width": 320, "height": 240, "red_cell_diameter": 20.0}


@pytest.fixture(scope="module")
def fields() -> dict[int, SyntheticField]:
    return {seed: draw_field(np.random.default_rng(seed)) for seed in SEEDS}


def _purple(image: np.ndarray, smooth: bool = False) -> np.ndarray:
    """Nucleus- (and platelet-) coloured pixels: blue well above green, as the azure dye leaves them. `smooth`
    judges each pixel's 3x3 mean instead, so that sensor noise does not join stray pixels into blobs."""
    rgb = image.astype(float)
    if smooth:
        rgb = ndimage.uniform_filter(rgb, size=(3, 3, 1))
    return (rgb[..., 2] - rgb[..., 1]) / (rgb.sum(axis=-1) + 1e-9) > 0.1


def _box_gap(a: FieldCell, b: FieldCell) -> int:
    """Pixels between two boxes along the axis that separates them most (<= 0: the boxes overlap)."""
    return max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])


def _half_size(cell: FieldCell) -> float:
    return max(cell.box[2] - cell.box[0], cell.box[3] - cell.box[1]) / 2


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- draw_field ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_field_is_an_rgb_image_with_leukocytes_and_platelets(fields: dict[int, SyntheticField], seed: int) -> None:
    field = fields[seed]
    assert field.image.shape == (480, 640, 3)
    assert field.image.dtype == np.uint8
    assert field.red_cell_diameter == 40.0
    # 2-6 drawn cells plus the one cut by the border.
    assert 3 <= len(field.cells) <= 7
    assert {cell.kind for cell in field.cells} <= {"blast", "lymphocyte", "neutrophil"}
    assert len(field.platelets) == 6


def test_small_and_non_default_fields_have_the_asked_shape() -> None:
    field = draw_field(np.random.default_rng(0), 64, 96, red_cell_diameter=8, kinds=["lymphocyte"] * 2, platelets=2)
    assert field.image.shape == (96, 64, 3)
    assert [cell.kind for cell in field.cells] == ["lymphocyte"] * 3
    wide = draw_field(np.random.default_rng(0), 700, 200, red_cell_diameter=20, stain=StainStyle(), platelets=0)
    assert wide.image.shape == (200, 700, 3)
    assert wide.platelets == ()


def test_same_rng_state_gives_the_same_field() -> None:
    args = {**SMALL, "kinds": ["blast", "neutrophil", "lymphocyte"]}
    first = draw_field(np.random.default_rng(7), **args)
    again = draw_field(np.random.default_rng(7), **args)
    other = draw_field(np.random.default_rng(8), **args)
    assert np.array_equal(first.image, again.image)
    assert (first.cells, first.platelets) == (again.cells, again.platelets)
    assert not np.array_equal(first.image, other.image)
    assert first.cells != other.cells


@pytest.mark.parametrize("seed", SEEDS)
def test_boxes_hold_their_centroids_inside_the_field(fields: dict[int, SyntheticField], seed: int) -> None:
    height, width = fields[seed].image.shape[:2]
    for cell in fields[seed].cells:
        x0, y0, x1, y1 = cell.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x0 <= cell.x < x1 and y0 <= cell.y < y1


@pytest.mark.parametrize("seed", SEEDS)
def test_the_first_two_cells_touch_and_the_others_keep_apart(fields: dict[int, SyntheticField], seed: int) -> None:
    cells = fields[seed].cells
    assert _box_gap(cells[0], cells[1]) <= 2
    # Touching, not stacked: centroids about two radii apart.
    distance = np.hypot(cells[0].x - cells[1].x, cells[0].y - cells[1].y)
    assert distance > 0.7 * (_half_size(cells[0]) + _half_size(cells[1]))
    for a, b in itertools.combinations(range(len(cells)), 2):
        if (a, b) != (0, 1):
            first, second = cells[a], cells[b]
            assert np.hypot(first.x - second.x, first.y - second.y) > _half_size(first) + _half_size(second)


@pytest.mark.parametrize("seed", SEEDS)
def test_only_the_last_cell_is_cut_by_the_border(fields: dict[int, SyntheticField], seed: int) -> None:
    *inner, border = fields[seed].cells
    height, width = fields[seed].image.shape[:2]
    assert border.touches_border
    x0, y0, x1, y1 = border.box
    assert x0 == 0 or y0 == 0 or x1 == width or y1 == height
    for cell in inner:
        assert not cell.touches_border
        x0, y0, x1, y1 = cell.box
        assert x0 > 0 and y0 > 0 and x1 < width and y1 < height


def test_without_pair_or_border_cell_all_cells_keep_apart_from_the_border() -> None:
    kinds = ["neutrophil", "blast", "lymphocyte"]
    field = draw_field(np.random.default_rng(3), **SMALL, kinds=kinds, touching_pair=False, border_cell=False)
    assert [cell.kind for cell in field.cells] == kinds
    assert not any(cell.touches_border for cell in field.cells)
    assert all(_box_gap(a, b) > 2 for a, b in itertools.combinations(field.cells, 2))


def test_leukocyte_sizes_follow_the_red_cell_diameter() -> None:
    kinds = ["blast", "lymphocyte", "neutrophil"] * 2
    sizes: dict[float, list[float]] = {}
    for diameter in (30.0, 60.0):
        sizes[diameter] = []
        for seed in (0, 1):
            field = draw_field(np.random.default_rng(seed), red_cell_diameter=diameter, kinds=kinds, border_cell=False)
            for cell in field.cells:
                across = (cell.box[2] - cell.box[0] + cell.box[3] - cell.box[1]) / 2 / diameter
                # Leukocyte diameters in red cells, as in blood (a little slack for outline and box rounding).
                low, high = {"lymphocyte": (0.9, 1.45), "neutrophil": (1.3, 1.85), "blast": (1.25, 2.1)}[cell.kind]
                assert low <= across <= high, (cell, diameter)
                sizes[diameter].append(across * diameter)
    ratio = np.array(sizes[60.0]) / np.array(sizes[30.0])
    assert 1.6 < np.median(ratio) < 2.4


@pytest.mark.parametrize("seed", SEEDS)
def test_every_leukocyte_shows_nucleus_colour_and_red_cells_do_not(
    fields: dict[int, SyntheticField], seed: int
) -> None:
    field = fields[seed]
    purple = _purple(field.image)
    outside = np.ones_like(purple)
    for cell in field.cells:
        reach = 0.35 * _half_size(cell) * 2
        rows = slice(max(0, int(cell.y - reach)), int(cell.y + reach) + 1)
        cols = slice(max(0, int(cell.x - reach)), int(cell.x + reach) + 1)
        assert purple[rows, cols].sum() >= 100, cell
        # The box is the mask's; blur carries a little colour a pixel or two beyond it.
        x0, y0, x1, y1 = cell.box
        outside[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = False
    # Away from the leukocytes only platelets are purple blobs: film and red cells stay pink.
    blobs, count = ndimage.label(_purple(field.image, smooth=True) & outside)
    platelets = {blobs[round(y), round(x)] for x, y in field.platelets}
    areas = np.bincount(blobs.ravel())
    assert 0 not in platelets
    assert all(areas[label] < 10 for label in range(1, count + 1) if label not in platelets)


@pytest.mark.parametrize("seed", SEEDS)
def test_platelets_are_small_purple_dots_outside_every_leukocyte(fields: dict[int, SyntheticField], seed: int) -> None:
    field = fields[seed]
    components, _ = ndimage.label(_purple(field.image, smooth=True))
    areas = np.bincount(components.ravel())
    whole = [c for c in field.cells if not c.touches_border]
    smallest_cell = min((c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) for c in whole)
    for x, y in field.platelets:
        for cell in field.cells:
            x0, y0, x1, y1 = cell.box
            assert not (x0 <= x < x1 and y0 <= y < y1), "a platelet lies on a leukocyte"
        near = components[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3]
        labels = near[near > 0]
        assert labels.size, f"no purple at the platelet ({x:.0f}, {y:.0f})"
        area = areas[np.bincount(labels).argmax()]
        # 0.2-0.3 red cells across against 1-2 for a leukocyte: (at most) a tenth of the smallest one's box.
        assert 8 <= area < 0.12 * smallest_cell


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 63}, "width must be at least 64"),
        ({"height": 10}, "height must be at least 64"),
        ({"red_cell_diameter": 2.0}, "red_cell_diameter"),
        ({"platelets": -1}, "platelets"),
        ({"kinds": ["monocyte", "blast"]}, "unknown synthetic cell kind 'monocyte'"),
        ({"kinds": ["blast"]}, "touching_pair needs at least two kinds"),
        ({"width": 64, "height": 64, "kinds": ["blast"] * 6}, "cannot fit 7 leukocytes"),
    ],
)
def test_bad_field_arguments_raise_dataset_error(kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        draw_field(np.random.default_rng(0), **kwargs)


# --- generate_fields -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def field_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_fields(tmp_path_factory.mktemp("fields") / "out", n_fields=4, seed=3, **SMALL)


def test_field_set_files_and_rows_agree(field_set: Path) -> None:
    images = sorted(p.name for p in (field_set / "fields").iterdir())
    assert [re.sub(r"_\d\.png$", "", name) for name in images] == [f"SYN-FIELD-{i:03d}" for i in range(4)]
    for name in images:
        with Image.open(field_set / "fields" / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (320, 240))
    cells = pd.read_csv(field_set / "cells.csv")
    assert list(cells.columns) == ["field", "kind", "x", "y", "x0", "y0", "x1", "y1", "touches_border"]
    assert sorted(cells["field"].unique()) == [name.removesuffix(".png") for name in images]
    for field, rows in cells.groupby("field"):
        # The name's last digit says whether the field holds a blast; one cell per field is cut by the border.
        assert field.endswith("_1") == (rows["kind"] == "blast").any()
        assert rows["touches_border"].sum() == 1
        assert ((rows["x0"] <= rows["x"]) & (rows["x"] < rows["x1"]) & (rows["y0"] <= rows["y"])).all()
    # blast_fraction 0.5 of 4 fields.
    assert sum(name.endswith("_1.png") for name in images) == 2
    platelets = pd.read_csv(field_set / "platelets.csv")
    assert list(platelets.columns) == ["field", "x", "y"]
    assert platelets["field"].value_counts().to_dict() == dict.fromkeys(cells["field"].unique(), 6)
    readme = (field_set / "README.txt").read_text(encoding="utf-8").splitlines()
    assert readme[0].startswith(f"{SYNTHETIC_TAG}:") and "not real patient data" in readme[0]
    assert sorted(p.name for p in field_set.iterdir()) == ["README.txt", "cells.csv", "fields", "platelets.csv"]


def test_field_set_is_byte_identical_per_seed_and_normal_only_without_blasts(tmp_path: Path) -> None:
    args = {"n_fields": 2, "seed": 5, **SMALL}
    first = _files(generate_fields(tmp_path / "a", **args))
    again = _files(generate_fields(tmp_path / "b", **args))
    assert first == again
    normal = generate_fields(tmp_path / "c", **{**args, "blast_fraction": 0.0})
    assert all(p.name.endswith("_0.png") for p in (normal / "fields").iterdir())
    assert set(pd.read_csv(normal / "cells.csv")["kind"]) <= {"lymphocyte", "neutrophil"}


def test_field_set_replaces_its_own_folder_but_no_other(tmp_path: Path) -> None:
    out = generate_fields(tmp_path / "out", n_fields=2, **SMALL)
    generate_fields(out, n_fields=1, **SMALL)
    assert len(list((out / "fields").iterdir())) == 1
    assert set(pd.read_csv(out / "cells.csv")["field"]) == {p.stem for p in (out / "fields").iterdir()}
    (out / "fields" / "my_annotations.json").write_text("{}")
    with pytest.raises(DatasetError, match="previous synthetic field set; refusing"):
        generate_fields(out, n_fields=1, **SMALL)
    assert (out / "fields" / "my_annotations.json").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my thesis")
    with pytest.raises(DatasetError, match="not empty"):
        generate_fields(mine, n_fields=1, **SMALL)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # A single-cell dataset is another layout: neither writer clears the other's folder.
    cells = generate_dataset(tmp_path / "cells", n_patients=1, cells_per_patient=1, size=32)
    with pytest.raises(DatasetError, match="refusing"):
        generate_fields(cells, n_fields=1, **SMALL)
    assert (cells / "labels.csv").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_fields": 0}, "n_fields"),
        ({"blast_fraction": 1.5}, "blast_fraction"),
        ({"width": 32}, "width"),
        ({"red_cell_diameter": 0.0}, "red_cell_diameter"),
    ],
)
def test_bad_field_set_arguments_raise_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        generate_fields(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
