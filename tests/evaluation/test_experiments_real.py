"""evaluate, crossval, transfer and compare end to end on the real ALL-IDB2 and DeepAPL data (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from blastscan.data.manifest import Manifest, write_manifest
from blastscan.data.scan import scan
from blastscan.runs import RunFolder
from blastscan.training.config import parse_config
from blastscan.workflows.evaluate import evaluate_run
from blastscan.workflows.experiments import compare, comparison_markdown, crossval
from blastscan.workflows.train import train
from blastscan.workflows.transfer import transfer

METRIC_KEYS = (
    "accuracy", "precision", "recall", "specificity", "f1", "f1_weighted", "roc_auc", "pr_auc",
    "sensitivity_at_95_specificity", "confusion_matrix", "threshold", "n_images", "n_patients", "ci",
)  # fmt: skip


def tiny_tree(root: Path | str, runs_dir: Path, name: str = "tiny") -> dict[str, Any]:
    return {
        "name": name,
        "runs_dir": str(runs_dir),
        "data": {"root": str(root), "image_size": 32, "cache_dir": str(runs_dir / "cache")},
        "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [8, 16, 16, 32]}},
        "trainer": {"max_epochs": 2, "batch_size": 32},
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def allidb2_run(allidb2_dir: Path, workdir: Path) -> Path:
    return train(parse_config(tiny_tree(allidb2_dir, workdir)), progress_bar=False).run_dir


@pytest.fixture(scope="module")
def deepapl_subset(deepapl_dir: Path, workdir: Path) -> Path:
    """A manifest of 8 cells from each of 20 DeepAPL patients (a quick external set)."""
    full = scan(deepapl_dir, verify=False).manifest
    table = full.table.groupby("patient_id", group_keys=False).head(8)
    table = table[table["patient_id"].isin(sorted(table["patient_id"].unique())[:20])].reset_index(drop=True)
    return write_manifest(Manifest(table=table, root=full.root, format="deepapl"), workdir / "deepapl_subset.csv")


def test_evaluate_own_test_split(allidb2_run: Path) -> None:
    result = evaluate_run(allidb2_run, tta=True, n_boot=200)
    out = result.out_dir
    assert out == allidb2_run / "eval" / "all-idb2-test"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics, key
    assert metrics["n_patients"] is None  # ALL-IDB has none: images are the bootstrap unit
    assert "sensitivity_at_95_specificity_test_oracle" in metrics
    assert set(metrics["ci"]) >= {"roc_auc", "f1", "sensitivity_at_95_specificity"}
    assert metrics["calibration"]["fitted_on"] == "validation" and metrics["calibration"]["temperature"] > 0
    assert "tta" in metrics and "roc_auc" in metrics["tta"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns[:4]) == ["path", "patient", "label", "probability"]
    splits = pd.read_csv(allidb2_run / "splits.csv", skiprows=1)
    assert len(predictions) == (splits["split"] == "test").sum()
    for name in ("roc.png", "pr.png", "confusion_matrix.png", "reliability.png", "scores.png",
                 "training_curves.png", "confident_errors.png", "gradcam_gallery.png", "localisation.png",
                 "localisation.csv", "report.html"):  # fmt: skip
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "image-level" in html.lower()
    localisation = pd.read_csv(out / "localisation.csv")
    assert set(localisation["method"]) == {"gradcam", "gradcam++", "eigencam"}
    # A share is in [0, 1]; a class whose CAMs were all zero (an undertrained tiny model) has none, and says so.
    defined = localisation["mean"].between(0, 1)
    assert (defined | (localisation["mean"].isna() & (localisation["n"] == 0))).all() and defined.any()


def test_evaluate_external_with_patients(allidb2_run: Path, deepapl_subset: Path) -> None:
    result = evaluate_run(allidb2_run, data=deepapl_subset, n_boot=100)
    assert result.out_dir.name == "deepapl-all"
    metrics = result.metrics
    assert metrics["external"] and metrics["n_images"] == 160 and metrics["n_patients"] == 20
    assert "patient_level" in metrics and len(metrics["patient_level"]["patients"]) == 20


def test_crossval_on_allidb2(allidb2_dir: Path, workdir: Path) -> None:
    config = parse_config(tiny_tree(allidb2_dir, workdir, name="cv") | {"trainer": {"max_epochs": 1}})
    result = crossval(config, folds=3, n_boot=50)
    assert list(result.folds["fold"]) == [0, 1, 2]
    assert set(result.summary["metric"]) >= {"roc_auc", "f1", "accuracy"}
    for name in ("crossval.md", "crossval_folds.csv", "crossval_summary.csv", "crossval_boxplot.png"):
        assert (result.out_dir / name).is_file()
    # Every image is tested exactly once across the folds, and no duplicate cluster straddles a fold split.
    tested = pd.concat(
        pd.read_csv(result.out_dir / f"fold{k}" / "splits.csv", skiprows=1).query("split == 'test'") for k in range(3)
    )
    assert len(tested) == 260 and tested["path"].is_unique
    again = crossval(config, folds=3, n_boot=50)  # finished folds are reused, not retrained
    np.testing.assert_allclose(again.folds["roc_auc"], result.folds["roc_auc"])


def test_transfer_and_compare(allidb2_dir: Path, deepapl_subset: Path, workdir: Path, allidb2_run: Path) -> None:
    config = parse_config(tiny_tree(allidb2_dir, workdir, name="xfer") | {"trainer": {"max_epochs": 1}})
    # One variant, the one that exercises everything (calibrated stain jitter, Reinhard, the mask); the others differ
    # only in config keys, which tests/imaging and tests/training cover.
    result = transfer(
        config, [str(allidb2_dir), str(deepapl_subset)], variants=["mask-reinhard-strong"], n_boot=50,
        explain_images=8,
    )  # fmt: skip
    table, out = result.table, result.out_dir
    assert set(table["variant"]) == {"mask-reinhard-strong"}
    assert set(table["test"]) == {"all-idb2", "deepapl"}
    # 2 own test splits + 2 external pairs, and the 2 leave-one-out rows (one model each side).
    assert len(table) == 6 and table["external"].sum() == 4
    assert set(table["scheme"]) == {"single", "leave-one-out"}
    assert table["roc_auc"].between(0, 1).all() and (table.loc[table["external"], "roc_auc_ci"] != "").all()
    # The calibrated stain jitter was measured across both datasets and used by the strong variant's runs.
    assert 0 < result.spread.sigma <= 0.8 and (out / "stain_spread.md").is_file()
    strong = RunFolder(out / "deepapl-mask-reinhard-strong").config()
    assert strong.augment.stain_jitter == result.spread.sigma and strong.data.cell_focus == "mask"
    assert RunFolder(out / "deepapl-mask-reinhard-strong").model_card()["cell_focus"]["mode"] == "mask"
    models = result.models
    assert len(models) == 2 and models["cell_removed_roc_auc"].between(0, 1).all()
    assert models["cam_in_cell"].dropna().between(0, 1).all()
    markdown = (out / "transfer.md").read_text()
    assert "Leave one dataset out" in markdown and "Grad-CAM energy in cell" in markdown
    for name in (
        "transfer.csv", "models.csv", "transfer_mask-reinhard-strong_roc_auc.png", "transfer_external_roc_auc.png"
    ):  # fmt: skip
        assert (out / name).is_file(), name
    again = transfer(config, [str(allidb2_dir), str(deepapl_subset)], variants=["mask-reinhard-strong"], n_boot=50,
                     audit=False, explain_images=0)  # fmt: skip
    np.testing.assert_allclose(  # finished runs are reused, not retrained
        again.table.sort_values(["scheme", "train", "test"])["roc_auc"],
        table.sort_values(["scheme", "train", "test"])["roc_auc"],
    )

    evaluate_run(allidb2_run, n_boot=50)
    compared = compare([allidb2_run])
    assert {"run", "evaluation", "roc_auc", "roc_auc_ci"} <= set(compared.columns)
    assert "| tiny |" in comparison_markdown(compared)


def test_evaluate_cli(allidb2_run: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blastscan", "evaluate", str(allidb2_run), "--bootstrap", "50"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "roc_auc" in result.stdout and "chosen on validation" in result.stdout


def test_explain_and_audit_shortcuts_cli(allidb2_run: Path, allidb2_dir: Path, tmp_path: Path) -> None:
    image = allidb2_dir / "img" / "Im001_1.tif"
    explained = subprocess.run(
        [sys.executable, "-m", "blastscan", "explain", str(allidb2_run), str(image), "--method", "gradcam++",
         "--feature-maps", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert explained.returncode == 0, explained.stderr[-2000:]
    assert "p(leukemic)" in explained.stdout
    for name in ("Im001_1_original.png", "Im001_1_gradcampp.png", "Im001_1_feature_maps.png", "explanations.csv"):
        assert (tmp_path / "x" / name).is_file(), name
    audited = subprocess.run(
        [sys.executable, "-m", "blastscan", "audit-shortcuts", str(allidb2_run), "--bootstrap", "50",
         "--out", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert audited.returncode == 0, audited.stderr[-2000:]
    assert "cell removed" in audited.stdout and (tmp_path / "s" / "shortcuts.json").is_file()
