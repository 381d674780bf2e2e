"""The HTTP service: score cell crops and read whole smear fields with one trained model, and its web page.

`create_app(analyzer, card, limits)` builds the FastAPI application around a `FieldAnalyzer` (its `Predictor`
scores cells; the analyzer finds, scores and counts a field's leukocytes) and the model's public card
(`blastscan.workflows.analyze.open_analyzer` gives both; this module never loads a model, so it does not care which
backend runs it, and imports no torch).

  GET  /            the web page (static/index.html): drop an image, see the calls, download them as CSV
  GET  /healthz     {"status": "ok", "model": ...}
  GET  /v1/model    the model card, its thresholds, the blastscan version, the limits and the disclaimer
  POST /v1/cells    multipart field `files` (one or more cell crops) -> each crop's blast probability and call
  POST /v1/fields   multipart field `file` (one smear field) -> the count, the smear call, every cell's row and
                    the overlay PNG (base64 in the JSON, or the PNG itself with ?format=png)
  GET  /docs        the OpenAPI documentation (Swagger UI; /redoc too), its scripts served by the service (no CDN)

Every refusal is a 4xx with a JSON body `{"error": "..."}` naming the file and what to do; limits (`ServiceLimits`)
bound the request body (FastAPI's own limit), each file, the decoded pixels and the files per request. One JSON line
per request goes to the `blastscan.deploy.access` logger.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import html
import json
import logging
import re
import threading
import time
from importlib import resources
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, ConfigDict, PositiveInt
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import blastscan
from blastscan import DISCLAIMER
from blastscan.deploy.uploads import UploadError, decode_cell, decode_field, display_name, read_limited
from blastscan.runs import jsonable
from blastscan.smear.analysis import CELL_COLUMNS, FieldAnalyzer
from blastscan.smear.render import PAGE_SIDE, fast_png, overlay_image, shrunk

__all__ = ["ACCESS_LOG", "DISCLAIMER", "ServiceLimits", "create_app"]

#: One JSON line per request (method, path, status, ms, bytes, request_bytes, client); the caller configures it.
ACCESS_LOG = logging.getLogger("blastscan.deploy.access")

MIB = 1024 * 1024
#: Where the service serves the documentation pages' own scripts (for /docs and /redoc).
DOCS_ASSETS = "/docs-assets"


class ServiceLimits(BaseModel):
    """What one request may ask of the service. Defaults suit smear fields of a few megapixels (ALL-IDB1's
    2592x1944 JPEGs are 0.6 MB and 5 Mpx)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The whole request body, bytes (FastAPI's body limit: 413 as soon as it is passed, or announced).
    max_upload_bytes: PositiveInt = 20 * MIB
    #: One uploaded file, bytes (413).
    max_file_bytes: PositiveInt = 20 * MIB
    #: Width x height of one image, checked from its header before any pixel is decoded (422). A field costs about
    #: 12 bytes a pixel while it is analysed (its 3 decoded bytes and the finder's working arrays: 60 MB for a
    #: 2592x1944 field), so this bounds a request's memory: 40 Mpx, about 500 MB.
    max_image_pixels: PositiveInt = 40_000_000
    #: Cell crops in one request to /v1/cells (413).
    max_files: PositiveInt = 64
    #: Fields analysed at the same time; more requests wait their turn (holding no thread), so this, not the number
    #: of clients, bounds the memory fields take: `concurrent_fields` x the per-field cost above.
    concurrent_fields: PositiveInt = 2
    #: Cell requests decoded and scored at the same time (each holds one decoded image at a time, up to
    #: `max_image_pixels` x 3 bytes); more wait their turn, first come first served.
    concurrent_cell_requests: PositiveInt = 4


class _SerialPredictor:
    """A Predictor whose network runs one call at a time; everything else (prepare, image_size...) passes through.

    Why a lock: a forward pass already spreads over every core (torch's intra-op threads, ONNX Runtime's), so two at
    once only fight over them and hold two batches of activations; and no backend promises that one model object
    may be called from several threads at once. Decoding, finding the cells and preparing the crops stay outside
    the lock and run in parallel."""

    def __init__(self, predictor: Any) -> None:
        self._predictor = predictor
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def predict_prepared(self, images: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        with self._lock:
            return self._predictor.predict_prepared(images, *args, **kwargs)

    def predict(self, images: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        with self._lock:
            return self._predictor.predict(images, *args, **kwargs)

    def score_prepared_batch(self, images: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._predictor.score_prepared_batch(images, *args, **kwargs)


def _serving(analyzer: FieldAnalyzer) -> FieldAnalyzer:
    """The caller's analyzer with its network behind `_SerialPredictor` (a shallow copy: the caller's is unchanged)."""
    serving = copy.copy(analyzer)
    serving.predictor = _SerialPredictor(analyzer.predictor)  # type: ignore[assignment]
    return serving


def _too_large(max_upload_bytes: int) -> str:
    return (
        f"the request body is larger than the {max_upload_bytes:,} bytes ({max_upload_bytes / MIB:.1f} MiB) accepted; "
        f"send fewer or smaller images per request"
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _JsonErrors:
    """Rewords the one plain-text answer no exception handler sees: FastAPI's body limit answers "Content Too Large"
    itself, below the handlers, when the request announces a body over the limit. Every other error is JSON already.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.body = json.dumps({"error": _too_large(max_upload_bytes)}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replacing = False

        async def reworded(message: Message) -> None:
            nonlocal replacing
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                replacing = message["status"] == 413 and content_type.startswith(b"text/plain")
                if replacing:
                    headers = [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(self.body)).encode()),
                    ]
                    # The body may not have been read: the connection cannot carry another request.
                    headers.append((b"connection", b"close"))
                    await send({"type": "http.response.start", "status": 413, "headers": headers})
                    return
            elif message["type"] == "http.response.body" and replacing:
                if not message.get("more_body", False):
                    await send({"type": "http.response.body", "body": self.body})
                return
            await send(message)

        await self.app(scope, receive, reworded)


class _AccessLog:
    """One JSON line per HTTP request on ACCESS_LOG: method, path, status, ms, bytes (answered), request_bytes
    (received), client. A plain ASGI middleware: it sees every request, errors included, and holds no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen = {"status": 500, "bytes": 0, "request_bytes": 0}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["request_bytes"] += len(message.get("body", b""))
            return message

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            client = scope.get("client")
            ACCESS_LOG.info(
                json.dumps(
                    {
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "status": seen["status"],
                        "ms": round(1000 * (time.perf_counter() - started), 2),
                        "bytes": seen["bytes"],
                        "request_bytes": seen["request_bytes"],
                        "client": f"{client[0]}:{client[1]}" if client else None,
                    }
                )
            )


def _validation_message(exc: RequestValidationError, upload_fields: dict[str, str]) -> str:
    """One sentence for a request FastAPI could not match to an endpoint's parameters."""
    parts = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ())]
        name = location[1] if len(location) > 1 else "request"  # ("body", "files", 0): the field, then the item
        if location[:1] == ["body"] and name in upload_fields:
            if error.get("type") == "missing":
                parts.append(
                    f"no file in the request: send multipart/form-data with {upload_fields[name]} in a field named "
                    f"{name!r}"
                )
            else:
                parts.append(f"field {name!r} must hold uploaded files (multipart/form-data parts with a filename)")
        else:
            parts.append(f"{'.'.join(location[1:]) or name}: {error.get('msg', 'invalid')}")
    return "; ".join(dict.fromkeys(parts)) or "the request does not match this endpoint"


def _page(card: dict[str, Any]) -> tuple[str, str]:
    """The web page with the disclaimer, model and version filled in, and its Content-Security-Policy: nothing may
    be fetched but this service's own API, and only the page's own inline script (by hash) may run."""
    text = resources.files("blastscan.deploy").joinpath("static/index.html").read_text(encoding="utf-8")
    text = (
        text.replace("{{disclaimer}}", html.escape(DISCLAIMER))
        .replace("{{model}}", html.escape(str(card.get("model") or card.get("name") or "model")))
        .replace("{{version}}", html.escape(blastscan.__version__))
    )
    scripts = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in re.findall(r"<script>(.*?)</script>", text, flags=re.S)
    )
    policy = (
        "default-src 'none'; "
        f"script-src {scripts or repr('none')}; "
        "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return text, policy


def create_app(analyzer: FieldAnalyzer, card: dict[str, Any], limits: ServiceLimits | None = None) -> FastAPI:
    """The service's FastAPI application for one model: `analyzer` scores, `card` (open_analyzer's public model
    card) describes it. Run it with any ASGI server (`uvicorn.run(app)`)."""
    limits = limits or ServiceLimits()
    too_large = _too_large(limits.max_upload_bytes)
    too_many = f"more than {limits.max_files} files in one request; send the cells in batches of {limits.max_files}"
    one_field = "more than one file in the request; send each field in a request of its own"
    # The parser stops at the limits rather than spooling every part to disk first; a few form fields are allowed
    # (clients such as curl's -F may add one) but no more.
    form_limits = {"max_files": limits.max_files, "max_fields": 8}
    serving = _serving(analyzer)
    predictor = serving.predictor
    card = jsonable(dict(card))
    model_name = str(card.get("model") or card.get("name") or "model")
    page, page_policy = _page(card)
    # Waiting for a slot holds no worker thread: anyio queues the call, in order, until a slot is free.
    field_slots = anyio.CapacityLimiter(limits.concurrent_fields)
    cell_slots = anyio.CapacityLimiter(limits.concurrent_cell_requests)

    # FastAPI's own /docs and /redoc load their scripts from a CDN; fastapi-offline serves the same pages with the
    # scripts from its package (Swagger UI 5, which reads FastAPI's OpenAPI 3.1), so they work on an offline network.
    app = FastAPIOffline(
        title="blastscan",
        version=blastscan.__version__,
        summary="Blast detection in blood smear images: cell crops and whole smear fields.",
        description=DISCLAIMER,
        static_url=DOCS_ASSETS,
    )
    # The last added runs first: the access log sees what the client is answered, reworded or not.
    app.add_middleware(_JsonErrors, max_upload_bytes=limits.max_upload_bytes)
    app.add_middleware(_AccessLog)

    @app.exception_handler(UploadError)
    async def refused(request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def unmatched(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = {"files": "each cell crop", "file": "the field image"}
        return _error(422, _validation_message(exc, fields))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, message = exc.status_code, str(exc.detail)
        if status == 413:
            message = too_large
        elif status == 404:
            message = f"no such page: {request.url.path}; see /docs for the endpoints"
        elif status == 400 and message.startswith("Too many files"):
            # The multipart parser stops at `form_limits` max_files and says so only in words.
            status = 413
            message = one_field if request.url.path.endswith("/fields") else too_many
        elif status == 400:
            message = f"the request body could not be read ({message}); send multipart/form-data"
        return _error(status, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server logs the traceback.
        return _error(500, "the service failed on this request; the server's log has the details")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": page_policy, "Cache-Control": "no-cache"})

    @app.get("/healthz", summary="Liveness: the service is up and its model loaded")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/model", summary="The model card, its thresholds, the limits and the disclaimer")
    async def model() -> dict[str, Any]:
        return {
            **card,
            "threshold": analyzer.cell_threshold,
            "smear_threshold_percentage": round(100 * analyzer.smear_threshold, 2),
            "blastscan_version": blastscan.__version__,
            "limits": limits.model_dump(),
            "disclaimer": DISCLAIMER,
        }

    def score_cells(files: list[UploadFile]) -> list[dict[str, Any]]:
        size = predictor.image_size
        names = [display_name(upload.filename, index) for index, upload in enumerate(files)]
        # Each crop is shrunk to the network's input as soon as it is decoded: one full-size image held at a time.
        prepared = [
            predictor.prepare(
                decode_cell(read_limited(upload.file, name, limits.max_file_bytes), name, limits.max_image_pixels, size)
            )
            for name, upload in zip(names, files, strict=True)
        ]
        # The analyzer's fixed-size batches: one input shape whatever the number of crops keeps memory flat.
        probabilities, ood_scores, flags = serving.score_with_flags(np.stack(prepared))
        return [
            {
                "filename": name,
                "probability": float(p),
                "call": "blast" if p >= serving.cell_threshold else "other",
                "ood_score": None if np.isnan(score) else round(float(score), 4),
                "out_of_distribution": bool(flag),
            }
            for name, p, score, flag in zip(names, probabilities, ood_scores, flags, strict=True)
        ]

    @app.post(
        "/v1/cells",
        max_body_size=limits.max_upload_bytes,
        form_limits=form_limits,
        summary="Blast probability and call of each uploaded cell crop",
        description=f"Each crop is scored alone; `call` is `blast` when the probability reaches the model's "
        f"threshold, else `other`. At most {limits.max_files} crops per request. {DISCLAIMER}",
    )
    async def cells(
        files: Annotated[list[UploadFile], File(description="one or more cell crops (JPEG, PNG, TIFF, BMP)")],
    ) -> dict[str, Any]:
        # Decoding and the network run in a worker thread (the event loop keeps answering other requests), at most
        # `concurrent_cell_requests` at once.
        results = await anyio.to_thread.run_sync(score_cells, files, limiter=cell_slots)
        return {"model": model_name, "threshold": serving.cell_threshold, "disclaimer": DISCLAIMER, "cells": results}

    def read_field(file: UploadFile, overlay_side: int) -> tuple[dict[str, Any], bytes]:
        name = display_name(file.filename, 0)
        image = decode_field(read_limited(file.file, name, limits.max_file_bytes), name, limits.max_image_pixels)
        analysis = serving.analyze(image)
        picture = shrunk(image, overlay_side) if overlay_side else Image.fromarray(image)
        scale = picture.width / image.shape[1]
        body = {
            "filename": name,
            "model": model_name,
            "disclaimer": DISCLAIMER,
            "summary": analysis.summary(),
            "columns": list(CELL_COLUMNS),
            "cells": [cell.row() for cell in analysis.cells],
            "overlay_scale": scale,
        }
        return body, fast_png(overlay_image(picture, analysis, scale=scale))

    @app.post(
        "/v1/fields",
        max_body_size=limits.max_upload_bytes,
        form_limits={**form_limits, "max_files": 1},
        summary="Find, score and count the leukocytes of one smear field",
        description="The field's count (complete leukocytes, blasts, blast percentage with its Wilson 95% interval), "
        "the smear call, one row per cell found (`columns` order; cells cut by the border are scored but not "
        "counted) and the overlay PNG, base64 (`overlay_png`), drawn on the field shrunk to `overlay_side`. With "
        f"`format=png` the answer is the overlay PNG itself. {DISCLAIMER}",
        responses={200: {"content": {"image/png": {}}}},
    )
    async def fields(
        file: Annotated[UploadFile, File(description="one smear field image (JPEG, PNG, TIFF, BMP)")],
        response_format: Annotated[Literal["json", "png"], Query(alias="format")] = "json",
        overlay_side: Annotated[
            int, Query(ge=0, le=20_000, description="longest side of the overlay in px; 0: the field's own size")
        ] = PAGE_SIDE,
    ) -> Any:
        started = time.perf_counter()
        # In a worker thread, at most `concurrent_fields` at once; a request waiting for a slot holds no thread.
        body, overlay = await anyio.to_thread.run_sync(read_field, file, overlay_side, limiter=field_slots)
        if response_format == "png":
            return Response(overlay, media_type="image/png")
        body["overlay_png"] = base64.b64encode(overlay).decode("ascii")
        body["seconds"] = round(time.perf_counter() - started, 3)
        return body

    return app
