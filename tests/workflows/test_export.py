"""`blastscan export`: the files, the input contract, the measured parity, and models that load without the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blastscan.inference import Predictor
from blastscan.inference.onnx_export import INT8_RECIPES
from blastscan.runs import ExportFolder, RunFolder
from blastscan.workflows import export as export_module
from blastscan.workflows.loaded_model import load_model


def test_export_writes_the_models_the_contract_and_the_card(stain_export: Path, stain_run: Path) -> None:
    folder = ExportFolder.open(stain_export)
    for path in (folder.model_path, folder.int8_path, folder.model_card_path, folder.parity_path):
        assert path.is_file() and path.stat().st_size > 0
    pre = folder.preprocessing()
    run = RunFolder(stain_run)
    card = run.model_card()
    assert pre["input"]["size"] == card["image_size"] == 48
    assert pre["input"]["mean"] == card["mean"] and pre["input"]["std"] == card["std"]
    assert pre["input"]["layout"] == "NCHW" and pre["input"]["channel_order"] == "RGB"
    assert pre["stain_normalisation"] == run.stain_state()  # Reinhard parameters travel with the model
    assert pre["output"]["classes"] == card["classes"]
    assert pre["threshold"] == pytest.approx(run.operating_points()["plain"]["threshold"])
    assert "validation" in pre["threshold_chosen_on"]
    assert pre["model"]["weights_sha256"] == run.weights_sha256()
    assert pre["files"]["model.int8.onnx"]["bytes"] == folder.int8_path.stat().st_size
    assert 0.15 <= pre["framing"]["cell_fraction"] <= 0.95
    assert "Research use only" in pre["disclaimer"]
    text = folder.model_card_path.read_text()
    assert "Research use only" in text and "Input contract" in text and "onnx_int8" in text
    assert not list(folder.path.glob(".*"))  # no candidate or temporary file left behind


def test_parity_is_measured_on_the_test_split(stain_export: Path, stain_run: Path) -> None:
    parity = json.loads(ExportFolder(stain_export).parity_path.read_text())
    run = RunFolder(stain_run)
    assert parity["test_images"] == len(run.rows("test"))
    assert set(parity["models"]) == {"torch", "onnx_fp32", "onnx_int8"}
    fp32 = parity["checks"]["fp32_logits"]
    assert fp32["passed"] and fp32["max_relative_logit_difference"] <= 1e-4
    assert parity["models"]["onnx_fp32"]["auroc"] == pytest.approx(parity["models"]["torch"]["auroc"], abs=1e-6)
    int8 = parity["checks"]["int8_auroc"]
    assert int8["recipe"] in INT8_RECIPES
    assert set(parity["int8_recipes_on_validation"]) == set(INT8_RECIPES)
    low, high = int8["auroc_difference_ci95"]
    assert low <= int8["auroc_difference"] <= high
    assert int8["auroc_difference"] == pytest.approx(
        parity["models"]["onnx_int8"]["auroc"] - parity["models"]["onnx_fp32"]["auroc"], abs=1e-9
    )


def test_int8_is_calibrated_on_training_images_only(
    stain_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[np.ndarray] = []
    real = export_module._calibration_batches

    def spy(array, rows, spec, n, seed):
        seen.append(np.asarray(rows))
        return real(array, rows, spec, n, seed)

    monkeypatch.setattr(export_module, "_calibration_batches", spy)
    monkeypatch.setattr(export_module, "INT8_RECIPES", ("minmax",))
    export_module.export_run(stain_run, tmp_path / "e", int8=True, calibration=16, parity_images=8)
    run = RunFolder(stain_run)
    assert seen and all(np.array_equal(rows, run.rows("train")) for rows in seen)


def test_an_export_folder_scores_like_the_run_it_came_from(stain_export: Path, stain_run: Path) -> None:
    run = RunFolder(stain_run)
    manifest = run.manifest()
    paths = manifest.absolute_paths()
    images = [paths[i] for i in run.rows("test", manifest)[:16]]
    from_run = Predictor.from_run(stain_run, device="cpu", backend="torch").predict(images)
    exported = load_model(stain_export)
    assert exported.source == "export" and exported.predictor.backend == "onnx"
    np.testing.assert_allclose(exported.predictor.predict(images), from_run, atol=1e-5)
    assert exported.threshold == pytest.approx(run.operating_points()["plain"]["threshold"])
    assert "INT8" in load_model(stain_export, int8=True).points["chosen_on"]
    int8 = load_model(stain_export / "model.int8.onnx")
    assert int8.card["model_file"] == "model.int8.onnx"
    assert np.abs(int8.predictor.predict(images) - from_run).max() < 0.2  # quantised: close, not equal
    assert load_model(stain_export, int8=True).card["model_file"] == "model.int8.onnx"


def test_the_command_prints_the_parity_table_and_exits_0(stain_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from blastscan.cli import app

    out = tmp_path / "cli-export"
    done = CliRunner().invoke(
        app, ["export", str(stain_run), "--format", "onnx", "--out", str(out), "--parity-images", "8"]
    )
    assert done.exit_code == 0, done.output
    said = " ".join(done.output.split())
    assert "onnx_fp32" in said and "fp32_logits" in said and "passed" in said and "FAILED" not in said
    assert (out / "model.onnx").is_file() and not (out / "model.int8.onnx").exists()
    assert json.loads((out / "parity.json").read_text())["test_images"] == 8
    refused = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--out", str(out)])
    assert refused.exit_code == 2 and "no such run folder" in " ".join(refused.output.split())
