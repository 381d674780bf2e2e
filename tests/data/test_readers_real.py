"""Every reader on the real datasets in $BLASTSCAN_DATA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blastscan.data.manifest import read_manifest, write_manifest
from blastscan.data.scan import scan
from blastscan.errors import DatasetError


def test_allidb2_scan(allidb2_dir: Path) -> None:
    result = scan(allidb2_dir)
    assert result.reader == "all-idb2" and result.auto_detected
    manifest = result.manifest
    assert len(manifest) == 260
    assert manifest.class_counts() == {"leukemic": 130, "normal": 130}
    assert not manifest.has_patients
    assert set(manifest.table["mode"]) == {"RGB"}
    row = manifest.table.set_index("path").loc["Im001_1.tif"]
    assert row["label"] == "leukemic" and row["source_label"] == "1"


def test_allidb1_scan_reads_centroids(allidb1_dir: Path) -> None:
    result = scan(allidb1_dir)
    assert result.reader == "all-idb1"
    table = result.manifest.table.set_index("path")
    assert len(table) == 55
    assert result.manifest.class_counts() == {"leukemic": 25, "normal": 30}
    centroids = json.loads(table.loc["Im001_1.jpg", "blast_centroids"])
    assert centroids[0] == [886, 726]
    healthy = table[table["label"] == "normal"]["blast_centroids"]
    assert all(json.loads(c) == [] for c in healthy)
    sizes = [(int(w), int(h)) for w, h in zip(table["width"], table["height"], strict=True)]
    assert sum(s in {(2592, 1944), (1712, 1368)} for s in sizes) >= 50  # the README's two sizes, and a few odd ones


def test_deepapl_scan_patient_level(deepapl_dir: Path) -> None:
    result = scan(deepapl_dir)
    assert result.reader == "deepapl"
    table = result.manifest.table
    assert result.manifest.has_patients
    assert table["patient_id"].nunique() == 82
    assert set(table["label"]) == {"leukemic", "normal"}
    assert set(table.loc[table["label"] == "leukemic", "cell_type"]) == {"Blast, no lineage spec", "Promyelocyte"}
    assert set(table["diagnosis"]) == {"AML", "APL"}
    # Patients with an extra slide folder are read through it.
    assert (table["slide"].fillna("") != "").any()
    assert any("left out" in note for note in result.notes)


def test_deepapl_custom_mapping_keeps_more_cells(deepapl_dir: Path) -> None:
    from blastscan.data.readers.deepapl import DEFAULT_CELL_TYPE_LABELS
    from blastscan.data.registry import ReaderOptions

    mapping = {**DEFAULT_CELL_TYPE_LABELS, "Promonocyte": "leukemic"}
    default = scan(deepapl_dir, verify=False).manifest
    custom = scan(deepapl_dir, verify=False, options=ReaderOptions(cell_type_labels=mapping)).manifest
    assert len(custom) == len(default) + 65


def test_bccd_scan(bccd_dir: Path) -> None:
    result = scan(bccd_dir)
    assert result.reader == "bccd"
    table = result.manifest.table
    assert len(table) == 364
    assert set(table["official_split"].dropna()) == {"train", "val", "test"}
    boxes = json.loads(table.iloc[0]["boxes"])
    assert any(b["name"] == "WBC" for b in boxes)


def test_allidb_parent_folder_is_ambiguous(real_data: Path) -> None:
    with pytest.raises(DatasetError, match="more than one dataset"):
        scan(real_data / "ALL_IDB")


def test_forced_wrong_format_is_refused(allidb2_dir: Path) -> None:
    with pytest.raises(DatasetError, match="does not look like the deepapl layout"):
        scan(allidb2_dir, format="deepapl")


def test_manifest_survives_a_moved_dataset(allidb2_dir: Path, tmp_path: Path) -> None:
    manifest = scan(allidb2_dir, verify=False).manifest
    out = write_manifest(manifest, tmp_path / "m.csv")
    again = read_manifest(out)
    assert again.root == manifest.root
    assert list(again.table["path"]) == list(manifest.table["path"])
    assert again.absolute_paths()[0].is_file()
    # Paths are relative: the same manifest, pointed at another root, resolves there.
    moved = read_manifest(out, root=tmp_path)
    assert moved.absolute_paths()[0] == tmp_path / "Im001_1.tif"
