"""Reading a whole smear field: find every leukocyte, score each with a trained classifier, count, call the smear.

`FieldAnalyzer(predictor, framing, cell_threshold, smear_threshold).analyze(image)` finds the leukocytes
(`blastscan.smear.find`), cuts each out framed as the classifier's training images were (`blastscan.smear.framing`),
scores all of a field's cells in one batch with the `Predictor`, and counts. The blast percentage counts only cells
wholly inside the field (a cell cut by the border is scored and listed, flagged, but a hematologist would not count
half a cell); its 95% interval is Wilson's (`scipy.stats.binomtest`). The smear is called `leukemic` when the blast
share reaches `smear_threshold` (chosen on validation fields by `blastscan evaluate-fields`; the default is the
20% blast share of the WHO criterion for acute leukaemia).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest

from blastscan.errors import DatasetError
from blastscan.inference import Predictor
from blastscan.smear.find import FieldFinding, find_leukocytes
from blastscan.smear.framing import Framing, crop_cells

__all__ = [
    "CELL_COLUMNS",
    "DEFAULT_SMEAR_THRESHOLD",
    "SCORE_BATCH",
    "FieldAnalysis",
    "FieldAnalyzer",
    "ScoredCell",
    "SmearCall",
    "StageClock",
    "no_clock",
]

#: Blast share of the leukocytes at or above which a smear is called leukemic when no validated threshold is given.
DEFAULT_SMEAR_THRESHOLD = 0.2
#: The network scores a field's crops in batches of this many, the rest in one batch padded with blank crops to the
#: next power of two (1, 2, 4 or 8). Fields hold different numbers of cells, and on the CPU batches of changing size
#: kept growing resident memory (by about 1 GB over 80 batches of 1 to 40 crops, PyTorch 2.14); four shapes keep it
#: flat, and a single cell crop (the service) costs one forward pass of one crop, not of eight. A crop's score does
#: not depend on its batch.
SCORE_BATCH = 8
#: The columns of a field's cells.csv, in order (a field with no cell still gets the header).
CELL_COLUMNS = (
    "id",
    "x",
    "y",
    "x0",
    "y0",
    "x1",
    "y1",
    "area",
    "diameter",
    "probability",
    "call",
    "touches_border",
    "detection_score",
    "cell_found",
    "ood_score",
    "out_of_distribution",
)

#: Times a named stage: `with clock("find"): ...`. Callers that measure where the time goes (benchmarks) pass one.
StageClock = Callable[[str], AbstractContextManager[Any]]


#: A field's shorter side must reach this (pixels): a leukocyte with the glass around it needs at least as much.
MIN_FIELD_SIDE = 64
#: An image whose channels never differ by more than this (0-255) has no colour: grey-scale, or blank.
GREY_SPREAD = 4


def has_colour(image: np.ndarray) -> bool:
    """True when some pixel's channels differ by more than GREY_SPREAD (a strided sample of ~250,000 pixels: a
    stained smear has thousands of coloured pixels, so the sample cannot miss them all)."""
    h, w = image.shape[:2]
    step = max(1, int((h * w / 250_000) ** 0.5))
    sample = image[::step, ::step]
    return int((sample.max(axis=2).astype(np.int16) - sample.min(axis=2)).max()) > GREY_SPREAD


def check_colour_image(image: np.ndarray, name: str, min_side: int, kind: str, why_colour: str) -> np.ndarray:
    """`image` when its shorter side reaches `min_side` and it has colour; DatasetError starting with `name`
    otherwise, saying it is too small for `kind` (e.g. "a smear field"), or has no colour and `why_colour` matters."""
    h, w = image.shape[:2]
    if min(h, w) < min_side:
        raise DatasetError(f"{name}: {w}x{h} px is too small for {kind} (at least {min_side} px a side)")
    if not has_colour(image):
        raise DatasetError(f"{name}: the image has no colour (grey-scale or blank); {why_colour}")
    return image


def check_field(image: np.ndarray, name: str) -> np.ndarray:
    """`image` when it can be analysed as a smear field; DatasetError starting with `name` when it is smaller than
    MIN_FIELD_SIDE or has no colour (the finder tells nuclei by their stain's colour, so a grey-scale field would
    read as empty)."""
    return check_colour_image(
        image,
        name,
        MIN_FIELD_SIDE,
        "a smear field",
        "leukocytes are found by their stain's colours, so use the colour original",
    )


def no_clock(stage: str) -> AbstractContextManager[None]:
    """The default StageClock: times nothing."""
    return nullcontext()


@dataclass(frozen=True)
class ScoredCell:
    """One leukocyte of a field with its blast probability and call (field pixels; box ends exclusive)."""

    id: int
    x: float
    y: float
    box: tuple[int, int, int, int]
    area: int
    diameter: float
    probability: float
    blast: bool
    touches_border: bool
    detection_score: float
    #: False when the model's cell focus found no cell in the crop and scored it whole (always True without one).
    cell_found: bool = True
    #: The in-distribution score (NaN when the model has no profile) and whether it is above the flag threshold.
    ood_score: float = float("nan")
    out_of_distribution: bool = False

    def row(self) -> dict[str, Any]:
        """The cells.csv row (keys: CELL_COLUMNS, in order)."""
        x0, y0, x1, y1 = self.box
        return {
            "id": self.id,
            "x": round(self.x, 1),
            "y": round(self.y, 1),
            "x0": x0,
            "y0": y0,
            "x1": x1,
            "y1": y1,
            "area": self.area,
            "diameter": round(self.diameter, 1),
            "probability": float(self.probability),  # exact: a rounded value could sit across the threshold from "call"
            "call": "blast" if self.blast else "other",
            "touches_border": self.touches_border,
            "detection_score": round(self.detection_score, 4),
            "cell_found": self.cell_found,
            "ood_score": None if np.isnan(self.ood_score) else round(self.ood_score, 4),
            "out_of_distribution": self.out_of_distribution,
        }


@dataclass(frozen=True)
class SmearCall:
    """The field's count and call: complete leukocytes, blasts among them, the share with its Wilson interval."""

    leukocytes: int
    blasts: int
    border_cells: int
    blast_share: float | None
    blast_share_ci: tuple[float, float] | None
    smear_threshold: float
    call: str

    @classmethod
    def of(cls, cells: tuple[ScoredCell, ...], smear_threshold: float) -> SmearCall:
        """Count the complete cells of a field and call it."""
        complete = [c for c in cells if not c.touches_border]
        blasts = sum(c.blast for c in complete)
        if not complete:
            return cls(0, 0, len(cells), None, None, smear_threshold, "no leukocytes found")
        share = blasts / len(complete)
        interval = binomtest(blasts, len(complete)).proportion_ci(confidence_level=0.95, method="wilson")
        call = "leukemic" if share >= smear_threshold else "not leukemic"
        return cls(
            len(complete),
            blasts,
            len(cells) - len(complete),
            share,
            (float(interval.low), float(interval.high)),
            smear_threshold,
            call,
        )


