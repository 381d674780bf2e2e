"""Readers on hostile or careless datasets the tests write: folder links, escaping CSV rows, stray files, bad labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blastscan.cli import app
from blastscan.data.registry import ReaderOptions
from blastscan.data.scan import scan
from blastscan.errors import DatasetError
from data.helpers import write_image


def make_lab_folder(root: Path, per_class: int = 20) -> Path:
    """ROOT/leukemic/l{i}.png and ROOT/normal/n{i}.png, `per_class` distinct images each."""
    for i in range(per_class):
        write_image(root / "leukemic" / f"l{i:02d}.png", seed=i)
        write_image(root / "normal" / f"n{i:02d}.png", seed=100 + i)
    return root


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return path


# --- item 3: a folder scan and links ----------------------------------------------------------------------------


def test_a_folder_link_out_of_a_class_is_not_followed(tmp_path: Path) -> None:
    root = make_lab_folder(tmp_path / "lab")
    (root / "leukemic" / "up").symlink_to("..")
    result = scan(root)
    table = result.manifest.table
    assert len(table) == 40, "the 40 images, each once"
    assert table["label"].value_counts().to_dict() == {"leukemic": 20, "normal": 20}
    assert (table.loc[table["path"].str.startswith("normal/"), "label"] == "normal").all()
    assert not table["path"].str.contains("up/").any()
    assert any("leukemic/up" in note and "not followed" in note for note in result.notes), result.notes


def test_one_file_under_two_labels_is_refused_naming_both_paths(tmp_path: Path) -> None:
    root = make_lab_folder(tmp_path / "lab")
    (root / "leukemic" / "extra.png").symlink_to(root / "normal" / "n03.png")
    with pytest.raises(DatasetError, match=r"normal/n03\.png.*leukemic/extra\.png|leukemic/extra\.png.*normal/n03"):
        scan(root)


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path: Path) -> None:
    root = make_lab_folder(tmp_path / "lab")
    (root / "blast").symlink_to("normal")
    with pytest.raises(DatasetError, match="two labels"):
        scan(root)


def test_a_file_linked_twice_in_one_class_is_read_once(tmp_path: Path) -> None:
    root = make_lab_folder(tmp_path / "lab")
    (root / "leukemic" / "P9").mkdir()
    (root / "leukemic" / "P9" / "again.png").symlink_to(root / "leukemic" / "l00.png")
    result = scan(root)
    assert len(result.manifest) == 40
    assert any("reached twice" in note for note in result.notes), result.notes


def test_a_file_link_out_of_the_dataset_is_left_out(tmp_path: Path) -> None:
    root = make_lab_folder(tmp_path / "lab")
    outside = write_image(tmp_path / "elsewhere" / "private.png", seed=999)
    (root / "normal" / "borrowed.png").symlink_to(outside)
    result = scan(root)
    assert "normal/borrowed.png" not in set(result.manifest.table["path"])
    assert any("borrowed.png" in note and "outside the dataset" in note for note in result.notes), result.notes


def test_a_linked_class_folder_is_read_as_if_it_were_there(tmp_path: Path) -> None:
    archive = make_lab_folder(tmp_path / "archive")
    root = tmp_path / "lab"
    root.mkdir()
    for name in ("leukemic", "normal"):
        (root / name).symlink_to(archive / name)
    result = scan(root)
    assert len(result.manifest) == 40
    assert result.manifest.class_counts() == {"leukemic": 20, "normal": 20}


# --- item 4: CSV rows that escape the root ----------------------------------------------------------------------


def test_a_csv_row_escaping_the_root_is_refused(tmp_path: Path) -> None:
    make_lab_folder(tmp_path / "lab" / "images", per_class=3)
    write_image(tmp_path / "elsewhere" / "x.png", seed=7)
    rows = [(f"images/leukemic/l{i:02d}.png", "leukemic") for i in range(3)]
    rows += [(f"images/normal/n{i:02d}.png", "normal") for i in range(3)]
    csv = write_csv(tmp_path / "lab" / "labels.csv", [*rows, ("../elsewhere/x.png", "normal")])
    with pytest.raises(
        DatasetError, match=r"labels\.csv:8: \.\./elsewhere/x\.png .*is outside the image root .*--csv-root"
    ):
        scan(csv)


def test_a_csv_row_reaching_a_system_file_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    make_lab_folder(tmp_path / "lab", per_class=2)
    escape = "../" * (len(tmp_path.parts) + 4) + "etc/passwd"
    rows = [("leukemic/l00.png", "leukemic"), ("normal/n00.png", "normal"), (escape, "normal")]
    csv = write_csv(tmp_path / "lab" / "labels.csv", rows)
    with pytest.raises(
        DatasetError, match=r"labels\.csv:4: .*etc/passwd \(which resolves to /etc/passwd\) is outside .*--csv-root"
    ):
        scan(csv, verify=False)


def test_a_csv_row_through_a_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    make_lab_folder(tmp_path / "lab", per_class=2)
    write_image(tmp_path / "elsewhere" / "x.png", seed=7)
    (tmp_path / "lab" / "door").symlink_to(tmp_path / "elsewhere")
    csv = write_csv(tmp_path / "lab" / "labels.csv", [("leukemic/l00.png", "leukemic"), ("door/x.png", "normal")])
    with pytest.raises(DatasetError, match=r"door/x\.png \(which resolves to .*elsewhere/x\.png\) is outside"):
        scan(csv)


def test_a_csv_row_through_a_loop_of_links_is_one_line_error(tmp_path: Path) -> None:
    make_lab_folder(tmp_path / "lab", per_class=2)
    (tmp_path / "lab" / "a").symlink_to("b")
    (tmp_path / "lab" / "b").symlink_to("a")
    csv = write_csv(tmp_path / "lab" / "labels.csv", [("leukemic/l00.png", "leukemic"), ("a/x.png", "normal")])
    with pytest.raises(DatasetError, match=r"labels\.csv:3: a/x\.png cannot be resolved"):
        scan(csv)


def test_csv_paths_inside_the_root_are_kept_and_tidied(tmp_path: Path) -> None:
    make_lab_folder(tmp_path / "lab", per_class=2)
    rows = [
        ("./leukemic/l00.png", "leukemic"),
        ("normal/../leukemic/l01.png", "leukemic"),
        (str(tmp_path / "lab" / "normal" / "n00.png"), "normal"),
        ("normal/n01.png", "normal"),
    ]
    result = scan(write_csv(tmp_path / "lab" / "labels.csv", rows))
    assert list(result.manifest.table["path"]) == [
        "leukemic/l00.png",
        "leukemic/l01.png",
        "normal/n00.png",
        "normal/n01.png",
    ]


def test_csv_root_bounds_the_paths(tmp_path: Path) -> None:
    make_lab_folder(tmp_path / "data", per_class=2)
    csv = write_csv(tmp_path / "lists" / "labels.csv", [("leukemic/l00.png", "leukemic"), ("normal/n00.png", "normal")])
    result = scan(csv, options=ReaderOptions(csv_root=tmp_path / "data"))
    assert len(result.manifest) == 2
    write_csv(csv, [("leukemic/l00.png", "leukemic"), ("../lists/labels.csv", "normal")])
    with pytest.raises(DatasetError, match="--csv-root"):
        scan(csv, options=ReaderOptions(csv_root=tmp_path / "data"), verify=False)


# --- item 9: messages that say what is wrong ---------------------------------------------------------------------


def test_a_folder_with_one_class_says_so(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    for i in range(3):
        write_image(root / "leukemic" / f"l{i}.png", seed=i)
    (root / "normal").mkdir()
    with pytest.raises(
        DatasetError,
        match=r"lab: no known dataset layout found: only one class folder holds images: leukemic/ \(normal/ hold",
    ):
        scan(root)
    with pytest.raises(DatasetError, match="only one class folder holds images"):
        scan(root, format="folder")


def test_images_without_class_folders_say_so(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / f"cell{i}.png", seed=i)
    with pytest.raises(DatasetError, match="directly in ROOT"):
        scan(tmp_path)


@pytest.mark.parametrize("missing", ["NaN", "nan", "NA", "N/A", "null"])
def test_a_missing_value_label_names_its_row(tmp_path: Path, missing: str) -> None:
    make_lab_folder(tmp_path / "lab", per_class=2)
    rows = [("leukemic/l00.png", "leukemic"), ("normal/n00.png", "normal"), ("normal/n01.png", missing)]
    csv = write_csv(tmp_path / "lab" / "labels.csv", rows)
    with pytest.raises(DatasetError, match=rf"labels\.csv:4: label '{missing}' for normal/n01\.png marks a missing"):
        scan(csv)


def test_an_unknown_label_and_a_repeated_path_are_noted(tmp_path: Path) -> None:
    make_lab_folder(tmp_path / "lab", per_class=2)
    rows = [
        ("leukemic/l00.png", "leukemic"),
        ("leukemic/l01.png", "blsat"),
        ("normal/n00.png", "normal"),
        ("normal/n00.png", "leukemic"),
    ]
    result = scan(write_csv(tmp_path / "lab" / "labels.csv", rows))
    assert any("'blsat' (1)" in note for note in result.notes), result.notes
    assert any("listed more than once" in note and "different labels" in note for note in result.notes)


def write_animated_gif(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def test_unsupported_files_are_listed_with_the_reason(tmp_path: Path) -> None:
    root = make_lab_folder(tmp_path / "lab", per_class=3)
    write_animated_gif(root / "leukemic" / "moving.gif")
    (root / "normal" / "readme.txt").write_text("scanned on the 3rd")
    (root / "normal" / ".DS_Store").write_bytes(b"\0")
    result = scan(root)
    assert len(result.manifest) == 6
    (note,) = [n for n in result.notes if n.startswith("left out")]
    assert "2 file(s)" in note
    assert "leukemic/moving.gif: not an image type blastscan reads (.gif)" in note
    assert "normal/readme.txt: not an image type blastscan reads (.txt)" in note

    out = tmp_path / "manifest.csv"
    printed = CliRunner().invoke(app, ["data", "scan", str(root), "--out", str(out)])
    assert printed.exit_code == 0, printed.output
    assert "moving.gif" in printed.output and "readme.txt" in printed.output


def test_a_class_of_unsupported_files_says_what_was_left_out(tmp_path: Path) -> None:
    root = make_lab_folder(tmp_path / "lab", per_class=2)
    write_image(root / "blast" / "b0.png", seed=50)
    write_animated_gif(root / "monocyte" / "m0.gif")
    (root / "monocyte" / "P1").mkdir()
    with pytest.raises(DatasetError, match=r"class 'monocyte' has no images \(left out: m0\.gif \(not an image type"):
        scan(root, format="folder")


# --- the same rules in the published layouts ---------------------------------------------------------------------


def test_allidb2_link_between_labels_is_refused_and_stray_pictures_noted(tmp_path: Path) -> None:
    img = tmp_path / "ALL_IDB2" / "img"
    for i in range(1, 5):
        write_image(img / f"Im{i:03d}_{i % 2}.tif", seed=i)
    write_animated_gif(img / "Im005_1.gif")
    write_image(img / "extra_crop.png", seed=9)
    result = scan(tmp_path / "ALL_IDB2")
    assert len(result.manifest) == 4
    assert any("left out 2 picture file(s)" in n and "Im005_1.gif" in n for n in result.notes), result.notes
    (img / "Im006_0.tif").symlink_to("Im001_1.tif")
    with pytest.raises(DatasetError, match=r"Im001_1\.tif and .*Im006_0\.tif are one file"):
        scan(tmp_path / "ALL_IDB2")


def test_cnmc_link_from_hem_to_all_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "fold_0" / "all" / "UID_1_1_1_all.bmp", seed=1)
    write_image(tmp_path / "fold_0" / "hem" / "UID_H2_1_1_hem.bmp", seed=2)
    (tmp_path / "fold_0" / "hem" / "UID_H3_1_1_hem.bmp").symlink_to("../all/UID_1_1_1_all.bmp")
    with pytest.raises(DatasetError, match=r"UID_1_1_1_all\.bmp and .*UID_H3_1_1_hem\.bmp are one file"):
        scan(tmp_path)


def test_deepapl_cell_type_link_is_not_followed(tmp_path: Path) -> None:
    data = tmp_path / "Data"
    data.mkdir()
    (data / "master.csv").write_text(
        "Patient_ID,Diagnosis,Cohort,Age at Diagnosis,Gender\nPatient_01,APL,Discovery,40,F\n"
    )
    slides = data / "All" / "Patient_01" / "Signed slides"
    for i in range(3):
        write_image(slides / "Promyelocyte" / f"PR_{i}.jpg", seed=i)
        write_image(slides / "Lymphocyte" / f"LY_{i}.jpg", seed=10 + i)
    (slides / "Monocyte").symlink_to("Promyelocyte")
    write_animated_gif(slides / "Lymphocyte" / "LY_moving.gif")
    result = scan(tmp_path)
    assert result.manifest.class_counts() == {"leukemic": 3, "normal": 3}
    (note,) = [n for n in result.notes if n.startswith("left out 2 file(s)")]
    assert "Monocyte: a link to a folder (Promyelocyte), not followed" in note
    assert "LY_moving.gif: not an image type blastscan reads (.gif)" in note
