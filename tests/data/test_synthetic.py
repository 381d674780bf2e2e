"""The synthetic smear generator: images, dataset layout, determinism, scan() round trip, honest difficulty."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from blastscan.data.scan import scan
from blastscan.data.synthetic import SYNTHETIC_TAG, StainStyle, draw_cell, generate_dataset
from blastscan.errors import DatasetError

KINDS = ("blast", "lymphocyte", "neutrophil")


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("syn") / "out", n_patients=4, cells_per_patient=10, size=64)


@pytest.fixture(scope="module")
def stats_dataset(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """A larger set for the separability checks: labels plus two per-image features."""
    root = generate_dataset(tmp_path_factory.mktemp("stats") / "out", n_patients=10, cells_per_patient=20, size=64)
    labels = pd.read_csv(root / "labels.csv")
    images = np.stack([np.asarray(Image.open(root / p)) for p in labels["path"]]).astype(float)
    gray = images.mean(axis=-1)
    # "Dark" relative to the image's own background level, so lamp brightness does not matter.
    median = np.median(gray.reshape(len(gray), -1), axis=1)
    labels["dark_fraction"] = (gray < 0.75 * median[:, None, None]).mean(axis=(1, 2))
    labels[["mean_r", "mean_g", "mean_b"]] = images.mean(axis=(1, 2))
    return labels


# --- draw_cell -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [64, 128])
def test_draw_cell_is_rgb_uint8_with_a_darker_centre(kind: str, size: int) -> None:
    image = draw_cell(kind, np.random.default_rng(0), size=size)
    assert image.shape == (size, size, 3)
    assert image.dtype == np.uint8
    gray = image.mean(axis=-1)
    centre = gray[size * 3 // 8 : size * 5 // 8, size * 3 // 8 : size * 5 // 8].mean()
    # The stained cell is centred: its middle absorbs more light than the image as a whole.
    assert centre < gray.mean() - 10


def test_draw_cell_is_deterministic_per_rng_state() -> None:
    stain = StainStyle()
    first = draw_cell("blast", np.random.default_rng(5), stain=stain)
    again = draw_cell("blast", np.random.default_rng(5), stain=stain)
    other = draw_cell("blast", np.random.default_rng(6), stain=stain)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_draw_cell_rejects_unknown_kind_and_tiny_size() -> None:
    with pytest.raises(DatasetError, match="unknown synthetic cell kind 'monocyte'"):
        draw_cell("monocyte", np.random.default_rng(0))
    with pytest.raises(DatasetError, match="too small"):
        draw_cell("blast", np.random.default_rng(0), size=8)


def test_stain_style_is_frozen_and_sampled_reproducibly() -> None:
    style = StainStyle.sample(np.random.default_rng(3))
    assert style == StainStyle.sample(np.random.default_rng(3))
    assert style != StainStyle.sample(np.random.default_rng(4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        style.strength = 2.0  # type: ignore[misc]


# --- generate_dataset ------------------------------------------------------------------------------------------


def test_labels_csv_lists_every_image_with_its_patient(small_dataset: Path) -> None:
    labels = pd.read_csv(small_dataset / "labels.csv")
    assert list(labels.columns) == ["path", "label", "patient_id", "cell_type", "dataset"]
    assert len(labels) == 40
    assert sorted(labels["patient_id"].unique()) == ["SYN-P00", "SYN-P01", "SYN-P02", "SYN-P03"]
    assert set(labels["dataset"]) == {"synthetic"}
    assert set(labels["label"]) == {"leukemic", "normal"}
    assert (labels["label"] == "leukemic").equals(labels["cell_type"] == "blast")
    assert set(labels.loc[labels["label"] == "normal", "cell_type"]) <= {"lymphocyte", "neutrophil"}
    for row in labels.itertuples():
        assert re.fullmatch(rf"images/{row.patient_id}/{row.label}_\d{{3}}\.png", row.path)
        with Image.open(small_dataset / row.path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    assert len(list((small_dataset / "images").rglob("*.png"))) == len(labels)


def test_patients_are_leukemic_with_some_normal_cells_or_healthy(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "out", n_patients=6, cells_per_patient=10, size=32, leukemic_fraction=0.5)
    labels = pd.read_csv(root / "labels.csv")
    blasts = labels.groupby("patient_id")["label"].apply(lambda s: int((s == "leukemic").sum()))
    assert blasts.sum() == 30
    leukemic_patients = blasts[blasts > 0]
    assert (leukemic_patients > 5).all() and (leukemic_patients < 10).all()
    assert (blasts == 0).any()


def test_leukemic_fraction_zero_gives_only_normal_cells(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "out", n_patients=2, cells_per_patient=3, size=32, leukemic_fraction=0.0)
    assert set(pd.read_csv(root / "labels.csv")["label"]) == {"normal"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"leukemic_fraction": 1.5}, "leukemic_fraction"),
        ({"n_patients": 0}, "n_patients"),
        ({"cells_per_patient": 0}, "cells_per_patient"),
        ({"size": 16}, "too small"),
    ],
)
def test_bad_arguments_raise_dataset_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        generate_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_readme_says_synthetic_in_its_first_line(small_dataset: Path) -> None:
    first = (small_dataset / "README.txt").read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(SYNTHETIC_TAG)
    assert "not real patient data" in first
    assert "diagnosis" in first


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    args = {"n_patients": 3, "cells_per_patient": 4, "size": 48, "seed": 11}
    first = _files(generate_dataset(tmp_path / "a", **args))
    second = _files(generate_dataset(tmp_path / "b", **args))
    other = _files(generate_dataset(tmp_path / "c", **{**args, "seed": 12}))
    assert first == second
    assert first != other


def test_scan_reads_the_labels_csv_with_patient_ids(small_dataset: Path) -> None:
    result = scan(small_dataset / "labels.csv")
    manifest = result.manifest
    assert result.reader == "csv" and result.auto_detected
    assert len(manifest) == 40
    assert manifest.has_patients
    assert sorted(manifest.table["patient_id"].unique()) == [f"SYN-P0{i}" for i in range(4)]
    assert set(manifest.table["label"]) == {"leukemic", "normal"}
    assert set(manifest.table["dataset"]) == {"synthetic"}
    assert set(manifest.table["width"]) == {64}


# --- honest difficulty -----------------------------------------------------------------------------------------


def _cv_accuracy(features: pd.DataFrame, labels: pd.Series) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression())
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return float(cross_val_score(model, features, labels, cv=folds).mean())


def test_a_shape_feature_separates_classes_but_mean_colour_does_not(stats_dataset: pd.DataFrame) -> None:
    y = stats_dataset["label"] == "leukemic"
    colour = stats_dataset[["mean_r", "mean_g", "mean_b"]]
    dark_accuracy = _cv_accuracy(stats_dataset[["dark_fraction"]], y)
    colour_accuracy = _cv_accuracy(colour, y)
    # Blasts have far more nucleus than lymphocytes or neutrophils: dark area carries the class (0.92-0.97 over
    # seeds 0-9 at this size).
    assert dark_accuracy > 0.75
    # Mean colour still carries some signal (0.53-0.77 over seeds 0-9): per-patient stain and white balance hide most
    # of it, and not even a fit on all the data separates the classes (at most 0.78 in-sample).
    in_sample = make_pipeline(StandardScaler(), LogisticRegression()).fit(colour, y).score(colour, y)
    assert in_sample < 0.9
    assert colour_accuracy < dark_accuracy - 0.1


# --- the output folder -----------------------------------------------------------------------------------------


def test_refuses_a_non_empty_folder_that_is_not_a_synthetic_dataset(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset(out, n_patients=1, cells_per_patient=1, size=32)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_refuses_a_synthetic_dataset_with_foreign_files_added(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "out", n_patients=1, cells_per_patient=2, size=32)
    (out / "images" / "SYN-P00" / "my_annotations.json").write_text("{}")
    with pytest.raises(DatasetError, match="refusing"):
        generate_dataset(out, n_patients=1, cells_per_patient=2, size=32)
    assert (out / "images" / "SYN-P00" / "my_annotations.json").exists()


def test_refuses_a_file_as_output_folder(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        generate_dataset(target, n_patients=1, cells_per_patient=1, size=32)


def test_overwrites_a_previous_synthetic_dataset(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "out", n_patients=3, cells_per_patient=2, size=32)
    generate_dataset(out, n_patients=1, cells_per_patient=2, size=32)
    assert [p.name for p in (out / "images").iterdir()] == ["SYN-P00"]
    assert set(pd.read_csv(out / "labels.csv")["patient_id"]) == {"SYN-P00"}


def test_writes_into_an_existing_empty_folder(tmp_path: Path) -> None:
    generate_dataset(tmp_path, n_patients=1, cells_per_patient=1, size=32)
    assert (tmp_path / "labels.csv").is_file()
