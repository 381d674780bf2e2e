"""Multi-source training data: real ALL-IDB2 and DeepAPL combined, each source split on its own, every row keeping
its source, batches balanced per source, and a run trained on both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blastscan.data.manifest import Manifest, write_manifest
from blastscan.data.scan import scan
from blastscan.data.sources import combine_manifests, source_balanced_weights, split_sources
from blastscan.errors import DatasetError
from blastscan.runs import RunFolder
from blastscan.training.config import parse_config
from blastscan.training.data import EpochSeededSampler
from blastscan.workflows.train import train


@pytest.fixture(scope="module")
def sources(allidb2_dir: Path, deepapl_dir: Path) -> list[Manifest]:
    """ALL-IDB2 whole, and 6 cells of each of 24 DeepAPL patients."""
    full = scan(deepapl_dir, verify=False).manifest
    table = full.table.groupby("patient_id", group_keys=False).head(6)
    table = table[table["patient_id"].isin(sorted(table["patient_id"].unique())[:24])].reset_index(drop=True)
    return [scan(allidb2_dir, verify=False).manifest, Manifest(table=table, root=full.root, format="deepapl")]


def test_combined_manifest_keeps_each_rows_source_and_file(sources: list[Manifest]) -> None:
    combined = combine_manifests(sources)
    assert len(combined) == sum(len(m) for m in sources)
    assert combined.table["dataset"].value_counts().to_dict() == {"all-idb2": 260, "deepapl": len(sources[1])}
    assert all(path.is_file() for path in combined.absolute_paths()[::25])
    deepapl = combined.table[combined.table["dataset"] == "deepapl"]
    assert deepapl["patient_id"].str.startswith("deepapl/").all()  # two datasets' Patient_01 are not one patient
    assert combined.table.loc[combined.table["dataset"] == "all-idb2", "patient_id"].fillna("").eq("").all()
    with pytest.raises(DatasetError, match="listed twice"):
        combine_manifests([sources[0], sources[0]])


def test_each_source_is_split_on_its_own_without_leaks(sources: list[Manifest]) -> None:
    combined, splits = split_sources(sources, 0.7, 0.15, 0.15, seed=0)
    table = splits.table.assign(dataset=combined.table["dataset"].to_numpy(),
                                patient=combined.table["patient_id"].to_numpy())  # fmt: skip
    assert (table["path"] == combined.table["path"]).all()
    for split in ("train", "val", "test"):
        assert set(table.loc[table["split"] == split, "dataset"]) == {"all-idb2", "deepapl"}
    named = table[table["patient"].fillna("") != ""]
    assert (named.groupby("patient")["split"].nunique() == 1).all()  # no patient straddles splits
    assert splits.metadata["source_levels"] == {"all-idb2": "image", "deepapl": "patient"}
    assert any(w.startswith("all-idb2:") for w in splits.warnings)  # ALL-IDB2's image-level warning is kept


def test_batches_draw_every_source_equally_often() -> None:
    sources = np.array(["a"] * 900 + ["b"] * 100)
    targets = np.array([0] * 800 + [1] * 100 + [0] * 20 + [1] * 80)
    for by_class in (False, True):
        weights = source_balanced_weights(sources, targets, by_class)
        assert weights.sum() == pytest.approx(1.0)
        draws = np.concatenate([list(EpochSeededSampler(len(sources), seed=s, weights=weights)) for s in range(4)])
        share_b = (sources[draws] == "b").mean()
        assert share_b == pytest.approx(0.5, abs=0.05)
        if by_class:
            cells = {(s, t): ((sources[draws] == s) & (targets[draws] == t)).mean() for s in "ab" for t in (0, 1)}
            assert all(share == pytest.approx(0.25, abs=0.05) for share in cells.values())


def test_a_run_trains_on_two_sources(sources: list[Manifest], allidb2_dir: Path, tmp_path: Path) -> None:
    manifest_file = write_manifest(sources[1], tmp_path / "deepapl.csv")
    tree = {
        "name": "two_sources",
        "runs_dir": str(tmp_path),
        "data": {"root": str(allidb2_dir), "extra_sources": [str(manifest_file)], "image_size": 32,
                 "cache_dir": str(tmp_path / "cache"), "cell_focus": "mask"},
        "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [8, 16, 16, 32]}},
        "trainer": {"max_epochs": 1, "batch_size": 32},
    }  # fmt: skip
    run = RunFolder(train(parse_config(tree), progress_bar=False).run_dir)
    card = run.model_card()
    assert card["sources"]["all-idb2"] > 0 and card["sources"]["deepapl"] > 0
    assert card["cell_focus"]["mode"] == "mask"
    assert set(run.manifest().table["dataset"]) == {"all-idb2", "deepapl"}
    audit = run.audit()
    assert not audit.patient_leaks and not audit.duplicate_leaks
    assert any(note.startswith("cell focus (mask)") for note in audit.notes)
