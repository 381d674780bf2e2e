"""`blastscan predict` on the real datasets: folders, lab CSVs, manifests, globs, corrupt files, and the threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from blastscan.cli import app
from blastscan.errors import DatasetError
from blastscan.inference import calibrated_threshold
from blastscan.runs import RunFolder
from blastscan.workflows.evaluate import evaluate_run
from blastscan.workflows.predict import iter_sources, predict, read_predictions

runner = CliRunner()


def _deepapl_cells(deepapl_dir: Path, n: int) -> list[Path]:
    return sorted((deepapl_dir / "Data").rglob("*.jpg"))[:n]


def test_predict_a_folder_writes_path_probability_call_with_the_run_and_threshold(
    stain_run: Path, allidb2_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "predictions.csv"
    result = predict(stain_run, [allidb2_dir / "img"], out, device="cpu")
    header, table = read_predictions(out)
    assert list(table.columns) == ["path", "probability", "call", "ood_score", "out_of_distribution"]
    assert len(table) == result.scored == 260 and not result.failures
    assert header["run"] == str(stain_run.resolve()) and header["tta"] is False
    threshold = header["threshold"]
    assert ((table["probability"] >= threshold) == (table["call"] == 1)).all()
    assert result.positive == int(table["call"].sum())
    points = RunFolder(stain_run).operating_points()["plain"]
    # The stored threshold is on raw probabilities; the CSV's are temperature-scaled, and so is its threshold.
    assert calibrated_threshold(points["threshold"], points["temperature"]) == pytest.approx(threshold)
    assert header["temperature"] == points["temperature"] and "validation" in points["chosen_on"]


def test_the_threshold_is_the_one_evaluate_chose_on_validation(stain_run: Path) -> None:
    metrics = evaluate_run(stain_run, n_boot=20, explain=False, device="cpu").metrics
    assert RunFolder(stain_run).operating_points()["plain"]["threshold"] == pytest.approx(metrics["threshold"])


def test_a_lab_csv_a_manifest_and_a_glob_in_one_call(
    stain_run: Path, deepapl_dir: Path, allidb2_dir: Path, tmp_path: Path
) -> None:
    cells = _deepapl_cells(deepapl_dir, 6)
    lab = tmp_path / "lab.csv"
    pd.DataFrame({"path": [str(p) for p in cells], "label": "unknown"}).to_csv(lab, index=False)
    manifest = stain_run / RunFolder.MANIFEST
    glob = str(allidb2_dir / "img" / "Im00[1-3]_1.tif")
    sources = list(iter_sources([lab, manifest, glob]))
    assert len(sources) == 6 + 260 + 3
    out = tmp_path / "mixed.csv"
    assert predict(stain_run, [lab, manifest, glob], out, device="cpu").scored == len(sources)
    assert read_predictions(out)[1]["path"].tolist() == sources


def test_corrupt_files_are_skipped_listed_and_kept_out_of_the_predictions(
    stain_run: Path, allidb2_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((allidb2_dir / "img").glob("*.tif"))[:5]
    for path in good:
        (folder / path.name).symlink_to(path)
    (folder / "truncated.tif").write_bytes(good[0].read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    cli = runner.invoke(
        app, ["predict", str(stain_run), str(folder), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]
    )
    assert cli.exit_code == 0, cli.output
    said = " ".join(cli.output.split())
    assert "2 unreadable image(s) skipped" in said and "truncated.tif" in said
    assert len(read_predictions(tmp_path / "p.csv")[1]) == 5
    skipped = pd.read_csv(tmp_path / "p.skipped.csv")
    assert sorted(Path(p).name for p in skipped["path"]) == ["empty.png", "truncated.tif"]


def test_exit_2_when_nothing_can_be_read_or_the_input_does_not_exist(stain_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("no image")
    cli = runner.invoke(app, ["predict", str(stain_run), str(bad), "--out", str(tmp_path / "none.csv")])
    assert cli.exit_code == 2 and "none of the 1 images could be read" in " ".join(cli.output.split())
    assert not (tmp_path / "none.csv").exists() and not (tmp_path / "none.csv.part").exists()
    cli = runner.invoke(app, ["predict", str(stain_run), str(tmp_path / "nowhere")])
    assert cli.exit_code == 2 and "no such file, folder or pattern" in " ".join(cli.output.split())
    with pytest.raises(DatasetError, match="`path` column"):
        list(iter_sources([_csv(tmp_path / "wrong.csv", {"file": ["x.png"]})]))
    cli = runner.invoke(app, ["predict", str(tmp_path), str(bad)])
    assert cli.exit_code == 2 and "not a finished run folder" in " ".join(cli.output.split())


def test_predict_with_tta_records_its_own_threshold(stain_run: Path, allidb2_dir: Path, tmp_path: Path) -> None:
    images = sorted((allidb2_dir / "img").glob("*.tif"))[:4]
    out = tmp_path / "tta.csv"
    cli = runner.invoke(app, ["predict", str(stain_run), *map(str, images), "--tta", "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    header, table = read_predictions(out)
    assert header["tta"] is True and len(table) == 4
    tta = json.loads((stain_run / RunFolder.OPERATING_POINTS).read_text())["tta"]
    assert calibrated_threshold(tta["threshold"], tta["temperature"]) == pytest.approx(header["threshold"])


def _csv(path: Path, columns: dict) -> Path:
    pd.DataFrame(columns).to_csv(path, index=False)
    return path
