"""Fixtures for training tests: a small SYNTHETIC dataset and a fast config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blastscan.data.synthetic import generate_dataset


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out / "data", n_patients=8, cells_per_patient=12, size=48, seed=0)
    return out / "data" / "labels.csv"


def fast_config(synthetic_csv: Path, runs_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A config tree that trains the custom CNN for seconds on the synthetic cells."""
    tree: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "runs_dir": str(runs_dir),
        "data": {"root": str(synthetic_csv), "image_size": 32, "cache_dir": str(runs_dir / "cache")},
        "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [8, 16, 16, 32]}},
        "loss": {"name": "weighted_ce"},
        "trainer": {"max_epochs": 3, "patience": 10, "batch_size": 16, "log_every_n_steps": 1},
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree
