"""The service over a real socket with the tiny real run: its answers equal the same calls made in-process.

Cells: real ALL-IDB2 crops against `Predictor.predict` on the same files. Fields: a real ALL-IDB1 field and a
SYNTHETIC one against `FieldAnalyzer.analyze` on the same pixels. Then a burst of 100 concurrent requests, the
access log, the page's self-containment and the OpenAPI docs, and that the deploy layer imports no torch.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import blastscan
from blastscan import DISCLAIMER
from blastscan.data.synthetic import draw_field
from blastscan.smear.analysis import CELL_COLUMNS, FieldAnalyzer
from blastscan.smear.render import PAGE_SIDE
from blastscan.workflows.analyze import load_field


def _post_cells(url: str, paths: list[Path]) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "image/tiff")) for p in paths]
    return httpx.post(f"{url}/v1/cells", files=files, timeout=60)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_field(body: dict[str, Any], analyzer: FieldAnalyzer, image: np.ndarray) -> None:
    """The service's answer for a field is what the analyzer says in-process about the same pixels."""
    expected = analyzer.analyze(image)
    assert body["summary"] == json.loads(json.dumps(expected.summary()))
    assert body["columns"] == list(CELL_COLUMNS)
    assert body["cells"] == json.loads(json.dumps([cell.row() for cell in expected.cells]))
    assert body["disclaimer"] == DISCLAIMER
    summary = body["summary"]
    complete = [c for c in body["cells"] if not c["touches_border"]]
    assert summary["leukocytes_counted"] == len(complete)
    assert summary["blasts"] == sum(c["call"] == "blast" for c in complete)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    h, w = image.shape[:2]
    scale = min(1.0, PAGE_SIDE / max(h, w))
    assert overlay.format == "PNG" and overlay.size == (round(w * scale), round(h * scale))
    assert body["overlay_scale"] == pytest.approx(overlay.width / w)


def test_healthz_names_the_model(service: str) -> None:
    answer = httpx.get(f"{service}/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "model": "stain_run"}


def test_model_card_has_the_threshold_version_limits_and_disclaimer(
    service: str, model: tuple[FieldAnalyzer, dict[str, Any]]
) -> None:
    analyzer, card = model
    body = httpx.get(f"{service}/v1/model").json()
    assert {k: body[k] for k in card} == json.loads(json.dumps(card))
    assert body["threshold"] == analyzer.cell_threshold and 0 < body["threshold"] < 1
    assert body["image_size"] == 48 and body["stain_normalisation"] == "reinhard"
    assert body["blastscan_version"] == blastscan.__version__
    assert body["disclaimer"] == DISCLAIMER
    assert body["limits"]["max_files"] == 8 and body["limits"]["max_upload_bytes"] == 4 * 1024 * 1024


def test_cells_equal_the_predictor_in_process(service: str, analyzer: FieldAnalyzer, crops: list[Path]) -> None:
    answer = _post_cells(service, crops)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = analyzer.predictor.predict([str(p) for p in crops])
    assert [c["filename"] for c in body["cells"]] == [p.name for p in crops]  # in upload order
    got = np.array([c["probability"] for c in body["cells"]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    for cell in body["cells"]:
        assert cell["call"] == ("blast" if cell["probability"] >= analyzer.cell_threshold else "other")
    assert body["threshold"] == analyzer.cell_threshold and body["disclaimer"] == DISCLAIMER
    # The out-of-distribution flag, as the predictor computes it in process.
    batch = next(analyzer.predictor.stream([str(p) for p in crops]))
    np.testing.assert_allclose([c["ood_score"] for c in body["cells"]], batch.ood_score, rtol=1e-4, atol=1e-3)
    assert [c["out_of_distribution"] for c in body["cells"]] == batch.out_of_distribution.tolist()
    # One crop alone scores as it does among others.
    alone = _post_cells(service, crops[:1]).json()["cells"][0]["probability"]
    assert alone == pytest.approx(got[0], abs=1e-6)


def test_a_real_allidb1_field_equals_the_analyzer_in_process(
    service: str, analyzer: FieldAnalyzer, allidb1_dir: Path
) -> None:
    path = allidb1_dir / "im" / "Im006_1.jpg"
    answer = httpx.post(f"{service}/v1/fields", files={"file": (path.name, path.read_bytes())}, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["filename"] == path.name and body["summary"]["leukocytes_counted"] > 5
    _check_field(body, analyzer, load_field(path))


def test_a_synthetic_field_equals_the_analyzer_and_the_overlay_comes_raw_too(
    service: str, analyzer: FieldAnalyzer
) -> None:
    field = draw_field(np.random.default_rng(3), 640, 480, kinds=["blast", "lymphocyte", "neutrophil"])
    data = _png(field.image)
    answer = httpx.post(f"{service}/v1/fields", files={"file": ("SYNTHETIC.png", data)}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    _check_field(body, analyzer, field.image)
    # The finder finds the drawn leukocytes (the border cell among them).
    assert body["summary"]["cells_found"] >= len(field.cells) - 1
    raw = httpx.post(
        f"{service}/v1/fields", params={"format": "png", "overlay_side": 0}, files={"file": ("f.png", data)}
    )
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(raw.content)).convert("RGB"))
    assert overlay.shape == field.image.shape  # overlay_side=0: the field's own size
    assert (overlay != field.image).any(axis=2).mean() < 0.5  # boxes and labels drawn on the field, not another


def test_a_burst_of_100_concurrent_requests_is_answered_in_full(
    service: str, crops: list[Path], analyzer: FieldAnalyzer
) -> None:
    """80 cell requests and 20 field requests at once: every one 200, each with the answer it gets alone (a shared
    network behind a lock must not mix one request's crops into another's answer)."""
    field = _png(draw_field(np.random.default_rng(4), 640, 480, kinds=["blast", "lymphocyte"]).image)
    alone_cells = {p.name: _post_cells(service, [p]).json()["cells"][0]["probability"] for p in crops}
    alone_field = httpx.post(f"{service}/v1/fields", files={"file": ("f.png", field)}, timeout=60).json()

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=service, timeout=120, limits=limits) as client:
            calls = []
            for i in range(100):
                if i % 5 == 4:
                    calls.append(client.post("/v1/fields", files={"file": ("f.png", field)}))
                else:
                    crop = crops[i % len(crops)]
                    calls.append(client.post("/v1/cells", files=[("files", (crop.name, crop.read_bytes()))]))
            return await asyncio.gather(*calls)

    started = time.perf_counter()
    answers = asyncio.run(burst())
    seconds = time.perf_counter() - started
    assert [a.status_code for a in answers] == [200] * 100, {a.status_code for a in answers}
    for answer in answers:
        body = answer.json()
        if "summary" in body:
            assert body["summary"] == alone_field["summary"] and body["cells"] == alone_field["cells"]
        else:
            (cell,) = body["cells"]
            assert cell["probability"] == pytest.approx(alone_cells[cell["filename"]], abs=1e-6)
    assert seconds < 60


def test_one_json_access_log_line_per_request(service: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="blastscan.deploy.access"):
        httpx.get(f"{service}/healthz")
        httpx.post(f"{service}/v1/cells", files=[("files", ("notes.txt", b"not an image"))])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the line is written once the answer has gone
            lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "blastscan.deploy.access"]
            if len(lines) >= 2:
                break
            time.sleep(0.05)
    first, second = lines[:2]
    assert set(first) == {"method", "path", "status", "ms", "bytes", "request_bytes", "client"}
    assert (first["method"], first["path"], first["status"]) == ("GET", "/healthz", 200)
    assert (second["method"], second["path"], second["status"]) == ("POST", "/v1/cells", 422)
    assert first["bytes"] > 0 and second["request_bytes"] > len(b"not an image") and first["ms"] >= 0
    assert first["client"].startswith("127.0.0.1:")


def test_the_page_is_self_contained_and_carries_the_disclaimer(service: str) -> None:
    answer = httpx.get(f"{service}/")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert DISCLAIMER in page and "stain_run" in page and "{{" not in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    policy = dict(part.strip().split(" ", 1) for part in answer.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"].startswith("'sha256-")  # only the page's own script, by its hash


def test_openapi_docs_list_every_endpoint(service: str) -> None:
    assert httpx.get(f"{service}/docs").status_code == 200
    schema = httpx.get(f"{service}/openapi.json").json()
    assert {"/healthz", "/v1/model", "/v1/cells", "/v1/fields"} <= set(schema["paths"])
    assert DISCLAIMER in schema["info"]["description"]


def test_the_deploy_layer_imports_no_torch() -> None:
    code = (
        "import sys; import blastscan.deploy.service, blastscan.deploy.uploads; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
