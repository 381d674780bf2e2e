"""The service's web page in headless Chromium (Playwright driving Debian's chromium): upload a real image, wait for
the result, and check what the page shows against the API's JSON for the same file.

A real ALL-IDB2 cell crop (a TIFF, which browsers cannot decode: the page reads its size from the header to choose
"cell"), a real ALL-IDB1 field (the overlay, the count, the table and the downloaded CSV), and a file that is not
an image (the service's message shown). The page must fetch nothing but this service.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from blastscan import DISCLAIMER
from browser import chromium

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium()
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, service: str) -> Iterator[Any]:
    """A fresh page on the service's `/`; after the test, no request may have left the service."""
    context = browser.new_context(accept_downloads=True)
    tab = context.new_page()
    elsewhere: list[str] = []
    tab.on("request", lambda r: None if r.url.startswith((service, "data:", "blob:")) else elsewhere.append(r.url))
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(f"{service}/")
    yield tab
    context.close()
    assert not elsewhere, elsewhere
    assert not errors, errors


def _upload(page: Any, path: Path) -> None:
    page.set_input_files("#file", str(path))
    # A selector, not wait_for_function: the page's Content-Security-Policy forbids the eval that one needs.
    page.wait_for_selector("body[data-state=done], body[data-state=error]", state="attached", timeout=120_000)


def test_the_page_scores_a_real_cell_as_the_api_does(page: Any, service: str, crops: list[Path]) -> None:
    assert page.is_visible("#disclaimer") and page.inner_text("#disclaimer") == DISCLAIMER
    crop = crops[0]
    _upload(page, crop)
    assert page.evaluate("document.body.dataset.state") == "done", page.inner_text("#error")
    api = httpx.post(f"{service}/v1/cells", files=[("files", (crop.name, crop.read_bytes()))]).json()
    (expected,) = api["cells"]
    cells = page.locator("#cell-table tbody tr td")
    assert cells.nth(0).inner_text() == crop.name
    assert cells.nth(2).inner_text() == f"{expected['probability']:.4f}"
    assert cells.nth(3).inner_text() == expected["call"]
    assert cells.nth(4).inner_text() == ("review" if expected["out_of_distribution"] else "yes")
    assert page.inner_text("#cell-threshold") == f"{api['threshold']:.4f}"
    assert page.is_visible("#download") and not page.is_visible("#field-result")


def test_the_page_reads_a_real_field_as_the_api_does(page: Any, service: str, allidb1_dir: Path) -> None:
    field = allidb1_dir / "im" / "Im006_1.jpg"
    _upload(page, field)
    assert page.evaluate("document.body.dataset.state") == "done", page.inner_text("#error")
    api = httpx.post(f"{service}/v1/fields", files={"file": (field.name, field.read_bytes())}, timeout=120).json()
    summary = api["summary"]
    assert page.inner_text("#leukocytes") == str(summary["leukocytes_counted"])
    assert page.inner_text("#blasts") == str(summary["blasts"])
    assert page.inner_text("#blast-percentage") == f"{summary['blast_percentage']:.2f}%"
    low, high = summary["blast_percentage_ci95"]
    assert page.inner_text("#blast-ci") == f"{low:.2f}% to {high:.2f}%"
    assert page.inner_text("#smear-call") == summary["smear_call"]
    assert page.inner_text("#border-cells") == str(summary["border_cells"])
    assert page.evaluate("document.getElementById('overlay').naturalWidth") > 0  # the overlay PNG decoded
    rows = page.locator("#field-table tbody tr")
    assert rows.count() == len(api["cells"])
    for i, cell in enumerate(api["cells"]):
        shown = rows.nth(i).locator("td")
        assert shown.nth(0).inner_text() == str(cell["id"])
        assert shown.nth(4).inner_text() == f"{cell['probability']:.4f}"
        assert shown.nth(5).inner_text() == cell["call"]

    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "Im006_1_cells.csv"
    table = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(table) == len(api["cells"])
    for got, cell in zip(table, api["cells"], strict=True):
        assert list(got) == api["columns"]
        for column in api["columns"]:
            value = cell[column]
            if isinstance(value, bool):
                assert got[column] == str(value).lower()
            elif isinstance(value, int | float):
                assert float(got[column]) == value
            else:
                assert got[column] == value


def test_the_page_tells_the_user_to_review_an_image_unlike_the_training_cells(
    page: Any, service: str, tmp_path: Path
) -> None:
    from PIL import Image

    from blastscan.workflows.evaluate_ood import photograph_crops

    photo = tmp_path / "not_a_cell.png"
    Image.fromarray(photograph_crops(1, seed=3)[0]).resize((200, 200)).save(photo)
    api = httpx.post(f"{service}/v1/cells", files=[("files", (photo.name, photo.read_bytes()))]).json()
    assert api["cells"][0]["out_of_distribution"], api  # a photograph of something else entirely
    _upload(page, photo)
    assert page.evaluate("document.body.dataset.state") == "done", page.inner_text("#error")
    assert page.locator("#cell-table tbody tr td").nth(4).inner_text() == "review"
    assert "look unlike the training cells" in page.inner_text("#cell-ood-summary")


def test_the_page_shows_the_services_message_for_a_file_it_refuses(page: Any, tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("this is not a picture\n")
    _upload(page, notes)
    assert page.evaluate("document.body.dataset.state") == "error"
    message = page.inner_text("#error")
    assert "notes.png" in message and "not a readable image" in message
    assert not page.is_visible("#download")


def test_the_api_docs_render_offline_from_the_service_alone(browser: Any, service: str) -> None:
    context = browser.new_context()
    tab = context.new_page()
    elsewhere: list[str] = []
    tab.on("request", lambda r: None if r.url.startswith((service, "data:", "blob:")) else elsewhere.append(r.url))
    tab.goto(f"{service}/docs")
    tab.wait_for_selector(".opblock-summary-path", timeout=60_000)  # Swagger UI ran and read /openapi.json
    paths = {element.inner_text().strip() for element in tab.query_selector_all(".opblock-summary-path")}
    context.close()
    assert {"/v1/cells", "/v1/fields", "/v1/model", "/healthz"} <= paths, paths
    assert not elsewhere, elsewhere
