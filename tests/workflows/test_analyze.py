"""`blastscan analyze` end to end: SYNTHETIC fields with known leukocytes, a real ALL-IDB1 field, and bad inputs.

Every output is checked against the others (cells.csv, summary.json, summary.csv, the pages), the blast share and
its Wilson interval are recomputed from the counts, and bad inputs must each give a clear result without writing
anything outside `--out`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from blastscan import DISCLAIMER
from blastscan.cli import app
from blastscan.data.images import max_image_pixels
from blastscan.data.synthetic import draw_field, generate_fields
from blastscan.errors import DatasetError
from blastscan.inference import Predictor
from blastscan.runs import RunFolder
from blastscan.smear.analysis import CELL_COLUMNS, SCORE_BATCH, FieldAnalyzer
from blastscan.smear.framing import Framing
from blastscan.workflows import loaded_model as loaded_model_module
from blastscan.workflows.analyze import analyze
from blastscan.workflows.thresholds import ensure_operating_points
from browser import chromium, run_chromium

runner = CliRunner()
FIELD_FILES = ("cells.csv", "overlay.png", "summary.json", "page.html")


@pytest.fixture(scope="module")
def run(stain_run: Path) -> Path:
    """The tiny real run, with its operating points already stored: later calls must not write into it."""
    ensure_operating_points(RunFolder.open(stain_run), Predictor.from_run(stain_run, device="cpu"))
    return stain_run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four SYNTHETIC 640x480 fields (a touching pair and a border cell in each) and their truth."""
    return generate_fields(tmp_path_factory.mktemp("synthetic") / "set", 4, seed=0)


