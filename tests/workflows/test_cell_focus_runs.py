"""A run trained with `data.cell_focus: mask` frames its inputs the same way everywhere: training cache, predict
(which flags images with no cell), the ONNX export and its torch-free predictor, and the audit / explanations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blastscan.inference import Predictor
from blastscan.runs import ExportFolder, RunFolder
from blastscan.training.config import parse_config
from blastscan.workflows.export import export_run
from blastscan.workflows.predict import predict, read_predictions
from blastscan.workflows.train import train


@pytest.fixture(scope="module")
def focus_run(allidb2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("focus_run")
    tree = {
        "name": "focus_run",
        "runs_dir": str(workdir),
        "data": {"root": str(allidb2_dir), "image_size": 48, "cache_dir": str(workdir / "cache"),
                 "cell_focus": "mask", "stain_normalization": "reinhard"},
        "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [8, 16, 16, 32]}},
        "trainer": {"max_epochs": 1, "batch_size": 32},
    }  # fmt: skip
    return train(parse_config(tree), progress_bar=False).run_dir


@pytest.fixture(scope="module")
def images(allidb2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    blank = tmp_path_factory.mktemp("inputs") / "no_cell.png"
    Image.new("RGB", (200, 200), (230, 226, 220)).save(blank)
    return [allidb2_dir / "img" / "Im001_1.tif", allidb2_dir / "img" / "Im150_0.tif", blank]


def test_the_run_records_its_framing_and_scores_files_as_it_trained(focus_run: Path, allidb2_dir: Path) -> None:
    run = RunFolder(focus_run)
    assert run.model_card()["cell_focus"]["mode"] == "mask"
    assert any(note.startswith("cell focus (mask): no cell found") for note in run.audit().notes)
    predictor = Predictor.from_run(run, backend="torch", device="cpu")
    manifest = run.manifest()
    cache = predictor.image_cache(manifest)
    row = int(np.flatnonzero(manifest.table["path"] == "Im001_1.tif")[0])
    np.testing.assert_array_equal(predictor.prepare(allidb2_dir / "img" / "Im001_1.tif"), cache[row])
    assert cache.row_flags().mean() > 0.95


def test_predict_flags_images_without_a_cell(focus_run: Path, images: list[Path], tmp_path: Path) -> None:
    result = predict(focus_run, [str(p) for p in images], tmp_path / "p.csv", backend="torch", device="cpu")
    header, table = read_predictions(result.out)
    assert header["cell_focus"]["mode"] == "mask"
    assert table["cell_found"].tolist() == [1, 1, 0]
    assert table["probability"].between(0, 1).all() and result.no_cell == 1


def test_the_export_carries_the_framing_to_onnx_runtime(focus_run: Path, images: list[Path], tmp_path: Path) -> None:
    export_run(focus_run, tmp_path / "export", parity_images=16)
    pre = ExportFolder.open(tmp_path / "export").preprocessing()
    assert pre["cell_focus"]["mode"] == "mask" and pre["cell_focus"]["version"] >= 2
    assert "frame the cell" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
    onnx = Predictor.open(tmp_path / "export")
    torch_predictor = Predictor.from_run(focus_run, backend="torch", device="cpu")
    assert onnx.focus == torch_predictor.focus
    np.testing.assert_allclose(onnx.predict(images), torch_predictor.predict(images), atol=1e-4)
