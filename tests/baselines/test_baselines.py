"""Baselines: grouped tuning, CNN embeddings, and the full comparison on real ALL-IDB2 and on a tiny trained run."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline

from blastscan.baselines.classifiers import grouped_folds, make_classifiers, positive_scores, tune
from blastscan.baselines.embeddings import CnnEmbeddings
from blastscan.data.cache import ImageCache
from blastscan.data.manifest import read_manifest, write_manifest
from blastscan.data.scan import scan
from blastscan.data.splits import make_split, read_splits, write_splits
from blastscan.data.synthetic import generate_dataset
from blastscan.errors import ConfigError
from blastscan.training.config import parse_config
from blastscan.workflows.baselines import CNN_MODEL, METRICS, run_baselines
from blastscan.workflows.train import train
from training.conftest import fast_config

CLASSIFIERS = ("svm_rbf", "random_forest", "knn", "logistic_regression")


# ---------------------------------------------------------------------------------------------- tuning


class RecordingClassifier(ClassifierMixin, BaseEstimator):
    """Remembers the row IDs (column 0) of every fit; scores with column 1."""

    fits: ClassVar[list[np.ndarray]] = []

    def __init__(self, c: int = 1) -> None:
        self.c = c

    def fit(self, X: np.ndarray, y: np.ndarray) -> RecordingClassifier:
        RecordingClassifier.fits.append(X[:, 0].astype(int).copy())
        self.classes_ = np.unique(y)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return X[:, 1] * self.c


def test_tune_never_splits_a_group_across_a_fold() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat([f"patient-{i}" for i in range(12)], 5)
    y = np.repeat(np.arange(12) % 2, 5)
    X = np.column_stack([np.arange(len(y)), y + rng.normal(0, 1, len(y))])
    RecordingClassifier.fits.clear()
    fitted = tune(Pipeline([("clf", RecordingClassifier())]), {"clf__c": [1, 2]}, X, y, groups, cv_folds=3)

    assert fitted.named_steps["clf"].c in (1, 2)
    *cv_fits, refit = RecordingClassifier.fits
    assert len(cv_fits) == 2 * 3 and sorted(refit) == list(range(len(y)))
    for rows in cv_fits:
        held_out = np.setdiff1d(np.arange(len(y)), rows)
        assert len(held_out) > 0
        assert not set(groups[rows]) & set(groups[held_out])
    for fit_rows, held_out in grouped_folds(y, groups, 3):
        assert not set(groups[fit_rows]) & set(groups[held_out])
        assert set(y[held_out]) == {0, 1}


def test_tune_without_enough_groups_fits_the_first_grid_point() -> None:
    X = np.random.default_rng(1).normal(size=(20, 3))
    y = np.tile([0, 1], 10)
    pipeline, grid = make_classifiers()["logistic_regression"]
    fitted = tune(pipeline, grid, X, y, np.array(["one"] * 20))
    assert fitted.get_params()["logreg__C"] == grid["logreg__C"][0]
    scores = positive_scores(fitted, X)
    assert scores.shape == (20,) and ((scores >= 0) & (scores <= 1)).all()


def test_svm_scores_are_in_unit_interval_and_ordered_like_its_decision_function() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 4))
    y = (X[:, 0] > 0).astype(int)
    pipeline, _ = make_classifiers()["svm_rbf"]
    fitted = pipeline.fit(X, y)
    scores = positive_scores(fitted, X)
    assert ((scores > 0) & (scores < 1)).all()
    assert (np.argsort(scores, kind="stable") == np.argsort(fitted.decision_function(X), kind="stable")).all()


# ---------------------------------------------------------------------------------------------- embeddings


def test_imagenet_embeddings_have_one_row_per_image() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(4, 50, 70, 3), dtype=np.uint8)
    embeddings = CnnEmbeddings(image_size=64, batch_size=3)
    features = embeddings.fit(images).transform(images)
    assert features.shape == (4, 1280) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert len(embeddings.get_feature_names_out()) == 1280
    with pytest.raises(ConfigError, match="uint8"):
        embeddings.transform(images.astype(np.float32))


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def allidb2_files(allidb2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("allidb2")
    manifest = scan(allidb2_dir).manifest
    return (
        write_manifest(manifest, folder / "manifest.csv"),
        write_splits(make_split(manifest, seed=0), folder / "splits.csv"),
    )


def test_baselines_on_allidb2(allidb2_files: tuple[Path, Path], tmp_path: Path) -> None:
    manifest_path, splits_path = allidb2_files
    messages: list[str] = []
    result = run_baselines(
        manifest_path,
        splits_path,
        tmp_path / "out",
        image_size=64,
        n_boot=50,
        cache_dir=tmp_path / "cache",
        log=messages.append,
    )
    table = result.table
    expected = {(f, c) for f in ("handcrafted", "cnn-imagenet") for c in CLASSIFIERS}
    assert set(zip(table["feature_key"], table["classifier"], strict=True)) == expected
    assert len(table) == len(expected)
    assert np.isfinite(table[list(METRICS)].to_numpy(dtype=float)).all()
    assert (table["n_test"] == (read_splits(splits_path).table["split"] == "test").sum()).all()
    rf = table[(table["feature_key"] == "handcrafted") & (table["classifier"] == "random_forest")].iloc[0]
    assert rf["roc_auc"] > 0.6
    assert rf["roc_auc_ci_low"] <= rf["roc_auc"] <= rf["roc_auc_ci_high"]
    for path in (result.csv, result.markdown, result.bar_chart, result.segmentation):
        assert path.is_file() and path.stat().st_size > 0
    assert pd.read_csv(result.csv).shape[0] == len(table)
    markdown = result.markdown.read_text()
    assert "| model | features | Accuracy | Precision | Recall | F1 | AUROC |" in markdown
    assert "Random forest" in markdown and "handcrafted" in markdown

    # The fitted models are ordinary sklearn pipelines over images.
    images = ImageCache(read_manifest(manifest_path), size=64, cache_dir=tmp_path / "cache")
    images.build()
    predicted = result.models["handcrafted/random_forest"].predict(images.array()[:3])
    assert predicted.shape == (3,) and set(predicted) <= {0, 1}


# ---------------------------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-run")
    generate_dataset(folder / "data", n_patients=8, cells_per_patient=12, size=48, seed=0)
    config = parse_config(fast_config(folder / "data" / "labels.csv", folder / "runs", trainer__max_epochs=1))
    return train(config, progress_bar=False).run_dir


def test_embeddings_of_a_trained_run(tiny_run: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 40, 40, 3), dtype=np.uint8)
    features = CnnEmbeddings(run_dir=tiny_run).transform(images)
    assert features.shape == (5, 32)  # the tiny run's last width
    assert np.isfinite(features).all()


def test_baselines_with_a_trained_run_include_the_cnn(tiny_run: Path, tmp_path: Path) -> None:
    kwargs = dict(
        manifest_path=tiny_run / "manifest.csv",
        splits_path=tiny_run / "splits.csv",
        out_dir=tmp_path / "out",
        cnn_run=tiny_run,
        image_size=48,
        n_boot=50,
        include_hybrid_imagenet=False,
        cache_dir=tmp_path / "cache",
        classifiers=["random_forest", "logistic_regression"],
    )
    result = run_baselines(**kwargs)
    table = result.table
    assert list(table["feature_key"]) == ["handcrafted"] * 2 + ["cnn-run"] * 2 + ["cnn"]
    cnn = table[table["model"] == CNN_MODEL].iloc[0]
    assert cnn["family"] == "CNN (end-to-end)" and 0 <= cnn["roc_auc"] <= 1
    assert (table["n_test_patients"] > 0).all()  # synthetic cells have patients: intervals resample them
    assert result.bar_chart.is_file()

    # Features are cached on disk: a second call reuses them.
    messages: list[str] = []
    run_baselines(**{**kwargs, "classifiers": ["logistic_regression"]}, log=messages.append)
    assert sum("reused" in m for m in messages) == 2


def test_a_run_that_saw_the_test_images_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    splits = read_splits(tiny_run / "splits.csv")
    swapped = splits.table["split"].replace({"train": "test", "test": "train"})
    splits_path = write_splits(type(splits)(splits.table.assign(split=swapped), splits.metadata), tmp_path / "s.csv")
    with pytest.raises(ConfigError, match="training or validation split"):
        run_baselines(tiny_run / "manifest.csv", splits_path, tmp_path / "out", cnn_run=tiny_run)
