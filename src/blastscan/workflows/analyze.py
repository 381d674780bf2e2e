"""`blastscan analyze`: read whole smear fields with a trained run, one output folder per field.

Per field `<out>/<field>/`: `cells.csv` (id, centroid, box, area, probability, call, border flag), `overlay.png`,
`summary.json` (leukocytes, blasts, blast percentage with its Wilson interval, the smear call) and `page.html` (one
self-contained page for a reviewer). For the whole call: `<out>/summary.csv` (one row per field), `<out>/index.html`
and, when some fields could not be read, `<out>/unreadable.csv`. Fields are streamed one at a time (memory does not
grow with their number); a field that cannot be read is listed, not fatal. Nothing is written outside `out`.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blastscan.data.images import load_rgb
from blastscan.errors import BlastscanError, DatasetError
from blastscan.inference import Predictor
from blastscan.runs import RunFolder, write_json
from blastscan.smear.analysis import DEFAULT_SMEAR_THRESHOLD, FieldAnalysis, FieldAnalyzer
from blastscan.smear.framing import Framing, measure_framing
from blastscan.smear.render import field_page, folder_page, overlay_image
from blastscan.workflows.predict import iter_sources
from blastscan.workflows.thresholds import ensure_operating_points

__all__ = ["AnalyzeResult", "analyze", "field_analyzer", "run_framing"]

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


def run_framing(run: RunFolder) -> Framing:
    """How the run's training images frame their cell (measured on a sample of its training split)."""
    manifest = run.manifest()
    paths = manifest.absolute_paths()
    rows = run.rows("train", manifest)
    return measure_framing([paths[i] for i in rows])


def field_analyzer(
    run: RunFolder,
    device: str = "auto",
    cell_threshold: float | None = None,
    smear_threshold: float | None = None,
    red_cell_diameter: float | None = None,
) -> FieldAnalyzer:
    """A FieldAnalyzer for a run: its network, its training framing, its validation-chosen cell threshold."""
    predictor = Predictor.from_run(run, device=device)
    if cell_threshold is None:
        cell_threshold = float(ensure_operating_points(run, predictor)["threshold"])
    return FieldAnalyzer(
        predictor,
        run_framing(run),
        cell_threshold,
        DEFAULT_SMEAR_THRESHOLD if smear_threshold is None else smear_threshold,
        red_cell_diameter,
    )


def _unique_names(paths: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(path, output folder name) pairs: the file stem, made unique with -2, -3... when stems repeat."""
    seen: dict[str, int] = {}
    for path in paths:
        stem = Path(path).stem or "field"
        seen[stem] = seen.get(stem, 0) + 1
        yield path, stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"


def write_field(folder: Path, name: str, image: Any, analysis: FieldAnalysis, run_name: str) -> None:
    """The four files of one analysed field."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "cells.csv").open("w", newline="") as handle:
        columns = list(analysis.cells[0].row()) if analysis.cells else ["id"]
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(cell.row() for cell in analysis.cells)
    overlay = overlay_image(image, analysis)
    overlay.save(folder / "overlay.png")
    write_json(folder / "summary.json", {"field": name, "run": run_name, **analysis.summary()})
    (folder / "page.html").write_text(field_page(name, image, analysis, overlay, run_name), encoding="utf-8")


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
    run_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "auto",
    cell_threshold: float | None = None,
    smear_threshold: float | None = None,
    red_cell_diameter: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> AnalyzeResult:
    """Analyse every field `inputs` name (files, folders, globs) with a run; write the outputs under `out`.

    Raises DatasetError when no field could be read (the unreadable list is written first).
    """
    started = time.perf_counter()
    run = RunFolder.open(run_dir, need=("model_card", "weights"))
    analyzer = field_analyzer(run, device, cell_threshold, smear_threshold, red_cell_diameter)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = AnalyzeResult(out)
    for path, name in _unique_names(list(iter_sources(inputs))):
        field_started = time.perf_counter()
        try:
            image = load_rgb(path)
            analysis = analyzer.analyze(image)
        except (OSError, ValueError, BlastscanError) as exc:
            result.failures.append((path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        else:
            write_field(out / name, name, image, analysis, run.name)
            row = _summary_row(name, path, analysis, time.perf_counter() - field_started)
            row["page"] = f"{name}/page.html"
            result.rows.append(row)
        if progress is not None:
            progress(1)
    _write_folder_outputs(result, run.name, analyzer)
    result.seconds = time.perf_counter() - started
    if not result.rows:
        raise DatasetError(
            f"no field could be read ({len(result.failures)} unreadable, listed in {out / 'unreadable.csv'})"
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
