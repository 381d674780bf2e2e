"""Shared fixtures: where the real datasets are, and skipping with a reason when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Rich folds long words (paths) at the console width; the default 80 columns would cut a file name that a test looks
# for in a message in two, depending on how long pytest's temporary folder name happens to be.
os.environ["COLUMNS"] = "400"


def datasets_root() -> Path:
    """$BLASTSCAN_DATA, or ../shared/datasets beside the repository."""
    return Path(os.environ.get("BLASTSCAN_DATA", REPO_ROOT.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real datasets folder; tests that need it skip, naming the folder, when it is absent."""
    root = datasets_root()
    if not root.is_dir():
        pytest.skip(f"real datasets not found at {root}; set BLASTSCAN_DATA to the shared datasets folder")
    return root


@pytest.fixture(scope="session")
def allidb2_dir(real_data: Path) -> Path:
    return real_data / "ALL_IDB" / "ALL_IDB2"


@pytest.fixture(scope="session")
def allidb1_dir(real_data: Path) -> Path:
    return real_data / "ALL_IDB" / "ALL_IDB1"


@pytest.fixture(scope="session")
def deepapl_dir(real_data: Path) -> Path:
    return real_data / "DeepAPL"


@pytest.fixture(scope="session")
def bccd_dir(real_data: Path) -> Path:
    return real_data / "BCCD"


@pytest.fixture(scope="session")
def stain_run(allidb2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for one epoch on real ALL-IDB2 cells at 48 px, with Reinhard stain normalisation."""
    from blastscan.training.config import parse_config
    from blastscan.workflows.train import train

    workdir = tmp_path_factory.mktemp("stain_run")
    tree = {
        "name": "stain_run",
        "runs_dir": str(workdir),
        "data": {
            "root": str(allidb2_dir),
            "image_size": 48,
            "cache_dir": str(workdir / "cache"),
            "stain_normalization": "reinhard",
        },
        "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [8, 16, 16, 32]}},
        "trainer": {"max_epochs": 1, "batch_size": 32},
    }
    return train(parse_config(tree), progress_bar=False).run_dir


@pytest.fixture(scope="session")
def stain_export(stain_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`stain_run` exported with `blastscan export --int8` (model.onnx, model.int8.onnx, preprocessing.json)."""
    from blastscan.workflows.export import export_run

    out = tmp_path_factory.mktemp("stain_export") / "export"
    export_run(stain_run, out, int8=True, calibration=64)
    return out
