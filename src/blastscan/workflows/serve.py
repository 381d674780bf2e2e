"""`blastscan serve`: the HTTP service and its web page for one model (a run folder or an exported model).

Builds the model's `FieldAnalyzer` and public card (`open_analyzer`: ONNX Runtime on the CPU, torch on a GPU), the
FastAPI application (`blastscan.deploy.service.create_app`) and runs it under uvicorn, with one JSON access-log line
per request on stderr. uvicorn's own access log is off: the service writes a structured one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from blastscan.deploy.service import ACCESS_LOG, ServiceLimits, create_app
from blastscan.workflows.analyze import open_analyzer

__all__ = ["build_app", "serve"]


def build_app(
    model: str | Path,
    limits: ServiceLimits | None = None,
    device: str = "auto",
    backend: str = "auto",
    int8: bool = False,
    site: str | None = None,
) -> FastAPI:
    """The service's application for `model` (see `open_analyzer`), with the site profile `site` when given."""
    analyzer, card = open_analyzer(model, device=device, backend=backend, int8=int8, site=site)
    return create_app(analyzer, card, limits)


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServiceLimits | None = None,
    device: str = "auto",
    backend: str = "auto",
    int8: bool = False,
    site: str | None = None,
) -> None:
    """Serve `model` on http://host:port until interrupted; access log as JSON lines on stderr."""
    app = build_app(model, limits, device, backend, int8, site)
    if not ACCESS_LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ACCESS_LOG.addHandler(handler)
        ACCESS_LOG.setLevel(logging.INFO)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")