@dataclass
class FieldAnalysis:
    """Everything `analyze` learned about one field; `crops` are the prepared network inputs, in cell order."""

    width: int
    height: int
    red_cell_diameter: float
    cells: tuple[ScoredCell, ...]
    smear: SmearCall
    cell_threshold: float
    note: str
    crops: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The JSON summary of the field (no pixels)."""
        smear = self.smear
        return {
            "width": self.width,
            "height": self.height,
            "red_cell_diameter_px": round(self.red_cell_diameter, 1),
            "cells_found": len(self.cells),
            "leukocytes_counted": smear.leukocytes,
            "border_cells": smear.border_cells,
            "blasts": smear.blasts,
            "blast_percentage": None if smear.blast_share is None else round(100 * smear.blast_share, 2),
            "blast_percentage_ci95": None
            if smear.blast_share_ci is None
            else [round(100 * v, 2) for v in smear.blast_share_ci],
            "cell_threshold": self.cell_threshold,
            "smear_threshold_percentage": round(100 * smear.smear_threshold, 2),
            "smear_call": smear.call,
            "note": self.note,
        }


class FieldAnalyzer:
    """Finds, frames, scores and counts the leukocytes of smear fields with one `Predictor`."""

    def __init__(
        self,
        predictor: Predictor,
        framing: Framing,
        cell_threshold: float,
        smear_threshold: float = DEFAULT_SMEAR_THRESHOLD,
        red_cell_diameter: float | None = None,
    ) -> None:
        self.predictor = predictor
        self.framing = framing
        self.cell_threshold = float(cell_threshold)
        self.smear_threshold = float(smear_threshold)
        self.red_cell_diameter = red_cell_diameter

    def prepared_crops(self, image: np.ndarray, finding: FieldFinding) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) uint8 network inputs of the found cells, framed like the training images, and (N,) whether
        the model's cell focus found the cell in each (all True without a focus)."""
        size = self.predictor.image_size
        if not finding.cells:
            return np.zeros((0, size, size, 3), dtype=np.uint8), np.zeros(0, dtype=bool)
        crops = crop_cells(
            image,
            [c.centroid for c in finding.cells],
            [self.framing.crop_side(c.diameter) for c in finding.cells],
        )
        prepared = [self.predictor.prepare_and_flag(crop) for crop in crops]
        return np.stack([p[0] for p in prepared]), np.array([p[1] for p in prepared], dtype=bool)

    def score(self, crops: np.ndarray) -> np.ndarray:
        """(N,) blast probabilities of (N, S, S, 3) prepared crops (see `score_with_flags`)."""
        return self.score_with_flags(crops)[0]

    def score_with_flags(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N,) blast probabilities (temperature-scaled), in-distribution scores and out-of-distribution flags of
        (N, S, S, 3) prepared crops: batches of SCORE_BATCH, the rest padded to a power of two."""
        if not len(crops):
            return np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
        parts = []
        for start in range(0, len(crops), SCORE_BATCH):
            batch = crops[start : start + SCORE_BATCH]
            padded = np.zeros((1 << (len(batch) - 1).bit_length(), *crops.shape[1:]), dtype=crops.dtype)
            padded[: len(batch)] = batch
            scored = self.predictor.score_prepared_batch(padded)
            n = len(batch)
            parts.append((scored.probabilities[:n], scored.ood_score[:n], scored.out_of_distribution[:n]))
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]

    def analyze(self, image: np.ndarray, clock: StageClock = no_clock) -> FieldAnalysis:
        """Find, score and count the leukocytes of one (H, W, 3) uint8 RGB field.

        `clock` times the stages "find", "crop" (cut and prepare the network inputs), "score" (the network) and
        "count"."""
        with clock("find"):
            finding = find_leukocytes(image, self.red_cell_diameter)
        with clock("crop"):
            crops, found = self.prepared_crops(image, finding)
        with clock("score"):
            probabilities, ood_scores, ood_flags = self.score_with_flags(crops)
        with clock("count"):
            cells = tuple(
                ScoredCell(
                    id=i + 1,
                    x=float(c.centroid[0]),
                    y=float(c.centroid[1]),
                    box=c.box,
                    area=c.area,
                    diameter=c.diameter,
                    probability=float(p),
                    blast=bool(p >= self.cell_threshold),
                    touches_border=c.touches_border,
                    detection_score=c.score,
                    cell_found=bool(ok),
                    ood_score=float(ood_scores[i]),
                    out_of_distribution=bool(ood_flags[i]),
                )
                for i, (c, p, ok) in enumerate(zip(finding.cells, probabilities, found, strict=True))
            )
            smear = SmearCall.of(cells, self.smear_threshold)
        return FieldAnalysis(
            width=finding.width,
            height=finding.height,
            red_cell_diameter=finding.red_cell_diameter,
            cells=cells,
            smear=smear,
            cell_threshold=self.cell_threshold,
            note=finding.note,
            crops=crops,
        )
