"""Fixtures for the service tests: the tiny real run's analyzer, and the service on a real loopback socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_service import LIMITS, serving

from blastscan.deploy.service import create_app
from blastscan.smear.analysis import FieldAnalyzer
from blastscan.workflows.analyze import open_analyzer


@pytest.fixture(scope="session")
def model(stain_run: Path) -> tuple[FieldAnalyzer, dict[str, Any]]:
    """The tiny real ALL-IDB2 run's analyzer and public card, on the CPU (as `blastscan serve` opens it)."""
    return open_analyzer(stain_run, device="cpu")


@pytest.fixture(scope="session")
def analyzer(model: tuple[FieldAnalyzer, dict[str, Any]]) -> FieldAnalyzer:
    return model[0]


@pytest.fixture(scope="session")
def service(model: tuple[FieldAnalyzer, dict[str, Any]]) -> Iterator[str]:
    """The base URL of the service for the tiny run, with the small LIMITS."""
    with serving(create_app(*model, limits=LIMITS)) as url:
        yield url


@pytest.fixture(scope="session")
def crops(allidb2_dir: Path) -> list[Path]:
    """Six real ALL-IDB2 cell crops (257x257 TIFF), three of each class."""
    images = sorted((allidb2_dir / "img").glob("*.tif"))
    blasts = [p for p in images if p.stem.endswith("_1")][:3]
    others = [p for p in images if p.stem.endswith("_0")][:3]
    assert len(blasts) == len(others) == 3
    return blasts + others
