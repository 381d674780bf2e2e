"""Shared fixtures: where the real datasets are, and skipping with a reason when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


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
