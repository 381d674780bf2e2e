"""evaluate-fields on real ALL-IDB1 and BCCD subsets (copied into tmp_path in their own layouts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blastscan.errors import ConfigError, DatasetError
from blastscan.workflows.evaluate_fields import evaluate_fields

# Im014_1 and Im032_1 are the two ALL-IDB1 fields no ALL-IDB2 crop was cut from; the others gave crops.
FIELDS = ("Im006_1", "Im009_1", "Im014_1", "Im032_1", "Im095_0", "Im066_0")


def _all_idb1_subset(source: Path, target: Path) -> Path:
    """A small ALL-IDB1 in its own layout (im/, xyc/, xyc_other/) under tmp_path; the repository gets nothing."""
    for folder in ("im", "xyc", "xyc_other"):
        (target / folder).mkdir(parents=True)
    for name in FIELDS:
        shutil.copy(source / "im" / f"{name}.jpg", target / "im")
        for folder in ("xyc", "xyc_other"):
            if (source / folder / f"{name}.xyc").is_file():
                shutil.copy(source / folder / f"{name}.xyc", target / folder)
    return target


def test_detection_on_all_idb1_fields(allidb1_dir: Path, tmp_path: Path) -> None:
    data = _all_idb1_subset(allidb1_dir, tmp_path / "ALL_IDB1")
    result = evaluate_fields(data, tmp_path / "out")
    metrics = result.metrics
    assert metrics["dataset"] == "all-idb1" and metrics["fields"] == len(FIELDS)
    detection = metrics["detection"]
    assert detection["recall"] >= 0.8 and detection["precision"] >= 0.6
    # The platelet marks of xyc_other are set apart (Im066_0 and Im095_0 are healthy fields with platelet marks).
    assert metrics["marks"]["platelet"] > 0
    assert metrics["detection_against_all_marks"]["recall"] < detection["recall"]
    assert result.files["fields"].read_text().count("\n") == len(FIELDS) + 1
    assert (tmp_path / "out" / "review" / "platelet_marks.png").is_file()


def test_a_run_trained_on_crops_of_these_fields_is_refused(allidb1_dir: Path, stain_run: Path, tmp_path: Path) -> None:
    """The ALL-IDB2 run saw crops cut from some of these fields: refused, or evaluated on the others only."""
    data = _all_idb1_subset(allidb1_dir, tmp_path / "ALL_IDB1")
    with pytest.raises(ConfigError, match="seen in training") as refused:
        evaluate_fields(data, tmp_path / "out", [stain_run], device="cpu")
    assert "leave_out_fields" in str(refused.value)
    result = evaluate_fields(data, tmp_path / "out", [stain_run], device="cpu", only_unseen=True, n_boot=50)
    seen = result.metrics["fields_left_out_as_seen_in_training"]
    assert seen and "Im014_1.jpg" not in seen and "Im032_1.jpg" not in seen
    assert result.metrics["fields"] == len(FIELDS) - len(seen) >= 2
    assert "blast_finding" in result.metrics and "smear_level" in result.metrics


def _bccd_subset(source: Path, target: Path, count: int = 6) -> Path:
    """The first `count` images of BCCD's official test list, in BCCD's layout under tmp_path."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (target / folder).mkdir(parents=True)
    names = [line.strip() for line in (source / "ImageSets/Main/test.txt").read_text().splitlines() if line.strip()]
    chosen = names[:count]
    for name in chosen:
        shutil.copy(source / "JPEGImages" / f"{name}.jpg", target / "JPEGImages")
        shutil.copy(source / "Annotations" / f"{name}.xml", target / "Annotations")
    (target / "ImageSets/Main/test.txt").write_text("\n".join(chosen) + "\n")
    return target


def test_bccd_average_precision_on_its_test_list(bccd_dir: Path, tmp_path: Path) -> None:
    data = _bccd_subset(bccd_dir, tmp_path / "BCCD")
    result = evaluate_fields(data, tmp_path / "out", n_boot=50)
    ap = result.metrics["detection_ap50"]
    assert ap["truth"] >= 6 and 0.0 <= ap["ap"] <= 1.0
    assert ap["recall"] >= 0.5
    assert ap["ap_ci"][0] <= ap["ap"] <= ap["ap_ci"][1]
    with pytest.raises(ConfigError, match="no leukemia labels"):
        evaluate_fields(data, tmp_path / "out2", ["some-run"])


def test_cli_prints_the_headline_figures(bccd_dir: Path, tmp_path: Path) -> None:
    data = _bccd_subset(bccd_dir, tmp_path / "BCCD", count=3)
    done = subprocess.run(
        [sys.executable, "-m", "blastscan", "evaluate-fields", str(data), "--out", str(tmp_path / "out"),
         "--bootstrap", "20"],
        capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "WBC detection AP@0.5" in done.stdout and "field_metrics.json" in done.stdout


def test_other_data_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "cells").mkdir()
    Image.new("RGB", (64, 64), (200, 100, 150)).save(tmp_path / "cells" / "a.png")
    with pytest.raises(DatasetError):
        evaluate_fields(tmp_path / "cells", tmp_path / "out")
