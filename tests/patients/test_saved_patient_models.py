"""Saved patient models (safetensors, no pickle) predict exactly as fitted; `--predict` scores new cohorts;
the cross-validation's attention and calibration outputs; the per-patient attention galleries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from blastscan.cli import app
from blastscan.data.manifest import Manifest
from blastscan.data.scan import load_or_scan
from blastscan.errors import ConfigError
from blastscan.patients.attention import AttentionMILModel
from blastscan.patients.bags import patient_bags
from blastscan.patients.crossval import patient_crossval
from blastscan.patients.models import CellShareScore, ClinicalModel, LateFusion, MeanPooledModel
from blastscan.patients.persist import model_from_state, model_state
from blastscan.runs import PatientModelFolder, RunFolder
from blastscan.workflows.patients import (
    check_backbone_never_saw,
    covariate_gains,
    patients_markdown,
    write_galleries,
)
from patient_cohorts import synthetic_manifest


def signal_embeddings(manifest: Manifest, seed: int = 1) -> np.ndarray:
    """4-D cell embeddings where APL patients' cells are shifted on the first axis."""
    embeddings = np.random.default_rng(seed).normal(size=(len(manifest), 4))
    embeddings[manifest.table["diagnosis"].eq("APL").to_numpy(), 0] += 2.0
    return embeddings


@pytest.mark.parametrize(
    "make",
    [
        lambda e: ClinicalModel(),
        lambda e: ClinicalModel(("age",)),
        lambda e: CellShareScore(),
        lambda e: MeanPooledModel(e),
        lambda e: MeanPooledModel(e, clinical=True),
        lambda e: LateFusion(lambda: MeanPooledModel(e)),
        lambda e: AttentionMILModel(e, clinical=True, epochs=3, components=3),
    ],
    ids=["clinical", "age", "share", "mean-pooled", "early-fusion", "late-fusion", "attention-mil"],
)
def test_a_saved_model_predicts_exactly_as_the_fitted_one_on_another_cohort(make, tmp_path: Path) -> None:
    train = synthetic_manifest(seed=0)
    cohort = synthetic_manifest(n_patients=12, seed=5)
    model = make(signal_embeddings(train)).fit(patient_bags(train))
    description, arrays = model_state(model)
    PatientModelFolder(tmp_path).write({"model": description}, arrays)
    read_description, read_arrays = PatientModelFolder(tmp_path).read()
    cohort_embeddings = signal_embeddings(cohort, seed=7)
    loaded = model_from_state(read_description["model"], read_arrays, cohort_embeddings)
    expected = make(cohort_embeddings)
    expected.__dict__.update({k: v for k, v in model.__dict__.items() if k.endswith("_")})  # same fit, new cells
    if isinstance(model, LateFusion):
        for part in model.models_:
            if hasattr(part, "embeddings"):
                part.embeddings = cohort_embeddings
        expected = model
    bags = patient_bags(cohort)
    np.testing.assert_allclose(loaded.predict_proba(bags), expected.predict_proba(bags), rtol=1e-5, atol=1e-6)


def test_a_damaged_or_absent_model_file_is_named_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no patient_model\.safetensors"):
        PatientModelFolder(tmp_path).read()
    (tmp_path / PatientModelFolder.WEIGHTS).write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError, match="damaged or half-written"):
        PatientModelFolder(tmp_path).read()


def test_cohorts_without_diagnoses_or_covariates_can_be_scored() -> None:
    table = synthetic_manifest(n_patients=6).table.drop(columns=["diagnosis", "age", "cell_type"])
    bags = patient_bags(Manifest(table, root=Path("."), format="csv"), labelled=False)
    assert (bags.labels == -1).all() and bags.missing["age"] == 6
    model = ClinicalModel().fit(patient_bags(synthetic_manifest()))
    assert np.isfinite(model.predict_proba(bags)).all()  # age imputed with the training median
    assert CellShareScore().predict_proba(bags).tolist() == [0.0] * 6


def test_crossval_reports_calibration_and_out_of_fold_attention_for_every_patient() -> None:
    bags = patient_bags(synthetic_manifest(n_patients=24, cells=5))
    embeddings = signal_embeddings(bags.manifest)
    models = {"share": CellShareScore, "mil": lambda: AttentionMILModel(embeddings, epochs=3, components=3)}
    result = patient_crossval(bags, models, folds=3, repeats=1, n_boot=20)
    table = result.table.set_index("model")
    assert np.isnan(table.loc["share", "ece"]) and 0 <= table.loc["mil", "brier"] <= 1
    assert set(result.attention) == {"mil"} and set(result.attention["mil"]) == set(bags.patients)
    for i, patient in enumerate(bags.patients):
        weights = result.attention["mil"][patient]
        assert len(weights) == len(bags.cells[i]) and abs(weights.sum() - 1) < 1e-5


def test_an_unknown_final_model_is_refused_naming_the_choices(deepapl_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["patients", "--data", str(deepapl_dir), "--out", str(tmp_path), "--final", "best"]
    )
    assert result.exit_code != 0 and "--final 'best': choose one of" in result.output
    assert "'image, mean-pooled'" in result.output and not (tmp_path / "patients.csv").exists()


def test_what_age_and_sex_add_is_a_paired_auroc_difference_with_a_ci() -> None:
    bags = patient_bags(synthetic_manifest(n_patients=30))
    embeddings = np.random.default_rng(3).normal(size=(len(bags.manifest), 4))  # images carry nothing here
    models = {"image, mean-pooled": lambda: MeanPooledModel(embeddings),
              "fusion: image + clinical (one model)": lambda: MeanPooledModel(embeddings, clinical=True)}  # fmt: skip
    result = patient_crossval(bags, models, folds=3, repeats=1, n_boot=100)
    (gain,) = covariate_gains(result, bags.labels, n_boot=100)
    assert gain["compared_with"] == "image, mean-pooled" and gain["auroc_gain"] > 0.2  # age carries the signal
    assert gain["auroc_gain_ci"][0] <= gain["auroc_gain"] <= gain["auroc_gain_ci"][1]
    assert "What age and sex add" in patients_markdown(result.table, 3, 1, [gain])


