"""Splits never leak; the audit finds the real duplicates and catches a leaking split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from blastscan.data.audit import audit
from blastscan.data.duplicates import DuplicatePair, duplicate_groups
from blastscan.data.scan import scan
from blastscan.data.splits import SplitResult, make_split, read_splits, write_splits
from blastscan.errors import SplitError
from data.helpers import write_image

# Found by the audit on ALL-IDB2 and checked by eye: the same cell, re-cropped or re-lit.
ALLIDB2_KNOWN_DUPLICATES = {
    ("Im223_0.tif", "Im257_0.tif", "exact"),
    ("Im028_1.tif", "Im031_1.tif", "near"),
    ("Im138_0.tif", "Im146_0.tif", "near"),
    ("Im222_0.tif", "Im256_0.tif", "near"),
    ("Im134_0.tif", "Im245_0.tif", "near"),
}


@pytest.fixture(scope="module")
def allidb2(allidb2_dir: Path):
    return scan(allidb2_dir, verify=False).manifest


@pytest.fixture(scope="module")
def deepapl(deepapl_dir: Path):
    return scan(deepapl_dir, verify=False).manifest


def test_duplicate_groups_are_connected_components() -> None:
    pairs = [DuplicatePair(0, 2, "near", 4), DuplicatePair(2, 5, "exact", 0), DuplicatePair(3, 4, "near", 8)]
    groups = duplicate_groups(6, pairs)
    assert groups[0] == groups[2] == groups[5]
    assert groups[3] == groups[4] != groups[0]
    assert len(set(groups)) == 3


def test_allidb2_audit_finds_the_known_duplicates(allidb2) -> None:
    report = audit(allidb2)
    found = {(d.first, d.second, d.kind) for d in report.duplicates}
    assert found >= ALLIDB2_KNOWN_DUPLICATES
    assert not report.unreadable
    assert report.image_sizes["257x257"] == 250


def test_allidb1_audit_finds_the_overlapping_fields(allidb1_dir: Path) -> None:
    report = audit(scan(allidb1_dir, verify=False).manifest)
    assert report.overlap_checked
    overlaps = {(d.first, d.second) for d in report.duplicates if d.kind == "overlap"}
    # Im095_0 is a zoomed view of Im096_0's centre; Im014_1 and Im015_1 share part of one scene.
    assert {("Im095_0.jpg", "Im096_0.jpg"), ("Im014_1.jpg", "Im015_1.jpg")} <= overlaps


def test_allidb2_split_keeps_duplicates_together_and_is_repeatable(allidb2) -> None:
    result = make_split(allidb2, seed=3)
    assert result.level == "image" and result.warnings and "image-level" in result.warnings[0]
    side = dict(zip(result.table["path"], result.table["split"], strict=True))
    for first, second, _ in ALLIDB2_KNOWN_DUPLICATES:
        assert side[first] == side[second]
    fractions = result.table["split"].value_counts(normalize=True)
    assert fractions["train"] == pytest.approx(0.7, abs=0.04)
    assert fractions["val"] == pytest.approx(0.15, abs=0.04)
    assert fractions["test"] == pytest.approx(0.15, abs=0.04)
    again = make_split(allidb2, seed=3)
    assert list(again.table["split"]) == list(result.table["split"])
    other = make_split(allidb2, seed=4)
    assert list(other.table["split"]) != list(result.table["split"])
    assert not audit(allidb2, result).leaks


def test_a_random_image_split_of_allidb2_leaks(allidb2) -> None:
    # An ungrouped split: with a seed that separates Im223_0 from its exact copy Im257_0.
    paths = list(allidb2.table["path"])
    for seed in range(50):
        train, test = train_test_split(paths, test_size=0.3, random_state=seed)
        if ("Im223_0.tif" in train) != ("Im257_0.tif" in train):
            break
    test_set = set(test)
    leaky = SplitResult(
        table=pd.DataFrame({"path": paths, "split": ["test" if p in test_set else "train" for p in paths]}),
        metadata={"level": "image"},
    )
    report = audit(allidb2, leaky)
    assert report.leaks
    assert ("Im223_0.tif", "Im257_0.tif") in {(d.first, d.second) for d in report.duplicate_leaks}


def test_deepapl_split_is_patient_level(deepapl) -> None:
    result = make_split(deepapl)
    assert result.level == "patient" and not result.warnings
    per_patient = result.table.groupby("group")["split"].nunique()
    assert (per_patient == 1).all()
    patients = result.table.groupby("split")["group"].nunique()
    assert patients.sum() == 82 and patients["test"] >= 8 and patients["val"] >= 8
    assert not audit(deepapl, result).patient_leaks


def test_deepapl_folds(deepapl) -> None:
    result = make_split(deepapl, folds=5)
    assert sorted(set(result.table["split"])) == ["0", "1", "2", "3", "4"]
    assert (result.table.groupby("group")["split"].nunique() == 1).all()


def test_a_cell_level_split_of_deepapl_leaks_patients(deepapl) -> None:
    rng = np.random.default_rng(0)
    split = np.where(rng.random(len(deepapl)) < 0.8, "train", "test")
    leaky = SplitResult(table=pd.DataFrame({"path": deepapl.table["path"], "split": split}), metadata={})
    report = audit(deepapl, leaky, check_overlap=False)
    assert report.leaks and len(report.patient_leaks) == 82


def test_split_file_round_trip_and_mismatch(allidb2, tmp_path: Path) -> None:
    result = make_split(allidb2)
    out = write_splits(result, tmp_path / "splits.csv")
    back = read_splits(out, allidb2)
    assert list(back.table["split"]) == list(result.table["split"])
    assert back.metadata["seed"] == 0 and back.metadata["level"] == "image"
    assert back.metadata["manifest_sha256"] == result.metadata["manifest_sha256"]
    truncated = tmp_path / "short.csv"
    truncated.write_text("\n".join(out.read_text().splitlines()[:-5]) + "\n")
    with pytest.raises(SplitError, match="does not match the manifest"):
        read_splits(truncated, allidb2)


def test_bad_fractions_and_one_class(tmp_path: Path) -> None:
    for k in range(4):
        write_image(tmp_path / "all" / f"{k}.png", seed=k)
        write_image(tmp_path / "hem" / f"{k}.png", seed=10 + k)
    manifest = scan(tmp_path).manifest
    with pytest.raises(SplitError, match="sum to 1"):
        make_split(manifest, train=0.8, val=0.15, test=0.15)
    with pytest.raises(SplitError, match="cannot make"):
        make_split(manifest, train=0.9, val=0.05, test=0.05)
    manifest.table["label"] = "leukemic"
    assert any("cannot be stratified" in w for w in make_split(manifest).warnings)


def test_bccd_split_and_audit(bccd_dir: Path) -> None:
    manifest = scan(bccd_dir, verify=False).manifest
    result = make_split(manifest)
    assert set(result.table["split"]) == {"train", "val", "test"}
    assert any("cannot be stratified" in w for w in result.warnings)
    report = audit(manifest, result)
    assert not report.unreadable and not report.leaks
    assert report.image_sizes.get("640x480", 0) >= 360
