"""How far stains vary across datasets, and the stain-augmentation strength that covers it.

Per image, the foreground's optical density is expressed in `StainJitter`'s basis (the two Giemsa stains of
`GIEMSA_REFERENCE` and their residual), and each stain's level is its `LEVEL_PERCENTILE`-th percentile concentration
over the stained pixels;
its Macenko stain vectors give the angle to the reference stains. Across all sampled images of all datasets, a
level's ratio to the pooled median is the scale `StainJitter` has to reach: `calibrated_sigma` is the smallest
sigma whose U(1 - sigma, 1 + sigma) covers the central `coverage` of those ratios (and the central shifts), so
training jitter spans the stain differences between the datasets instead of a guessed amount.

Why by hand: stain libraries (torchstain, staintools) normalise or augment H&E with fixed ranges; none measures the
spread of a set of Giemsa datasets to size the augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from blastscan.imaging.stain import GIEMSA_REFERENCE, Macenko, StainError, StainJitter

#: Share of the pooled per-image stain ratios the calibrated jitter must cover (the central 95%).
DEFAULT_COVERAGE = 0.95
#: A stain's level in one image: this percentile of its concentration over the stained pixels (the median would
#: measure the red cells, which outnumber the leukocyte; Macenko's maximum concentration uses the 99th).
LEVEL_PERCENTILE = 95.0
#: The calibrated sigma never exceeds this (StainJitter needs sigma < 1; beyond ~0.8 a stain can vanish).
MAX_SIGMA = 0.8


@dataclass(frozen=True)
class StainMeasure:
    """One image: the `LEVEL_PERCENTILE`-th percentile concentration of each Giemsa stain over its stained pixels
    (log10 OD units along the reference stain vectors) and, where Macenko could fit it, each fitted vector's angle
    to the reference (degrees)."""

    levels: np.ndarray
    angles: np.ndarray | None


def measure_stain(image: np.ndarray, jitter: StainJitter | None = None) -> StainMeasure | None:
    """The stain levels and vector angles of one (H, W, 3) uint8 image; None when it has too little stain."""
    concentrations = (jitter or StainJitter()).concentrations(image)
    if concentrations is None:
        return None
    levels = np.percentile(concentrations[:, :2], LEVEL_PERCENTILE, axis=0)
    try:
        fitted = Macenko().fit(image).stain_matrix
    except StainError:
        angles = None
    else:
        reference = np.asarray(GIEMSA_REFERENCE["stain_matrix"], dtype=float)
        cosines = np.sum(fitted * reference, axis=1) / (
            np.linalg.norm(fitted, axis=1) * np.linalg.norm(reference, axis=1)
        )
        angles = np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))
    return StainMeasure(levels=levels, angles=angles)


@dataclass(frozen=True)
class StainSpread:
    """Stain levels and vector angles per dataset, and the jitter sigma that covers them."""

    per_dataset: dict[str, dict[str, object]]
    pooled_levels: list[float]
    ratio_range: tuple[float, float]
    sigma: float
    coverage: float

    def markdown(self) -> str:
        """A table of the spread (per dataset: images, median stain levels with their 5-95% range, vector angles)
        and the calibrated sigma."""
        lines = [
            "| dataset | images | stain 1 level (5-95%) | stain 2 level (5-95%) | angle to reference, deg (median) |",
            "|---|---|---|---|---|",
        ]
        for name, row in self.per_dataset.items():
            levels = row["levels"]
            angles = row["angles_median"]
            angle_text = "n/a" if angles is None else f"{angles[0]:.1f} / {angles[1]:.1f}"
            cells = [f"{m:.3f} ({lo:.3f}-{hi:.3f})" for m, lo, hi in levels]  # type: ignore[union-attr]
            lines.append(f"| {name} | {row['images']} | {cells[0]} | {cells[1]} | {angle_text} |")
        low, high = self.ratio_range
        lines.append(
            f"\nPer-image stain level / pooled median spans {low:.2f}-{high:.2f} (central {self.coverage:.0%}): "
            f"stain jitter sigma **{self.sigma:.2f}** covers it (U(1 - sigma, 1 + sigma) scale per stain)."
        )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, object]:
        return {
            "per_dataset": self.per_dataset,
            "pooled_levels": self.pooled_levels,
            "ratio_range": list(self.ratio_range),
            "sigma": self.sigma,
            "coverage": self.coverage,
        }


def _summary(measures: list[StainMeasure]) -> dict[str, object]:
    levels = np.array([m.levels for m in measures])
    angles = [m.angles for m in measures if m.angles is not None]
    return {
        "images": len(measures),
        "levels": [
            [float(np.median(levels[:, k])), *map(float, np.percentile(levels[:, k], [5, 95]))] for k in range(2)
        ],
        "angles_median": None if not angles else [float(v) for v in np.median(np.array(angles), axis=0)],
    }


def stain_spread(
    images_by_dataset: Mapping[str, Iterable[np.ndarray]], coverage: float = DEFAULT_COVERAGE
) -> StainSpread:
    """Measure every image of every dataset and calibrate the stain-jitter sigma on the pooled ratios.

    Images with too little stain are skipped; a dataset left with none raises ValueError naming it."""
    jitter = StainJitter()
    per_dataset: dict[str, list[StainMeasure]] = {}
    for name, images in images_by_dataset.items():
        measures = [m for m in (measure_stain(image, jitter) for image in images) if m is not None]
        if not measures:
            raise ValueError(f"{name}: no image with enough stained pixels to measure")
        per_dataset[name] = measures
    # Every dataset weighs the same in the pooled median, however many images it gave.
    medians = np.array([np.median([m.levels for m in ms], axis=0) for ms in per_dataset.values()])
    pooled = np.median(medians, axis=0)
    ratios = np.concatenate([np.array([m.levels for m in ms]) / pooled for ms in per_dataset.values()])
    tail = (1.0 - coverage) / 2 * 100
    low, high = (float(v) for v in np.percentile(ratios, [tail, 100 - tail]))
    sigma = float(min(MAX_SIGMA, max(1.0 - low, high - 1.0)))
    return StainSpread(
        per_dataset={name: _summary(ms) for name, ms in per_dataset.items()},
        pooled_levels=[float(v) for v in pooled],
        ratio_range=(low, high),
        sigma=min(MAX_SIGMA, math.ceil(sigma * 1000) / 1000),  # rounded up: it must still cover the range
        coverage=coverage,
    )