@pytest.fixture(scope="module")
def analysed(run: Path, synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`analyze` over the synthetic fields folder; its output folder."""
    out = tmp_path_factory.mktemp("analysed") / "out"
    result = analyze(run, [synthetic / "fields"], out, device="cpu")
    assert len(result.rows) == 4 and not result.failures
    return out


def _snapshot(folder: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` (except `skip`) with its size and modification time."""
    seen = {}
    for current, dirs, files in os.walk(folder):
        if skip is not None:
            dirs[:] = [d for d in dirs if Path(current, d) != skip]
        for name in dirs + files:
            path = Path(current, name)
            stat = path.lstat()
            seen[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return seen


def _wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's 95% interval, written out (independent of the scipy call analyze makes), in percent."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def _cells(folder: Path) -> list[dict[str, str]]:
    with (folder / "cells.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == CELL_COLUMNS
        return list(reader)


def _check_self_contained(page: str) -> None:
    assert not re.search(r"https?://", page), "the page references the network"
    assert 'src="/' not in page and "<script" not in page.lower()
    assert re.search(r'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'', page)
    assert DISCLAIMER in page
    for source in re.findall(r'src="([^"]*)"', page):
        assert source.startswith("data:image/"), source[:40]


def test_every_output_exists_and_agrees_with_the_others(analysed: Path, synthetic: Path) -> None:
    summary = pd.read_csv(analysed / "summary.csv")
    stems = sorted(p.stem for p in (synthetic / "fields").glob("*.png"))
    assert sorted(summary["field"]) == stems  # one row per field
    settings = json.loads((analysed / "analysis.json").read_text())
    assert settings["fields"] == 4 and settings["unreadable"] == 0 and settings["framing"]["measured_on"] > 0
    assert not (analysed / "unreadable.csv").exists()
    for row in summary.to_dict("records"):
        folder = analysed / row["field"]
        for name in FIELD_FILES:
            assert (folder / name).is_file() and (folder / name).stat().st_size > 0, folder / name
        field = json.loads((folder / "summary.json").read_text())
        cells = _cells(folder)
        assert field["field"] == row["field"] and field["run"] == settings["run"]
        assert len(cells) == field["cells_found"] == row["cells_found"]
        complete = [c for c in cells if c["touches_border"] == "False"]
        blasts = sum(c["call"] == "blast" for c in complete)
        assert field["leukocytes_counted"] == row["leukocytes_counted"] == len(complete)
        assert field["border_cells"] == row["border_cells"] == len(cells) - len(complete)
        assert field["blasts"] == row["blasts"] == blasts
        for cell in cells:  # the call is the probability against the run's threshold
            assert (cell["call"] == "blast") == (float(cell["probability"]) >= field["cell_threshold"])
        if complete:
            share = 100 * blasts / len(complete)
            assert field["blast_percentage"] == pytest.approx(share, abs=0.01) == row["blast_percentage"]
            low, high = field["blast_percentage_ci95"]
            assert (low, high) == pytest.approx(_wilson(blasts, len(complete)), abs=0.01)
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
            assert low <= share <= high
            leukemic = share >= field["smear_threshold_percentage"]
            assert field["smear_call"] == row["smear_call"] == ("leukemic" if leukemic else "not leukemic")
        overlay = np.asarray(Image.open(folder / "overlay.png"))
        picture = np.asarray(Image.open(synthetic / "fields" / f"{row['field']}.png").convert("RGB"))
        assert overlay.shape == picture.shape == (field["height"], field["width"], 3) == (480, 640, 3)
        # Lossless and in RGB order: away from the boxes and labels the overlay is the field, pixel for pixel.
        assert np.mean(np.all(overlay == picture, axis=2)) > 0.8
    index = (analysed / "index.html").read_text()
    for stem in stems:
        assert f'href="{stem}/page.html"' in index


def test_the_border_cell_is_flagged_and_not_counted(analysed: Path, synthetic: Path) -> None:
    truth = pd.read_csv(synthetic / "cells.csv")
    for stem, cells in truth.groupby("field"):
        border = cells[cells["touches_border"]].iloc[0]
        found = _cells(analysed / stem)
        holding = [
            c for c in found if int(c["x0"]) <= border.x < int(c["x1"]) and int(c["y0"]) <= border.y < int(c["y1"])
        ]
        assert len(holding) == 1 and holding[0]["touches_border"] == "True", stem
        field = json.loads((analysed / stem / "summary.json").read_text())
        assert field["border_cells"] >= 1 and field["leukocytes_counted"] == len(found) - field["border_cells"]


def test_the_pages_are_self_contained(analysed: Path) -> None:
    pages = sorted(analysed.glob("*/page.html"))
    assert len(pages) == 4
    for page in pages:
        text = page.read_text(encoding="utf-8")
        _check_self_contained(text)
        assert text.count('<figure class="') == json.loads((page.parent / "summary.json").read_text())["cells_found"]
    _check_self_contained((analysed / "index.html").read_text(encoding="utf-8"))


def test_a_glob_and_a_folder_holding_this_calls_output(
    run: Path, synthetic: Path, analysed: Path, tmp_path: Path
) -> None:
    """A glob names the same fields as their folder; a second call into an `out` inside the input folder does not
    read the first call's overlays as fields."""
    fields = tmp_path / "fields"
    fields.mkdir()
    for path in (synthetic / "fields").glob("*.png"):
        (fields / path.name).symlink_to(path)
    globbed = analyze(run, [str(fields / "SYN-FIELD-00[0-1]_*.png")], fields / "out", device="cpu")
    assert [row["field"] for row in globbed.rows] == ["SYN-FIELD-000_1", "SYN-FIELD-001_1"]
    before = pd.read_csv(analysed / "summary.csv").set_index("field")
    for row in globbed.rows:  # the same field gives the same result whatever named it
        assert row["cells_found"] == before.loc[row["field"], "cells_found"]
        assert row["blasts"] == before.loc[row["field"], "blasts"]
    again = analyze(run, [fields], fields / "out", device="cpu")
    assert sorted(row["field"] for row in again.rows) == sorted(before.index)
    assert not again.failures


def test_same_stems_get_their_own_folders_and_the_framing_is_measured_once(
    run: Path, synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = synthetic / "fields" / "SYN-FIELD-003_0.png"
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "x-2.png"]
    for path in paths:
        path.parent.mkdir()
        path.symlink_to(source)
    measured = []
    real_measure = loaded_model_module.measure_framing
    monkeypatch.setattr(loaded_model_module, "measure_framing", lambda p: measured.append(1) or real_measure(p))
    stages: list[str] = []

    @contextlib.contextmanager
    def clock(stage: str) -> Iterator[None]:
        stages.append(stage)
        yield

    result = analyze(run, [str(p) for p in paths], tmp_path / "out", device="cpu", clock=clock)
    assert [row["field"] for row in result.rows] == ["x", "x-2", "x-2-2"]
    assert [row["path"] for row in result.rows] == [str(p) for p in paths]
    for name in ("x", "x-2", "x-2-2"):
        assert json.loads((tmp_path / "out" / name / "summary.json").read_text())["field"] == name
    assert len(measured) == 1  # once per call, not per field
    assert {stage: stages.count(stage) for stage in set(stages)} == {
        "setup": 1, "decode": 3, "find": 3, "crop": 3, "score": 3, "count": 3, "write": 3, "index": 1,
    }  # fmt: skip


def test_crops_are_scored_in_batches_of_few_shapes_with_the_same_scores(run: Path) -> None:
    predictor = Predictor.from_run(run, device="cpu")
    analyzer = FieldAnalyzer(predictor, Framing(0.5, 0, "test"), 0.5)
    size = predictor.image_size
    crops = np.random.default_rng(0).integers(0, 256, (SCORE_BATCH + 3, size, size, 3), dtype=np.uint8)
    shapes = []
    score_batch = predictor.score_prepared_batch

    def recorded(images: np.ndarray, *args: object, **kwargs: object) -> object:
        shapes.append(images.shape)
        return score_batch(images, *args, **kwargs)

    predictor.score_prepared_batch = recorded  # type: ignore[method-assign]
    scores = analyzer.score(crops)
    assert shapes == [(SCORE_BATCH, size, size, 3), (4, size, size, 3)]  # the rest padded to a power of two
    shapes.clear()
    analyzer.score(crops[:1])
    assert shapes == [(1, size, size, 3)]  # one crop, one forward of one
    assert scores == pytest.approx(predictor.predict_prepared(crops), abs=1e-6)
    assert analyzer.score(crops[:0]).shape == (0,)


def test_the_command_prints_one_line_per_field_and_exits_0(run: Path, synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    done = subprocess.run(
        [sys.executable, "-m", "blastscan", "analyze", str(run), str(synthetic / "fields"), "--out", str(out),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    summary = pd.read_csv(out / "summary.csv")
    for row in summary.to_dict("records"):
        said = [line for line in lines if line.startswith(f"{row['field']}: ")]
        assert len(said) == 1, done.stdout
        assert f"{row['leukocytes_counted']} leukocytes, {row['blasts']} blasts" in said[0]
        assert said[0].endswith(f"-> {row['smear_call']}")
    # The closing line may be wrapped (rich folds long lines at 80 columns when not writing to a terminal).
    closing = " ".join(" ".join(lines[len(summary) :]).split())
    assert closing.startswith("wrote") and "(4 field(s), 0 not analysed" in closing


def test_a_real_allidb1_field_end_to_end(run: Path, allidb1_dir: Path, tmp_path: Path) -> None:
    field = allidb1_dir / "im" / "Im006_1.jpg"
    result = analyze(run, [field], tmp_path / "out", device="cpu")
    (row,) = result.rows
    folder = tmp_path / "out" / "Im006_1"
    summary = json.loads((folder / "summary.json").read_text())
    with Image.open(field) as image, Image.open(folder / "overlay.png") as overlay:
        assert overlay.size == image.size == (summary["width"], summary["height"])
    assert summary["cells_found"] == row["cells_found"] == len(_cells(folder)) >= 1
    assert summary["red_cell_diameter_px"] > 20
    _check_self_contained((folder / "page.html").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------- bad inputs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png(path: Path, width: int, height: int, depth: int, colour: int, rows: bytes) -> Path:
    """A PNG written byte by byte: any bit depth, and a header that may claim more pixels than the data holds."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _bad_inputs(folder: Path, good: np.ndarray) -> None:
    """The issue's list of awkward inputs, beside one good field (`good.png`)."""
    folder.mkdir()
    h, w = good.shape[:2]
    Image.fromarray(good).save(folder / "good.png")
    Image.fromarray(good).convert("L").save(folder / "grey.png")
    wide = good.astype(">u2") * 257  # the same field at 16 bits per channel: decodes to the same pixels
    _write_png(folder / "colour16.png", w, h, 16, 2, b"".join(b"\0" + wide[r].tobytes() for r in range(h)))
    grey16 = (good.mean(axis=2) * 257).astype(">u2")
    _write_png(folder / "grey16.png", w, h, 16, 0, b"".join(b"\0" + grey16[r].tobytes() for r in range(h)))
    Image.fromarray(np.dstack([good, np.full((h, w), 255, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(good[:20, :20]).save(folder / "tiny.png")
    empty = draw_field(np.random.default_rng(5), 640, 480, kinds=[], touching_pair=False, border_cell=False)
    Image.fromarray(empty.image).save(folder / "empty.png")
    Image.fromarray(np.full((480, 640, 3), (228, 214, 222), np.uint8)).save(folder / "background.png")
    (folder / "notes.jpg").write_text("this is not a picture\n")
    side = math.isqrt(max_image_pixels()) + 1
    _write_png(folder / "bomb.png", side, side, 8, 2, b"\0" * 64)


UNREADABLE = {
    "grey.png": "no colour",
    "grey16.png": "no colour",
    "tiny.png": "too small",
    "notes.jpg": "not a readable image",
    "bomb.png": "decompression bomb",
}


def test_bad_inputs_each_give_a_clear_result_and_nothing_is_written_outside_out(
    run: Path, synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs, out, cwd = tmp_path / "inputs", tmp_path / "out", tmp_path / "cwd"
    _bad_inputs(inputs, np.asarray(Image.open(synthetic / "fields" / "SYN-FIELD-000_1.png").convert("RGB")))
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a relative write would land here
    before = (_snapshot(inputs), _snapshot(run.parent), _snapshot(tmp_path, skip=out))
    result = analyze(run, [inputs], out, device="cpu")
    assert (_snapshot(inputs), _snapshot(run.parent), _snapshot(tmp_path, skip=out)) == before
    assert not any(cwd.iterdir())

    listed = pd.read_csv(out / "unreadable.csv")
    assert sorted(Path(p).name for p in listed["path"]) == sorted(UNREADABLE)
    for path, reason in zip(listed["path"], listed["reason"], strict=True):
        assert UNREADABLE[Path(path).name] in reason and "\n" not in reason
    assert sorted(Path(p).name for p, _ in result.failures) == sorted(UNREADABLE)

    rows = {row["field"]: row for row in result.rows}
    assert sorted(rows) == ["background", "colour16", "empty", "good", "rgba"]
    for same in ("colour16", "rgba"):  # the same pixels in another format give the same analysis
        assert _cells(out / same) == _cells(out / "good")
    assert rows["good"]["cells_found"] >= 3
    for nothing in ("background", "empty"):
        summary = json.loads((out / nothing / "summary.json").read_text())
        assert summary["cells_found"] == summary["leukocytes_counted"] == 0
        assert summary["smear_call"] == rows[nothing]["smear_call"] == "no leukocytes found"
        assert summary["blast_percentage"] is None and summary["blast_percentage_ci95"] is None
        assert _cells(out / nothing) == []  # the header alone
        page = (out / nothing / "page.html").read_text(encoding="utf-8")
        assert "No leukocytes were found" in page
        _check_self_contained(page)
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "could not be analysed" in index and "bomb.png" in index and "grey.png" in index


def test_when_no_field_can_be_read_analyze_raises_after_listing_them(run: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "notes.jpg").write_text("this is not a picture\n")
    side = math.isqrt(max_image_pixels()) + 1
    _write_png(inputs / "bomb.png", side, side, 8, 2, b"\0" * 64)
    with pytest.raises(DatasetError, match="no field could be analysed"):
        analyze(run, [inputs], tmp_path / "out", device="cpu")
    assert sorted(Path(p).name for p in pd.read_csv(tmp_path / "out" / "unreadable.csv")["path"]) == [
        "bomb.png",
        "notes.jpg",
    ]

    cli = runner.invoke(app, ["analyze", str(run), str(inputs), "--out", str(tmp_path / "cli"), "--device", "cpu"])
    assert cli.exit_code != 0
    errors = [line for line in cli.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no field could be analysed" in errors[0] and "unreadable.csv" in errors[0]
    assert "Traceback" not in cli.output


@pytest.mark.slow
def test_a_field_page_renders_in_headless_chromium(analysed: Path, tmp_path: Path) -> None:
    """The review page in a real browser: every picture decodes from its data URI and nothing is blocked."""
    binary = chromium()
    page = next(p for p in sorted(analysed.glob("*/page.html")) if _cells(p.parent))
    cells = len(_cells(page.parent))
    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.findall(r"<img[^>]*>", dom.stdout)
    assert len(images) == 2 + cells  # the field, the overlay, one gallery picture per cell
    assert all('src="data:image/' in tag for tag in images)
    assert "Content Security Policy" not in dom.stderr and "Refused to load" not in dom.stderr
    shot = tmp_path / "page.png"
    run_chromium(
        binary, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2400", page.resolve().as_uri()
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # Red cells are pink: a decoded field picture leaves many pink pixels, a broken one none.
    pink = (
        (pixels[..., 0] > 180)
        & (pixels[..., 1] < 170)
        & (pixels[..., 2] > 140)
        & (pixels[..., 0] > pixels[..., 1] + 30)
    ).sum()
    assert pink > 10_000, f"only {pink} pink pixels: the field pictures did not render"
