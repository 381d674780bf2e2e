"""`data.leave_out_fields`: ALL-IDB2 crops cut from chosen ALL-IDB1 fields are left out before splitting (real data).

The datasets are not copied: the tests link a subset of the real files into ALL-IDB's layout under a temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blastscan.data.crop_sources import CropSource
from blastscan.errors import ConfigError
from blastscan.runs import RunFolder
from blastscan.training.config import parse_config
from blastscan.training.prepare import PreparedData, prepare_data
from blastscan.workflows.train import _write_run_inputs
from training.conftest import fast_config

#: Crops cut from Im009_1 and Im034_0 (located, and checked by eye, on the full sets): what leaving those out drops.
FROM_LEFT_OUT = [f"Im0{n}_1.tif" for n in (22, 23, 24, 25, 28, 29, 31)] + ["Im131_0.tif", "Im132_0.tif"]
#: Kept: blasts from Im001_1 or from fields this copy lacks, healthy cells from Im039_0 or from fields it lacks.
KEPT = [f"Im{n:03d}_1.tif" for n in range(1, 13)] + [f"Im{n:03d}_0.tif" for n in range(133, 151)]
FIELDS = ("Im001_1.jpg", "Im009_1.jpg", "Im034_0.jpg", "Im039_0.jpg")


@pytest.fixture(scope="module")
def linked_allidb(allidb1_dir: Path, allidb2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ALL_IDB/ALL_IDB2/img with 39 of the crops and ALL_IDB/ALL_IDB1/im with 4 fields, as symbolic links."""
    root = tmp_path_factory.mktemp("linked") / "ALL_IDB"
    for folder, names, source in (
        (root / "ALL_IDB2" / "img", FROM_LEFT_OUT + KEPT, allidb2_dir / "img"),
        (root / "ALL_IDB1" / "im", FIELDS, allidb1_dir / "im"),
    ):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).symlink_to(source / name)
    return root


@pytest.fixture(scope="module")
def prepared(linked_allidb: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    runs = tmp_path_factory.mktemp("runs")
    tree = fast_config(linked_allidb / "ALL_IDB2", runs, data__leave_out_fields=["Im009_1", "Im034_0.jpg"])
    return prepare_data(parse_config(tree))


def test_prepare_leaves_out_the_crops_cut_from_those_fields(prepared: PreparedData) -> None:
    kept = list(prepared.manifest.table["path"])
    assert sorted(kept) == sorted(KEPT)
    assert list(prepared.splits.table["path"]) == kept  # the split is made after leaving them out
    assert prepared.manifest.metadata["left_out_field_crops"] == sorted(FROM_LEFT_OUT)
    assert any("left out 9 image(s)" in note and "Im009_1" in note for note in prepared.audit.notes)
    assert prepared.crop_sources is not None and len(prepared.crop_sources) == len(FROM_LEFT_OUT + KEPT)
    by_crop = {s.crop: s.field for s in prepared.crop_sources}
    assert by_crop["Im022_1.tif"] == "Im009_1.jpg" and by_crop["Im001_1.tif"] == "Im001_1.jpg"
    assert by_crop["Im138_0.tif"] == "Im039_0.jpg" and by_crop["Im002_1.tif"] is None


def test_the_run_folder_keeps_the_crop_sources(prepared: PreparedData, tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path / "run")
    assert run.crop_sources() is None
    config = parse_config(fast_config(Path("unused"), tmp_path))
    _write_run_inputs(run, config, prepared, [0.5] * 3, [0.25] * 3)
    assert run.crop_sources_path == tmp_path / "run" / RunFolder.CROP_SOURCES
    assert run.crop_sources() == prepared.crop_sources


def test_unknown_fields_are_named(linked_allidb: Path, tmp_path: Path) -> None:
    tree = fast_config(linked_allidb / "ALL_IDB2", tmp_path, data__leave_out_fields=["Im001_1", "Im999_9"])
    config = parse_config(tree)
    with pytest.raises(ConfigError, match=r"data\.leave_out_fields: field\(s\) Im999_9 not found"):
        config.data.left_out_field_paths()
    with pytest.raises(ConfigError, match="Im999_9"):
        prepare_data(config)


def test_fields_root_default_and_expansion(
    linked_allidb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for root in (linked_allidb / "ALL_IDB2", linked_allidb / "ALL_IDB2" / "img", linked_allidb):
        config = parse_config(fast_config(root, tmp_path, data__leave_out_fields=["Im009_1"]))
        assert config.data.resolved_fields_root() == linked_allidb / "ALL_IDB1"
        assert config.data.left_out_field_paths() == [linked_allidb / "ALL_IDB1" / "im" / "Im009_1.jpg"]
    monkeypatch.setenv("BLASTSCAN_DATA", str(linked_allidb))
    tree = fast_config(tmp_path, tmp_path, data__fields_root="$BLASTSCAN_DATA/ALL_IDB1")
    assert parse_config(tree).data.resolved_fields_root() == linked_allidb / "ALL_IDB1"
    with pytest.raises(ConfigError, match=r"data\.fields_root"):
        parse_config(fast_config(tmp_path, tmp_path)).data.resolved_fields_root()


def test_field_names_must_be_plain() -> None:
    with pytest.raises(ConfigError, match=r"data\.leave_out_fields: field names must be"):
        parse_config({"name": "x", "data": {"root": "d", "leave_out_fields": ["ALL_IDB1/im/Im001_1.jpg"]}})
    assert parse_config({"name": "x", "data": {"root": "d"}}).data.leave_out_fields == []


def test_crop_sources_round_trip_through_the_run_folder(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path / "run")
    sources = [CropSource("a.tif", "f.jpg", 10.0, 20.5, 1.0, 0.999), CropSource("b.tif", None, None, None, None, 0.4)]
    run.write_crop_sources(sources)
    assert run.crop_sources() == sources
