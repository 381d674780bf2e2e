"""Fixtures for the service tests: the tiny real run's analyzer, and the service on a real loopback socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from blastscan.deploy.service import ServiceLimits, create_app
from blastscan.smear.analysis import FieldAnalyzer
from blastscan.workflows.analyze import open_analyzer

MIB = 1024 * 1024
#: Small limits, so that going over them costs the tests a few megabytes, not twenty.
LIMITS = ServiceLimits(max_upload_bytes=4 * MIB, max_file_bytes=3 * MIB, max_files=8, max_image_pixels=20_000_000)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a background thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
