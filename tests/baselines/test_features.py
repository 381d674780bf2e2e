"""Segmentation of the central leukocyte and the handcrafted feature transformers, on real ALL-IDB2 / DeepAPL cells."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from blastscan.baselines.features import (
    COLOUR_FEATURES,
    MORPHOLOGY_FEATURES,
    TEXTURE_FEATURES,
    ColourFeatures,
    HandcraftedFeatures,
    MorphologyFeatures,
    SegmentationWarning,
    TextureFeatures,
)
from blastscan.data.images import load_rgb, resize_rgb
from blastscan.imaging.segmentation import (
    WORKING_SIZE,
    save_segmentation_figure,
    segment_cell,
    segmentation_gallery,
)

EXTRACTORS = [MorphologyFeatures, ColourFeatures, TextureFeatures, HandcraftedFeatures]
DEEPAPL_TYPES = ("Blast, no lineage spec", "Lymphocyte", "Segmented neutrophils", "Monocyte")


def _allidb2_paths(allidb2_dir: Path, label: int, n: int) -> list[Path]:
    paths = sorted((allidb2_dir / "img").glob(f"Im*_{label}.tif"))[:n]
    if len(paths) < n:
        pytest.skip(f"ALL-IDB2 at {allidb2_dir} holds fewer than {n} images of class {label}")
    return paths


@pytest.fixture(scope="module")
def allidb2_cells(allidb2_dir: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """The first 20 blasts and the first 20 normal cells of ALL-IDB2 (257 x 257), with labels 1 / 0."""
    paths = _allidb2_paths(allidb2_dir, 1, 20) + _allidb2_paths(allidb2_dir, 0, 20)
    return [load_rgb(p) for p in paths], np.array([1] * 20 + [0] * 20)


@pytest.fixture(scope="module")
def deepapl_paths(deepapl_dir: Path) -> list[Path]:
    """Two CellaVision cells (360 x 363) of each of four types, from the first patient folders in sorted order."""
    paths = []
    for cell_type in DEEPAPL_TYPES:
        found = sorted((deepapl_dir / "Data" / "All").glob(f"Patient_*/Signed slides/{cell_type}/*.jpg"))
        if len(found) < 2:
            pytest.skip(f"DeepAPL at {deepapl_dir} has too few '{cell_type}' cells")
        paths += [found[0], found[len(found) // 2]]
    return paths


@pytest.fixture(scope="module")
def deepapl_cells(deepapl_paths: list[Path]) -> list[np.ndarray]:
    return [load_rgb(p) for p in deepapl_paths]


def _odd_images() -> dict[str, np.ndarray]:
    return {
        "white": np.full((128, 128, 3), 255, np.uint8),
        "black": np.zeros((128, 128, 3), np.uint8),
        "uniform purple": np.full((100, 120, 3), (128, 90, 180), np.uint8),
    }


# ---------------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------------


def _check_segmentation(image: np.ndarray) -> float:
    seg = segment_cell(resize_rgb(image, WORKING_SIZE))
    assert seg.ok, seg.note
    assert seg.note.startswith("nucleus:")
    assert seg.nucleus.shape == seg.cell.shape == (WORKING_SIZE, WORKING_SIZE)
    assert not (seg.nucleus & ~seg.cell).any(), "nucleus must lie inside the cell"
    nucleus_fraction = seg.nucleus.mean()
    # A small lymphocyte's nucleus is ~1% of a CellaVision crop; a blast's ~45% of an ALL-IDB2 crop.
    assert 0.005 < nucleus_fraction < 0.6, f"nucleus covers {nucleus_fraction:.1%} of the image"
    assert seg.cell.sum() >= seg.nucleus.sum()
    return float(seg.nucleus.sum() / seg.cell.sum())


def test_segments_allidb2_cells(allidb2_cells: tuple[list[np.ndarray], np.ndarray]) -> None:
    images, _ = allidb2_cells
    for image in images[::5]:
        _check_segmentation(image)


def test_segments_deepapl_cells(deepapl_cells: list[np.ndarray]) -> None:
    for image in deepapl_cells:
        _check_segmentation(image)


def test_segments_cell_on_black_background(deepapl_cells: list[np.ndarray]) -> None:
    # C-NMC style: the cell cut out onto black. Every stained pixel is then the cell's.
    image = resize_rgb(deepapl_cells[0], WORKING_SIZE)
    seg = segment_cell(image)
    on_black = np.where(seg.cell[..., None], image, 0).astype(np.uint8)
    black_seg = segment_cell(on_black)
    assert black_seg.ok, black_seg.note
    assert "cell on black" in black_seg.note
    assert not (black_seg.nucleus & ~black_seg.cell).any()
    overlap = (black_seg.nucleus & seg.nucleus).sum() / max(seg.nucleus.sum(), 1)
    assert overlap > 0.8


def test_blasts_have_higher_nucleus_to_cell_ratio(allidb2_cells: tuple[list[np.ndarray], np.ndarray]) -> None:
    images, labels = allidb2_cells
    ratios = np.array([_check_segmentation(image) for image in images])
    blasts, normal = ratios[labels == 1].mean(), ratios[labels == 0].mean()
    # Measured on these 40 cells: ~0.81 vs ~0.65 (all 260: 0.83 vs 0.61).
    assert blasts > normal + 0.08, (blasts, normal)


@pytest.mark.parametrize("name", list(_odd_images()))
def test_segmentation_fails_cleanly(name: str) -> None:
    image = _odd_images()[name]
    seg = segment_cell(image)
    assert not seg.ok
    assert seg.note and ("blank" in seg.note or "black" in seg.note)
    assert seg.nucleus.shape == seg.cell.shape == image.shape[:2]
    assert not seg.nucleus.any() and not seg.cell.any()


def test_segment_cell_rejects_non_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        segment_cell(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        segment_cell(np.zeros((32, 32), np.uint8))


def test_segmentation_figures(
    tmp_path: Path, deepapl_cells: list[np.ndarray], deepapl_paths: list[Path], allidb2_dir: Path
) -> None:
    out = save_segmentation_figure(
        [deepapl_cells[0], _odd_images()["white"]], ["a DeepAPL blast", "blank"], tmp_path / "grid.png"
    )
    assert out.is_file() and out.stat().st_size > 10_000
    paths = _allidb2_paths(allidb2_dir, 1, 3) + _allidb2_paths(allidb2_dir, 0, 3)
    gallery = segmentation_gallery(paths, tmp_path / "gallery.png", n=4, labels=["blast"] * 3 + ["normal"] * 3)
    assert gallery.is_file()
    with pytest.raises(ValueError, match="labels"):
        segmentation_gallery(deepapl_paths, tmp_path / "x.png", labels=["one"])


# ---------------------------------------------------------------------------------------------------------------
# Feature transformers
# ---------------------------------------------------------------------------------------------------------------


def test_feature_names_and_widths() -> None:
    dummy = [np.zeros((32, 32, 3), np.uint8)]
    widths = {
        MorphologyFeatures: len(MORPHOLOGY_FEATURES) + 1,
        ColourFeatures: len(COLOUR_FEATURES) + 1,
        TextureFeatures: len(TEXTURE_FEATURES) + 1,
        HandcraftedFeatures: len(MORPHOLOGY_FEATURES) + len(COLOUR_FEATURES) + len(TEXTURE_FEATURES) + 1,
    }
    assert len(TEXTURE_FEATURES) == 4 + 10  # GLCM properties + uniform LBP (P=8) bins
    for cls, width in widths.items():
        names = cls().fit(dummy).get_feature_names_out()
        assert len(names) == width and len(set(names)) == width
        assert names[-1] == "segmentation_ok"


@pytest.mark.parametrize("cls", EXTRACTORS)
def test_features_on_real_cells(
    cls: type, deepapl_cells: list[np.ndarray], allidb2_cells: tuple[list[np.ndarray], np.ndarray]
) -> None:
    # A list of images of two sizes (363 x 360 and 257 x 257) and, below, one (N, H, W, 3) array.
    images = deepapl_cells[:3] + allidb2_cells[0][:2]
    extractor = cls()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SegmentationWarning)
        features = extractor.fit_transform(images)
    names = extractor.get_feature_names_out()
    assert features.dtype == np.float64
    assert features.shape == (len(images), len(names))
    assert np.isfinite(features).all()
    assert extractor.segmentation_failures_ == []
    assert (features[:, -1] == 1.0).all()
    stacked = np.stack(allidb2_cells[0][:2])
    assert np.allclose(extractor.transform(stacked), features[3:])


def test_feature_values_are_plausible(deepapl_cells: list[np.ndarray]) -> None:
    extractor = HandcraftedFeatures().fit(deepapl_cells)
    table = dict(zip(extractor.get_feature_names_out(), extractor.transform(deepapl_cells).T, strict=True))
    assert ((table["nucleus_area"] > 0) & (table["nucleus_area"] <= table["cell_area"])).all()
    assert ((table["nucleus_to_cell_ratio"] > 0) & (table["nucleus_to_cell_ratio"] <= 1)).all()
    for shape in ("circularity", "solidity", "eccentricity"):
        for region in ("nucleus", "cell"):
            assert ((table[f"{region}_{shape}"] >= 0) & (table[f"{region}_{shape}"] <= 1)).all()
    assert (table["nucleus_lobes"] >= 1).all()
    lbp = np.stack([table[f"lbp_{code}"] for code in range(10)])
    assert np.allclose(lbp.sum(axis=0), 1.0)
    # Purple chromatin: bluer than red and green.
    assert (table["nucleus_mean_B"] > table["nucleus_mean_G"]).all()


@pytest.mark.parametrize("cls", EXTRACTORS)
def test_failures_are_recorded_and_finite(cls: type, deepapl_cells: list[np.ndarray]) -> None:
    odd = list(_odd_images().values())
    images = [deepapl_cells[0], *odd]
    extractor = cls().fit(images)
    with pytest.warns(SegmentationWarning, match="3 of 4 images could not be segmented") as record:
        features = extractor.transform(images)
    assert len([w for w in record if issubclass(w.category, SegmentationWarning)]) == 1
    assert np.isfinite(features).all()
    assert features.shape == (4, len(extractor.get_feature_names_out()))
    assert [row for row, _ in extractor.segmentation_failures_] == [1, 2, 3]
    assert all(note for _, note in extractor.segmentation_failures_)
    assert features[:, -1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert (features[1:, :-1] == 0).all()


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        HandcraftedFeatures().fit(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="image 1"):
        HandcraftedFeatures().fit([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.float64)])
    with pytest.raises(ValueError, match="size"):
        HandcraftedFeatures(size=4).fit([np.zeros((32, 32, 3), np.uint8)])


def test_native_size_and_threads_agree(deepapl_cells: list[np.ndarray]) -> None:
    images = deepapl_cells[:4]
    serial = HandcraftedFeatures().fit_transform(images)
    threaded = HandcraftedFeatures(n_jobs=2).fit_transform(images)
    assert np.array_equal(serial, threaded)
    native = HandcraftedFeatures(size=None).fit_transform(images)
    names = list(HandcraftedFeatures().fit(images).get_feature_names_out())
    # Image-relative sizes do not depend on the working size (within segmentation noise).
    column = names.index("nucleus_to_cell_ratio")
    assert np.allclose(native[:, column], serial[:, column], atol=0.1)


def test_pipeline_on_allidb2(allidb2_cells: tuple[list[np.ndarray], np.ndarray]) -> None:
    images, labels = allidb2_cells
    pipeline = make_pipeline(HandcraftedFeatures(), StandardScaler(), LogisticRegression(max_iter=2000))
    pipeline.fit(images, labels)
    assert pipeline.predict(images[:5]).shape == (5,)
    assert pipeline.score(images, labels) > 0.9  # training accuracy: the features separate the classes
    assert pipeline.predict_proba(images[:2]).shape == (2, 2)
    assert list(pipeline[:-1].get_feature_names_out())[-1] == "segmentation_ok"
    clone(pipeline)  # parameters follow the sklearn conventions


def test_pandas_output(deepapl_cells: list[np.ndarray]) -> None:
    frame = MorphologyFeatures().set_output(transform="pandas").fit_transform(deepapl_cells[:1])
    assert list(frame.columns) == [*MORPHOLOGY_FEATURES, "segmentation_ok"]
