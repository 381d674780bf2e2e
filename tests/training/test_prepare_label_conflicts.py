"""`prepare_data` and label conflicts: one picture under two labels stops training unless the user drops it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from blastscan.cli import app
from blastscan.errors import TrainingError
from blastscan.training.config import TrainConfig, parse_config
from blastscan.training.prepare import prepare_data
from training.conftest import fast_config


def conflicting_csv(synthetic_csv: Path, folder: Path, how: str) -> tuple[Path, list[str]]:
    """A copy of the synthetic dataset where one cell also appears with the other label; the paths in conflict.

    `how="twice"` lists the same file again; `how="copy"` adds a byte-identical copy in another folder (the same
    cell filed under two class folders).
    """
    shutil.copytree(synthetic_csv.parent, folder)
    csv = folder / synthetic_csv.name
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    first = table.iloc[0].to_dict()
    other = "normal" if first["label"] == "leukemic" else "leukemic"
    paths = [first["path"]]
    if how == "copy":
        paths.append(f"refiled/{Path(first['path']).name}")
        (folder / "refiled").mkdir()
        shutil.copyfile(folder / first["path"], folder / paths[1])
    table = pd.concat([table, pd.DataFrame([{**first, "path": paths[-1], "label": other}])], ignore_index=True)
    table.to_csv(csv, index=False)
    return csv, paths


def with_drop(config: TrainConfig) -> TrainConfig:
    """`config` with data.drop_label_conflicts on (set this way so the test runs before and after the schema has it)."""
    return config.model_copy(update={"data": config.data.model_copy(update={"drop_label_conflicts": True})})


@pytest.mark.parametrize("how", ["twice", "copy"])
def test_label_conflicts_stop_training_naming_the_files(synthetic_csv: Path, tmp_path: Path, how: str) -> None:
    csv, paths = conflicting_csv(synthetic_csv, tmp_path / f"data_{how}", how)
    config = parse_config(fast_config(csv, tmp_path / "runs"))
    with pytest.raises(TrainingError, match="carry different labels") as raised:
        prepare_data(config)
    message = str(raised.value)
    assert all(p in message for p in paths), message
    assert "data.drop_label_conflicts" in message


def test_drop_label_conflicts_leaves_those_images_out(synthetic_csv: Path, tmp_path: Path) -> None:
    csv, paths = conflicting_csv(synthetic_csv, tmp_path / "data", "copy")
    rows = len(pd.read_csv(csv))
    data = prepare_data(with_drop(parse_config(fast_config(csv, tmp_path / "runs"))))
    kept = set(data.manifest.table["path"])
    assert len(data.manifest) == rows - 2 and not kept & set(paths)
    assert list(data.splits.table["path"]) == list(data.manifest.table["path"])
    assert data.audit.label_conflicts == []
    assert any("data.drop_label_conflicts" in note and paths[1] in note for note in data.audit.notes)
    assert data.manifest.metadata["dropped_label_conflicts"] == sorted(paths)


def test_train_command_exits_2_on_label_conflicts(synthetic_csv: Path, tmp_path: Path) -> None:
    csv, paths = conflicting_csv(synthetic_csv, tmp_path / "data", "twice")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(fast_config(csv, tmp_path / "runs")))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "carry different labels" in result.output and paths[0] in result.output
    assert not (tmp_path / "runs" / "tiny").exists(), "nothing is written for a refused run"
