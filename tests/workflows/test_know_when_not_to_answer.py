"""Out-of-distribution flags, abstention and site calibration on real cells: the tiny ALL-IDB2 run (`stain_run`),
other labs' cells (DeepAPL), synthetic cells and photographs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blastscan.cli import app
from blastscan.inference import Predictor
from blastscan.runs import RunFolder
from blastscan.workflows.calibrate import calibrate_site, draw_sample, held_out_rows
from blastscan.workflows.evaluate_ood import evaluate_ood, photograph_crops
from blastscan.workflows.loaded_model import load_model
from blastscan.workflows.predict import read_predictions


@pytest.fixture(scope="module")
def deepapl_cells(deepapl_dir: Path) -> list[Path]:
    """A few DeepAPL cells: another lab, another stain, another magnification than ALL-IDB2."""
    return sorted(deepapl_dir.rglob("*.jpg"))[:24]


def test_training_stores_a_profile_and_every_backend_scores_it_alike(
    stain_run: Path, allidb2_dir: Path, deepapl_cells: list[Path]
) -> None:
    run = RunFolder(stain_run)
    assert run.ood_profile_path.is_file()
    images = [str(p) for p in sorted((allidb2_dir / "img").glob("*.tif"))[:16]] + [str(p) for p in deepapl_cells]
    scores = {}
    for backend in ("torch", "onnx"):
        model = load_model(stain_run, device="cpu", backend=backend)
        batches = list(model.predictor.stream(images))
        scores[backend] = np.concatenate([b.ood_score for b in batches])
        assert np.isfinite(scores[backend]).all()
    np.testing.assert_allclose(scores["onnx"], scores["torch"], rtol=1e-3, atol=1e-3)


def test_predict_reports_the_flag_and_abstains_in_the_band_the_user_sets(
    stain_run: Path, allidb2_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        app, ["predict", str(stain_run), str(allidb2_dir / "img"), "--out", str(out), "--review-band", "0.2"]
    )
    assert result.exit_code == 0, result.output
    header, table = read_predictions(out)
    assert {"ood_score", "out_of_distribution"} <= set(table.columns)
    assert header["out_of_distribution"]["method"] == "mahalanobis" and header["review_band"] == 0.2
    p, t = table["probability"].to_numpy(), header["threshold"]
    calls = table["call"].astype(str).to_numpy()
    assert np.array_equal(calls == "review", np.abs(p - t) < 0.2)
    decided = calls != "review"
    assert np.array_equal(calls[decided] == "1", p[decided] >= t)
    # Temperature-scaled probabilities, the threshold moved with them: the same calls as the raw scores make.
    raw = Predictor.from_run(stain_run, device="cpu").predict(table["path"].tolist())
    points = RunFolder(stain_run).operating_points()["plain"]
    assert header["temperature"] == pytest.approx(points["temperature"])
    assert np.array_equal(raw >= points["threshold"], p >= t)
    bad = CliRunner().invoke(app, ["predict", str(stain_run), str(allidb2_dir), "--review-band", "0.7"])
    assert bad.exit_code == 2 and "--review-band 0.7" in bad.output


def test_review_ood_sends_photographs_to_a_person(stain_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, crop in enumerate(photograph_crops(12)):
        Image.fromarray(crop).save(folder / f"photo{i:02d}.png")
    out = tmp_path / "photos.csv"
    result = CliRunner().invoke(app, ["predict", str(stain_run), str(folder), "--out", str(out), "--review-ood"])
    assert result.exit_code == 0, result.output
    _, table = read_predictions(out)
    flagged = table["out_of_distribution"].astype(bool)
    assert flagged.mean() >= 0.5, table  # most photographs look nothing like a stained cell
    assert (table.loc[flagged, "call"].astype(str) == "review").all()
    assert "look unlike the training cells" in result.output


def test_evaluate_ood_measures_every_method_against_other_sets(stain_run: Path, deepapl_dir: Path) -> None:
    result = evaluate_ood(stain_run, out_data=[deepapl_dir], synthetic=6, photographs=18, max_images=30, n_boot=30)
    report = json.loads((result.out_dir / "ood.json").read_text())
    sets = report["detection"]
    assert set(sets) == {"all-idb2 test", "deepapl", "synthetic cells", "non-cell photographs"}
    for name, row in sets.items():
        if name != "all-idb2 test":
            assert set(row["auroc"]) == {"mahalanobis", "mahalanobis-last", "energy", "msp"}
            low, high = row["auroc"]["mahalanobis"]["ci95"]
            assert low <= row["auroc"]["mahalanobis"]["auroc"] <= high
    # Photographs and another lab's cells are told apart from this lab's, even by this one-epoch 48-px network
    # that sees Reinhard-normalised cells (measured 0.85 for DeepAPL; the README's trained models reach 1.000).
    assert sets["non-cell photographs"]["auroc"]["mahalanobis"]["auroc"] > 0.95
    assert sets["deepapl"]["auroc"]["mahalanobis"]["auroc"] > 0.75
    curve = report["selective"]["all-idb2 test"]["certainty"]["curve"]
    assert [r["coverage"] for r in curve][:3] == [1.0, 0.95, 0.9]
    assert (result.out_dir / "ood.md").read_text().count("|") > 20
    assert all(path.is_file() for path in result.figures.values())


def deepapl_cells_all(deepapl_dir: Path) -> list[Path]:
    return list(deepapl_dir.rglob("*.jpg"))


def test_a_site_profile_is_fitted_on_its_sample_judged_on_the_rest_and_used_by_predict(
    stain_run: Path, deepapl_dir: Path, deepapl_cells: list[Path], tmp_path: Path
) -> None:
    load_model(stain_run, device="cpu")  # the run's own points exist whatever test ran first
    before = RunFolder(stain_run).operating_points()
    calibration = calibrate_site(
        stain_run, deepapl_dir, "lab-b", sample_size=30, repeats=3, n_boot=50, method="empirical"
    )
    assert RunFolder(stain_run).operating_points() == before  # the run's own points stay
    profile = RunFolder(stain_run).site_profile("lab-b")
    assert profile["sample"]["n_images"] == 30 and profile["method"] == "empirical"
    report = calibration.report
    held = report["held_out"]
    # Held out: no cell of the sample, nor of a patient with a cell in it (DeepAPL records patients).
    assert 0 < held["n_images"] < len(deepapl_cells_all(deepapl_dir)) - 30 and held["repeats"]["n"] == 3
    assert 0.0 <= held["site_threshold"]["specificity"] <= 1.0
    assert report["operating_point"]["site_threshold"] == pytest.approx(profile["threshold"])
    assert "after: site threshold" in calibration.markdown_path.read_text()
    out = tmp_path / "site.csv"
    cells = [str(p) for p in deepapl_cells]
    result = CliRunner().invoke(app, ["predict", str(stain_run), *cells, "--out", str(out), "--site", "lab-b"])
    assert result.exit_code == 0, result.output
    header, _ = read_predictions(out)
    assert header["site"] == "lab-b" and header["temperature"] == pytest.approx(profile["temperature"])
    unknown = CliRunner().invoke(app, ["predict", str(stain_run), cells[0], "--site", "nowhere"])
    assert unknown.exit_code == 2 and "no site profile 'nowhere'" in unknown.output and "lab-b" in unknown.output


def test_held_out_rows_leave_out_the_sampled_patients() -> None:
    y = np.array([0, 1] * 20)
    patients = np.repeat(np.arange(10), 4)
    sample = draw_sample(y, 10, seed=0)
    held = held_out_rows(len(y), sample, patients)
    assert not set(held) & set(sample)
    assert not set(patients[held]) & set(patients[sample])
    assert np.count_nonzero(y[sample] == 0) >= 5 and np.count_nonzero(y[sample] == 1) >= 5
