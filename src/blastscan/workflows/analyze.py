"""`blastscan analyze`: read whole smear fields with a trained run or an exported model, one output folder per field.

Per field `<out>/<field>/`: `cells.csv` (id, centroid, box, area, probability, call, border flag), `overlay.png`,
`summary.json` (leukocytes, blasts, blast percentage with its Wilson interval, the smear call) and `page.html` (one
self-contained page for a reviewer). For the whole call: `<out>/summary.csv` (one row per field), `<out>/index.html`,
`<out>/analysis.json` (the settings) and, when some fields could not be read, `<out>/unreadable.csv`. Fields are
streamed one at a time (memory does not grow with their number). A field that cannot be analysed is listed with a
one-line reason, not fatal: an unreadable file, a decompression bomb, an image smaller than `MIN_FIELD_SIDE`, or one
without colour (the finder tells nuclei by their stain's colour, so a grey-scale field would read as empty). The
overlays of an earlier call into the same `out` are not inputs. Nothing is written outside `out`, except that a
run used for the first time stores its validation-chosen threshold (`operating_points.json`, and the image cache of
its validation images when missing) and its ONNX export (`onnx/`), as `predict` does. An export folder is read as
it is, with no torch.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blastscan.data.images import load_rgb
from blastscan.errors import BlastscanError, DatasetError
from blastscan.runs import RunFolder, write_json
from blastscan.smear.analysis import (
    CELL_COLUMNS,
    DEFAULT_SMEAR_THRESHOLD,
    MIN_FIELD_SIDE,
    FieldAnalysis,
    FieldAnalyzer,
    StageClock,
    check_field,
    no_clock,
)
from blastscan.smear.render import field_page, folder_page, overlay_image, save_png
from blastscan.workflows.loaded_model import LoadedModel, load_model, run_framing
from blastscan.workflows.predict import iter_sources

__all__ = [
    "MIN_FIELD_SIDE",
    "AnalyzeResult",
    "analyze",
    "field_analyzer",
    "load_field",
    "open_analyzer",
    "run_framing",
    "write_field",
]


SUMMARY_COLUMNS = (
    "field",
    "path",
    "width",
    "height",
    "cells_found",
    "leukocytes_counted",
    "border_cells",
    "blasts",
    "blast_percentage",
    "ci_low",
    "ci_high",
    "smear_call",
    "seconds",
)


@dataclass
class AnalyzeResult:
    """What `analyze` wrote: one summary row per field analysed, and the fields that could not be read."""

    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def field_analyzer(
    model: str | Path | RunFolder | LoadedModel,
    device: str = "auto",
    cell_threshold: float | None = None,
    smear_threshold: float | None = None,
    red_cell_diameter: float | None = None,
    backend: str = "auto",
    int8: bool = False,
    site: str | None = None,
) -> FieldAnalyzer:
    """A FieldAnalyzer for a run or an exported model: its network, its training framing, its validation-chosen
    cell threshold (or the site profile's, with `site`; unless `cell_threshold` is given)."""
    if not isinstance(model, LoadedModel):
        path = model.path if isinstance(model, RunFolder) else model
        model = load_model(path, device=device, backend=backend, int8=int8, site=site)
    return FieldAnalyzer(
        model.predictor,
        model.framing(),
        model.threshold if cell_threshold is None else cell_threshold,
        DEFAULT_SMEAR_THRESHOLD if smear_threshold is None else smear_threshold,
        red_cell_diameter,
    )


def open_analyzer(
    model: str | Path,
    device: str = "auto",
    cell_threshold: float | None = None,
    smear_threshold: float | None = None,
    backend: str = "auto",
    int8: bool = False,
    site: str | None = None,
) -> tuple[FieldAnalyzer, dict[str, Any]]:
    """The FieldAnalyzer of a run folder or an exported model, and its public model card (name, classes, input
    size, mean, std, the validation-chosen threshold or the site profile's, backend, where it came from, the
    out-of-distribution flag): what the service answers with."""
    loaded = load_model(model, device=device, backend=backend, int8=int8, site=site)
    analyzer = field_analyzer(loaded, cell_threshold=cell_threshold, smear_threshold=smear_threshold)
    card = {
        **loaded.card,
        "threshold": analyzer.cell_threshold,
        "smear_threshold_percentage": round(100 * analyzer.smear_threshold, 2),
        "framing_cell_fraction": analyzer.framing.cell_fraction,
    }
    return analyzer, card


def _unique_names(paths: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(path, output folder name) pairs: the file stem, made unique with -2, -3... when stems repeat (a suffixed
    name never takes the name of a later field's own stem: `a/x`, `b/x`, `c/x-2` give x, x-2, x-2-2)."""
    taken: set[str] = set()
    for path in paths:
        stem = Path(path).stem or "field"
        name, number = stem, 1
        # Case-folded so two names never share a folder on a case-insensitive file system (macOS, Windows).
        while name.casefold() in taken:
            number += 1
            name = f"{stem}-{number}"
        taken.add(name.casefold())
        yield path, name


def _earlier_output(path: str, out: Path) -> bool:
    """True for an overlay an earlier call wrote under `out` (`out/<field>/overlay.png` beside its summary.json):
    with `out` inside an input folder, a second call must not read its own pictures as fields."""
    candidate = Path(os.path.realpath(path))
    return (
        candidate.name == "overlay.png"
        and candidate.parent.parent == out
        and (candidate.parent / "summary.json").is_file()
    )


def load_field(path: str | Path) -> np.ndarray:
    """A field image as (H, W, 3) uint8 RGB; DatasetError naming the file when it cannot be analysed (unreadable,
    too large, smaller than MIN_FIELD_SIDE, or without colour: `check_field`)."""
    return check_field(load_rgb(path), str(path))


def _reason(path: str, exc: Exception) -> str:
    """One line saying why a field was not analysed, without the path the error message may start with (the
    caller lists the path beside it)."""
    text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.removeprefix(f"{Path(path)}: ")


def write_field(folder: Path, name: str, image: Any, analysis: FieldAnalysis, run_name: str) -> None:
    """The four files of one analysed field."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "cells.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CELL_COLUMNS)
        writer.writeheader()
        writer.writerows(cell.row() for cell in analysis.cells)
    save_png(overlay_image(image, analysis), folder / "overlay.png")
    write_json(folder / "summary.json", {"field": name, "run": run_name, **analysis.summary()})
    (folder / "page.html").write_text(field_page(name, image, analysis, run_name), encoding="utf-8")


def _summary_row(name: str, path: str, analysis: FieldAnalysis, seconds: float) -> dict[str, Any]:
    summary = analysis.summary()
    ci = summary["blast_percentage_ci95"] or [None, None]
    return {
        "field": name,
        "path": path,
        "width": summary["width"],
        "height": summary["height"],
        "cells_found": summary["cells_found"],
        "leukocytes_counted": summary["leukocytes_counted"],
        "border_cells": summary["border_cells"],
        "blasts": summary["blasts"],
        "blast_percentage": summary["blast_percentage"],
        "ci_low": ci[0],
        "ci_high": ci[1],
        "smear_call": summary["smear_call"],
        "seconds": round(seconds, 3),
    }


def analyze(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "auto",
    cell_threshold: float | None = None,
    smear_threshold: float | None = None,
    red_cell_diameter: float | None = None,
    progress: Callable[[int], None] | None = None,
    clock: StageClock = no_clock,
    backend: str = "auto",
    int8: bool = False,
    site: str | None = None,
) -> AnalyzeResult:
    """Analyse every field `inputs` name (files, folders, globs) with a run or an exported model (`load_model`);
    write the outputs under `out`.

    `clock` times the stages: "setup" (the run's network, framing and threshold: once per call), per field
    "decode", the FieldAnalyzer's "find", "crop", "score", "count", and "write" (its four files), then "index"
    (summary.csv, index.html, analysis.json). Raises DatasetError when no field could be analysed (the unreadable
    list is written first).
    """
    started = time.perf_counter()
    out = Path(out)
    sources = list(iter_sources(inputs))
    with clock("setup"):
        model = load_model(model_dir, device=device, backend=backend, int8=int8, site=site)
        analyzer = field_analyzer(
            model, cell_threshold=cell_threshold, smear_threshold=smear_threshold, red_cell_diameter=red_cell_diameter
        )
    out.mkdir(parents=True, exist_ok=True)
    resolved_out = Path(os.path.realpath(out))
    result = AnalyzeResult(out)
    fields = [p for p in sources if not _earlier_output(p, resolved_out)]
    if progress is not None and len(fields) < len(sources):
        progress(len(sources) - len(fields))  # the caller counted every source
    for path, name in _unique_names(fields):
        field_started = time.perf_counter()
        try:
            with clock("decode"):
                image = load_field(path)
            analysis = analyzer.analyze(image, clock)
        except (OSError, ValueError, BlastscanError) as exc:
            result.failures.append((path, _reason(path, exc)))
        else:
            with clock("write"):
                write_field(out / name, name, image, analysis, model.name)
            row = _summary_row(name, path, analysis, time.perf_counter() - field_started)
            row["page"] = f"{name}/page.html"
            result.rows.append(row)
        if progress is not None:
            progress(1)
    with clock("index"):
        _write_folder_outputs(result, model.name, analyzer)
    result.seconds = time.perf_counter() - started
    if not result.rows:
        raise DatasetError(
            f"no field could be analysed ({len(result.failures)} listed with the reason in {out / 'unreadable.csv'})"
            if result.failures
            else "no image found in the inputs; pass field images, folders or globs"
        )
    return result


def _write_folder_outputs(result: AnalyzeResult, run_name: str, analyzer: FieldAnalyzer) -> None:
    out = result.out
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    if result.failures:
        with (out / "unreadable.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(result.failures)
    rows = [
        {**row, "ci": f"{row['ci_low']}-{row['ci_high']}%" if row["ci_low"] is not None else ""} for row in result.rows
    ]
    (out / "index.html").write_text(folder_page(rows, result.failures, run_name), encoding="utf-8")
    settings = {
        "run": run_name,
        "cell_threshold": analyzer.cell_threshold,
        "smear_threshold": analyzer.smear_threshold,
        "framing": {
            "cell_fraction": analyzer.framing.cell_fraction,
            "measured_on": analyzer.framing.measured_on,
            "source": analyzer.framing.source,
        },
        "fields": len(result.rows),
        "unreadable": len(result.failures),
    }
    (out / "analysis.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
