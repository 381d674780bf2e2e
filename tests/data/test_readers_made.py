"""Readers on small files the tests create: C-NMC layouts, lab folders and CSVs, and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blastscan.data.manifest import read_manifest, write_manifest
from blastscan.data.scan import scan
from blastscan.errors import DatasetError
from data.helpers import write_image, write_truncated


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def make_cnmc_training(root: Path) -> Path:
    base = root / "C-NMC_training_data"
    names = {
        "fold_0/all": ["UID_11_10_1_all.bmp", "UID_11_10_2_all.bmp", "UID_12_3_1_all.bmp"],
        "fold_0/hem": ["UID_H10_43_1_hem.bmp", "UID_H10_44_1_hem.bmp"],
        "fold_1/all": ["UID_13_1_1_all.bmp"],
        "fold_1/hem": ["UID_H22_5_2_hem.bmp", "UID_H22_6_1_hem.bmp"],
    }
    seed = 0
    for folder, files in names.items():
        for name in files:
            seed += 1
            write_image(base / folder / name, seed=seed, size=(45, 45))
    return root


def test_cnmc_training_layout(tmp_path: Path) -> None:
    root = make_cnmc_training(tmp_path)
    before = _snapshot(root)
    result = scan(root)
    assert result.reader == "c-nmc"
    assert "C-NMC variant: the training folds (fold_0, fold_1/all|hem)" in result.notes
    table = result.manifest.table.set_index("path")
    assert len(table) == 8
    assert table.loc["fold_0/all/UID_11_10_1_all.bmp", "patient_id"] == "11"
    assert table.loc["fold_0/hem/UID_H10_43_1_hem.bmp", "label"] == "normal"
    assert table.loc["fold_0/hem/UID_H10_43_1_hem.bmp", "diagnosis"] == "healthy"
    assert set(table["fold"]) == {"fold_0", "fold_1"}
    assert result.manifest.has_patients
    assert table["patient_id"].nunique() == 5
    assert _snapshot(root) == before, "scan must not write under the dataset root"


def test_cnmc_misfiled_cell_is_named(tmp_path: Path) -> None:
    write_image(tmp_path / "fold_0" / "all" / "UID_H1_1_1_hem.bmp")
    with pytest.raises(DatasetError, match=r"UID_H1_1_1_hem\.bmp"):
        scan(tmp_path)


def test_cnmc_renamed_test_layout(tmp_path: Path) -> None:
    folder = tmp_path / "C-NMC_test_prelim_phase_data"
    originals = ["UID_57_29_1_all.bmp", "UID_H49_35_1_hem.bmp", "UID_57_30_2_all.bmp"]
    for i in range(1, 4):
        write_image(folder / f"{i}.bmp", seed=i)
    (tmp_path / "C-NMC_test_prelim_phase_data_labels.csv").write_text(
        "Patient_ID,new_names,labels\n"
        + "".join(f"{o},{i}.bmp,{int('_all' in o)}\n" for i, o in enumerate(originals, 1))
    )
    result = scan(folder)
    assert result.reader == "c-nmc"
    table = result.manifest.table.set_index("path")
    assert list(table["label"]) == ["leukemic", "normal", "leukemic"]
    assert table.loc["2.bmp", "patient_id"] == "H49"
    assert table.loc["1.bmp", "original_name"] == "UID_57_29_1_all.bmp"


#: Twelve cells of four subjects: with one stray image beside them, 92% of the images carry C-NMC names.
CNMC_CELLS = [
    f"UID_{s}_{i}_1_{'hem' if s.startswith('H') else 'all'}" for s in ("11", "12", "H10", "H22") for i in (1, 2, 3)
]


def test_cnmc_cells_in_one_flat_folder_of_pngs(tmp_path: Path) -> None:
    flat = tmp_path / "cnmc_png"
    for seed, stem in enumerate(CNMC_CELLS):
        write_image(flat / f"{stem}.png", seed=seed, size=(45, 45))
    write_image(flat / "notes.png", seed=99)  # a stray image is left out, and said so
    result = scan(flat)
    assert result.reader == "c-nmc" and result.auto_detected
    table = result.manifest.table.set_index("path")
    assert len(table) == len(CNMC_CELLS)
    assert table.loc["UID_11_1_1_all.png", "label"] == "leukemic"
    assert table.loc["UID_H10_2_1_hem.png", "label"] == "normal"
    assert table.loc["UID_H10_2_1_hem.png", "patient_id"] == "H10"
    assert table["patient_id"].nunique() == 4 and result.manifest.has_patients
    said = " ".join(result.notes)
    assert "C-NMC variant: UID-named cells in 1 folder(s), .png files" in said and "notes.png" in said


def test_cnmc_cells_nested_at_any_depth_in_any_format(tmp_path: Path) -> None:
    root = tmp_path / "copy"
    places = ["a/b/c", "a", "d/e", "all", "hem/x", "fold_3/all"]
    stems = ["UID_11_10_1_all", "UID_11_10_2_all", "UID_H10_43_1_hem", "UID_12_3_1_all", "UID_H22_5_2_hem",
             "UID_13_1_1_all"]  # fmt: skip
    for seed, (place, stem, ending) in enumerate(zip(places, stems, [".jpg", ".bmp", ".PNG", ".tif", ".jpeg", ".png"],
                                                    strict=True)):  # fmt: skip
        write_image(root / place / f"{stem}{ending}", seed=seed, size=(45, 45))
    result = scan(root)
    assert result.reader == "c-nmc"
    table = result.manifest.table.set_index("path")
    assert len(table) == 6
    assert table.loc["fold_3/all/UID_13_1_1_all.png", "fold"] == "fold_3"
    assert table.loc["hem/x/UID_H22_5_2_hem.jpeg", "label"] == "normal"
    assert "UID-named cells in 6 folder(s)" in " ".join(result.notes)


def test_cnmc_cell_whose_name_and_class_folder_disagree_is_named(tmp_path: Path) -> None:
    write_image(tmp_path / "cells" / "hem" / "UID_11_10_1_all.png")
    write_image(tmp_path / "cells" / "all" / "UID_12_10_1_all.png", seed=1)
    with pytest.raises(DatasetError, match=r"UID_11_10_1_all\.png: the name says 'all' but the file sits in a hem/"):
        scan(tmp_path / "cells")


def test_a_lab_folder_with_a_few_cnmc_names_is_not_taken_for_cnmc(tmp_path: Path) -> None:
    for k in range(12):
        write_image(tmp_path / "lab" / ("blast" if k % 2 else "normal") / f"cell{k}.png", seed=k)
    write_image(tmp_path / "lab" / "blast" / "UID_11_10_1_all.png", seed=50)
    assert scan(tmp_path / "lab").reader != "c-nmc"


def test_cnmc_renamed_test_set_converted_to_png_is_matched_by_number(tmp_path: Path) -> None:
    folder = tmp_path / "prelim_png"
    originals = ["UID_57_29_1_all.bmp", "UID_H49_35_1_hem.bmp"]
    for i in (1, 2):
        write_image(folder / f"{i}.png", seed=i)
    (folder / "labels.csv").write_text(
        "Patient_ID,new_names,labels\n"
        + "".join(f"{o},{i}.bmp,{int('_all' in o)}\n" for i, o in enumerate(originals, 1))
    )
    result = scan(folder)
    assert result.reader == "c-nmc" and "renamed test set" in " ".join(result.notes)
    assert list(result.manifest.table["path"]) == ["1.png", "2.png"]
    assert list(result.manifest.table["label"]) == ["leukemic", "normal"]


def test_folder_per_class_with_patients(tmp_path: Path) -> None:
    for cls in ("blast", "normal"):
        for patient in ("P1", "P2"):
            for k in range(2):
                write_image(tmp_path / "lab" / cls / patient / f"{k}.png", seed=k)
    result = scan(tmp_path / "lab")
    assert result.reader == "folder"
    assert result.manifest.class_counts() == {"leukemic": 4, "normal": 4}
    assert result.manifest.has_patients


def test_folder_with_empty_class_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "all" / "a.png")
    write_image(tmp_path / "hem" / "b.png")
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="class 'other' has no images"):
        scan(tmp_path, format="folder")


def test_lab_csv(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.jpg", seed=1)
    write_image(tmp_path / "imgs" / "b.tif", seed=2)
    write_image(tmp_path / "imgs" / "c.png", seed=3, mode="L")
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label,patient_id,stain\nimgs/a.jpg,ALL,p1,wright\nimgs/b.tif,normal,p2,giemsa\nimgs/c.png,0,p2,x\n"
    )
    result = scan(csv)
    assert result.reader == "csv"
    table = result.manifest.table
    assert list(table["label"]) == ["leukemic", "normal", "normal"]
    assert list(table["stain"]) == ["wright", "giemsa", "x"]
    assert list(table["mode"]) == ["RGB", "RGB", "L"]


def test_lab_csv_missing_column_is_named(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\na.png,1\n")
    with pytest.raises(DatasetError, match="missing column 'path'"):
        scan(csv)


def test_unreadable_images_are_listed_then_skipped(tmp_path: Path) -> None:
    for cls in ("all", "hem"):
        for k in range(3):
            write_image(tmp_path / cls / f"{k}.png", seed=k)
    write_truncated(tmp_path / "all" / "broken.jpg")
    (tmp_path / "hem" / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="2 unreadable image") as info:
        scan(tmp_path)
    assert "broken.jpg" in str(info.value) and "empty.png" in str(info.value)
    result = scan(tmp_path, skip_bad=True)
    assert len(result.manifest) == 6
    assert sorted(Path(b.path).name for b in result.bad_files) == ["broken.jpg", "empty.png"]


def test_unknown_layout_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="no known dataset layout"):
        scan(tmp_path)
    with pytest.raises(DatasetError, match="no such file or folder"):
        scan(tmp_path / "missing")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        scan(tmp_path, format="nonsense")


def test_manifest_found_beside_a_moved_dataset(tmp_path: Path) -> None:
    data = tmp_path / "project" / "data"
    for cls in ("all", "hem"):
        write_image(data / cls / "x.png")
    manifest = scan(data).manifest
    write_manifest(manifest, tmp_path / "project" / "manifest.csv")
    os.rename(tmp_path / "project", tmp_path / "moved")
    again = read_manifest(tmp_path / "moved" / "manifest.csv")
    assert again.root.resolve() == (tmp_path / "moved" / "data").resolve()
    assert all(p.is_file() for p in again.absolute_paths())


def test_not_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("path,label\n")
    with pytest.raises(DatasetError, match="not a blastscan manifest"):
        read_manifest(tmp_path / "x.csv")


def test_find_cell_datasets_finds_cnmc_in_each_layout_and_skips_other_folders(tmp_path: Path) -> None:
    from blastscan.data.registry import find_cell_datasets

    make_cnmc_training(tmp_path / "challenge")
    for seed, stem in enumerate(CNMC_CELLS):
        write_image(tmp_path / "copies" / "cnmc_png" / f"{stem}.png", seed=seed, size=(45, 45))
    for label in ("leukemic", "normal"):  # a lab's folders: generic, never guessed at
        write_image(tmp_path / "lab" / label / "cell.png")
    found = find_cell_datasets(tmp_path)
    assert [name for name, _ in found] == ["c-nmc", "c-nmc"]
    assert {path.name for _, path in found} == {"C-NMC_training_data", "cnmc_png"}