def test_galleries_show_each_patients_most_attended_cells(tmp_path: Path) -> None:
    manifest = synthetic_manifest(n_patients=12, cells=2)
    for path in manifest.table["path"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (200, 120, 160)).save(tmp_path / path)
    manifest = Manifest(manifest.table, root=tmp_path, format="csv")
    bags = patient_bags(manifest)
    embeddings = signal_embeddings(manifest)
    models = {"mil": lambda: AttentionMILModel(embeddings, epochs=2, components=2)}
    result = patient_crossval(bags, models, folds=2, repeats=1, n_boot=10)
    out = write_galleries(bags, result, "mil", tmp_path / "galleries", cells=2)
    assert sorted(p.name for p in out.glob("*.png")) == [f"P{i:02d}.png" for i in range(12)]
    index = (out / "index.md").read_text()
    assert index.count("](P") == 12 and "[P00.png](P00.png)" in index


def test_the_real_cohort_command_and_its_saved_model_scoring_with_predict(deepapl_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cv"
    result = runner.invoke(
        app, ["patients", "--data", str(deepapl_dir), "--out", str(out), "--folds", "3", "--repeats", "1",
              "--no-images", "--bootstrap", "20"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "patients.csv")
    assert set(table["model"]) == {"age alone", "clinical (age, sex)", "promyelocyte share"}
    assert (table["patients"] == 82).all() and (table["positive_patients"] == 22).all()
    assert "| promyelocyte share |" in (out / "patients.md").read_text()
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 82 and scores["label"].sum() == 22
    assert patient_bags(load_or_scan(deepapl_dir)).missing == {"age": 0, "female": 0}
    assert (out / "patients.png").is_file() and (out / "calibration.png").is_file()
    assert "model/ (clinical (age, sex))" in result.output
    card = PatientModelFolder(out / "model").read()[0]
    assert card["name"] == "clinical (age, sex)" and card["trained_on"]["patients"] == 82
    scored = tmp_path / "scored"
    result = runner.invoke(
        app, ["patients", "--predict", str(out / "model"), "--data", str(deepapl_dir), "--out", str(scored),
              "--bootstrap", "20"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(scored / "predictions.csv")
    assert len(predictions) == 82 and set(predictions["call"]) <= {"APL", "not APL"}
    assert "AUROC" in result.output and "82 of these patients trained the model" in result.output
    assert json.loads((scored / "metrics.json").read_text())["patients_the_model_trained_on"] == 82


def write_cohort_csv(folder: Path, n_patients: int = 12, cells: int = 2, prefix: str = "P") -> Path:
    """A lab CSV of small real image files with the patient columns (diagnosis, age, gender, cell_type); patient
    IDs start with `prefix`."""
    table = synthetic_manifest(n_patients=n_patients, cells=cells).table
    table["patient_id"] = prefix + table["patient_id"].str[1:]
    rng = np.random.default_rng(0)
    for path, diagnosis in zip(table["path"], table["diagnosis"], strict=True):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        tint = (200, 90, 160) if diagnosis == "APL" else (170, 120, 190)
        pixels = np.clip(np.array(tint) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / path)
    csv = folder / "cohort.csv"
    table.drop(columns=["group_id", "dataset"]).to_csv(csv, index=False)
    return csv


def test_a_trained_run_as_backbone_and_its_saved_model_on_a_new_cohort(stain_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cohort = write_cohort_csv(tmp_path / "discovery", n_patients=24)
    out = tmp_path / "cv"
    result = runner.invoke(
        app, ["patients", "--data", str(cohort), "--out", str(out), "--folds", "2", "--repeats", "1",
              "--bootstrap", "20", "--mil-epochs", "2", "--gallery-cells", "0", "--backbone", str(stain_run)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    card = PatientModelFolder(out / "model").read()[0]
    assert card["backbone"]["weights"] == "run" and card["backbone"]["run"] == str(stain_run.resolve())
    scored = tmp_path / "scored"
    new_cohort = write_cohort_csv(tmp_path / "validation", n_patients=6, prefix="V")
    result = runner.invoke(
        app, ["patients", "--predict", str(out / "model"), "--data", str(new_cohort), "--out", str(scored)]
    )
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(scored / "predictions.csv")) == 6 and "trained the model" not in result.output


def test_a_cohort_too_small_for_the_nested_folds_gets_a_clear_error() -> None:
    bags = patient_bags(synthetic_manifest(n_patients=12, cells=2))
    embeddings = signal_embeddings(bags.manifest)
    with pytest.raises(ConfigError, match="too small for the inner cross-validation"):
        patient_crossval(bags, {"fusion": lambda: LateFusion(lambda: MeanPooledModel(embeddings))}, 2, 1, n_boot=10)


def test_a_backbone_run_that_saw_the_cohorts_cells_is_refused(stain_run: Path, tmp_path: Path) -> None:
    run_manifest = RunFolder(stain_run).manifest()
    table = run_manifest.table.head(12).assign(
        patient_id=[f"P{i % 6}" for i in range(12)], diagnosis=["APL", "AML"] * 6, age=50.0, gender="Male",
        cell_type="Blast",
    )  # fmt: skip
    bags = patient_bags(Manifest(table, root=run_manifest.root, format="csv"))
    with pytest.raises(ConfigError, match="holds 12 of these cells"):
        check_backbone_never_saw(bags, stain_run)
