"""Handcrafted cell features as scikit-learn transformers: morphology, colour and texture of the central leukocyte.

Every extractor takes X = a uint8 array (N, H, W, 3) or a list of (H, W, 3) uint8 images (sizes may differ) and
returns an (N, F) float64 array whose column names `get_feature_names_out()` gives; all are usable in a Pipeline:

    make_pipeline(HandcraftedFeatures(), StandardScaler(), LogisticRegression())

Each image is resized to `size` x `size` (default 128; None keeps its size) and segmented once by
`segment_cell`; `HandcraftedFeatures` computes all three feature groups from that one segmentation, so use it rather
than a FeatureUnion of the three (which would segment every image three times). Sizes are image-relative (areas as
fractions of the image, perimeters as fractions of its side), so the features do not depend on `size`.

An image that cannot be segmented (blank, black, no nucleus-coloured pixels) gets zeros in every feature and 0 in the
last column, `segmentation_ok`; its row and the reason are listed in `segmentation_failures_` after `transform`, and
one `SegmentationWarning` gives the count. No feature is ever NaN or infinite.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from joblib import Parallel, delayed
from scipy import ndimage as ndi
from skimage.color import rgb2gray, rgb2lab
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from skimage.measure import regionprops
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from blastscan.data.images import resize_rgb
from blastscan.imaging.segmentation import WORKING_SIZE, CellSegmentation, segment_cell

__all__ = [
    "COLOUR_FEATURES",
    "MORPHOLOGY_FEATURES",
    "TEXTURE_FEATURES",
    "ColourFeatures",
    "HandcraftedFeatures",
    "MorphologyFeatures",
    "SegmentationWarning",
    "TextureFeatures",
    "colour_features",
    "morphology_features",
    "texture_features",
]

#: Grey levels of the co-occurrence matrix (grey 0-255 binned evenly; absolute, so darker chromatin stays darker).
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
GLCM_PROPERTIES = ("contrast", "homogeneity", "energy", "correlation")
#: Uniform LBP with P neighbours at radius R has P + 2 codes.
LBP_POINTS, LBP_RADIUS = 8, 1


class SegmentationWarning(UserWarning):
    """Some images could not be segmented; their features are fallback zeros (see `segmentation_failures_`)."""


# ---------------------------------------------------------------------------------------------------------------
# Feature functions: one image and its segmentation in, a 1-D float64 vector out (names in the *_FEATURES lists)
# ---------------------------------------------------------------------------------------------------------------

MORPHOLOGY_FEATURES: list[str] = [
    "nucleus_area",  # fraction of the image
    "cell_area",  # fraction of the image
    "nucleus_perimeter",  # fraction of the image side
    "cell_perimeter",
    "nucleus_circularity",  # 4 pi A / P^2, clipped to [0, 1]
    "cell_circularity",
    "nucleus_solidity",  # area / convex hull area
    "cell_solidity",
    "nucleus_eccentricity",  # of the ellipse with the same second moments
    "cell_eccentricity",
    "nucleus_to_cell_ratio",  # nucleus area / cell area
    "nucleus_irregularity",  # std / mean of the contour's distance from the centroid (0 for a circle)
    "nucleus_lobes",  # connected components of the nucleus
]


def _shape(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    """Area, perimeter, circularity, solidity, eccentricity of `mask` taken as one region (lobes together)."""
    if not mask.any():
        return 0.0, 0.0, 0.0, 0.0, 0.0
    h, w = mask.shape
    props = regionprops(mask.astype(np.uint8))[0]
    area = float(props.area)
    perimeter = float(props.perimeter)
    circularity = min(1.0, 4.0 * math.pi * area / perimeter**2) if perimeter > 0 else 0.0
    return area / (h * w), perimeter / math.sqrt(h * w), circularity, float(props.solidity), float(props.eccentricity)


def _irregularity(mask: np.ndarray) -> float:
    contour = mask & ~ndi.binary_erosion(mask)
    ys, xs = np.nonzero(contour)
    if len(ys) < 3:
        return 0.0
    cy, cx = np.argwhere(mask).mean(axis=0)
    radius = np.hypot(ys - cy, xs - cx)
    return float(radius.std() / radius.mean()) if radius.mean() > 0 else 0.0


def morphology_features(image: np.ndarray, seg: CellSegmentation) -> np.ndarray:
    """`MORPHOLOGY_FEATURES` of one segmented image (zeros when `seg.ok` is False)."""
    if not seg.ok:
        return np.zeros(len(MORPHOLOGY_FEATURES))
    nucleus, cell = _shape(seg.nucleus), _shape(seg.cell)
    ratio = float(seg.nucleus.sum() / seg.cell.sum()) if seg.cell.any() else 0.0
    lobes = float(ndi.label(seg.nucleus)[1])
    values = [v for pair in zip(nucleus, cell, strict=True) for v in pair]
    return np.array([*values, ratio, _irregularity(seg.nucleus), lobes], dtype=np.float64)


_COLOUR_CHANNELS = ("R", "G", "B", "lab_L", "lab_a", "lab_b")
COLOUR_FEATURES: list[str] = [
    f"{region}_{stat}_{channel}"
    for region in ("nucleus", "cytoplasm")
    for stat in ("mean", "std")
    for channel in _COLOUR_CHANNELS
]


def colour_features(image: np.ndarray, seg: CellSegmentation) -> np.ndarray:
    """`COLOUR_FEATURES`: mean and std of R, G, B (0-1) and CIELAB L*, a*, b* (divided by 100) in the nucleus and
    in the cytoplasm (cell minus nucleus). A region with no pixels (failed segmentation, or a cell that is all
    nucleus) gets zeros."""
    channels = np.concatenate([image / 255.0, rgb2lab(image) / 100.0], axis=2)
    values = []
    for region in (seg.nucleus, seg.cytoplasm):
        pixels = channels[region]
        if len(pixels) == 0:
            values.append(np.zeros(2 * len(_COLOUR_CHANNELS)))
        else:
            values.append(np.concatenate([pixels.mean(axis=0), pixels.std(axis=0)]))
    return np.concatenate(values).astype(np.float64)


TEXTURE_FEATURES: list[str] = [f"glcm_{p}" for p in GLCM_PROPERTIES] + [f"lbp_{code}" for code in range(LBP_POINTS + 2)]


def texture_features(image: np.ndarray, seg: CellSegmentation) -> np.ndarray:
    """`TEXTURE_FEATURES` of the greyscale nucleus: GLCM contrast, homogeneity, energy and correlation (distances
    1 and 2, averaged over 0, 45, 90 and 135 degrees; only pixel pairs inside the nucleus count) and the
    normalised histogram of uniform LBP codes (P=8, R=1: 10 bins). Zeros when there is no nucleus."""
    if not seg.nucleus.any():
        return np.zeros(len(TEXTURE_FEATURES))
    grey = np.clip(rgb2gray(image) * 255.0, 0, 255).astype(np.uint8)
    rows, cols = np.nonzero(seg.nucleus)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    # Level 0 marks pixels outside the nucleus; its row and column are dropped from the matrix.
    levels = 1 + (grey[box].astype(np.int64) * GLCM_LEVELS) // 256
    levels[~seg.nucleus[box]] = 0
    matrix = graycomatrix(levels, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS + 1, symmetric=True)
    matrix = matrix[1:, 1:].astype(np.float64)
    counted = matrix.sum(axis=(0, 1)) > 0
    glcm = np.zeros(len(GLCM_PROPERTIES))
    if counted.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            for i, prop in enumerate(GLCM_PROPERTIES):
                # A one-level nucleus has undefined correlation (zero variance); it counts as 0 here.
                glcm[i] = np.nan_to_num(graycoprops(matrix, prop)[counted]).mean()
    codes = local_binary_pattern(grey, LBP_POINTS, LBP_RADIUS, method="uniform")[seg.nucleus].astype(np.int64)
    histogram = np.bincount(codes, minlength=LBP_POINTS + 2)[: LBP_POINTS + 2] / len(codes)
    return np.concatenate([glcm, histogram]).astype(np.float64)


_GROUPS: dict[str, tuple[list[str], Callable[[np.ndarray, CellSegmentation], np.ndarray]]] = {
    "morphology": (MORPHOLOGY_FEATURES, morphology_features),
    "colour": (COLOUR_FEATURES, colour_features),
    "texture": (TEXTURE_FEATURES, texture_features),
}


# ---------------------------------------------------------------------------------------------------------------
# Transformers
# ---------------------------------------------------------------------------------------------------------------


def _images(X: Any) -> list[np.ndarray]:
    """X as a list of (H, W, 3) uint8 images; raises ValueError naming what is wrong."""
    if isinstance(X, np.ndarray):
        if X.ndim != 4 or X.shape[3] != 3:
            raise ValueError(f"expected images as an (N, H, W, 3) uint8 array or a list of them, got shape {X.shape}")
        images = list(X)
    elif isinstance(X, Sequence):
        images = [np.asarray(x) for x in X]
    else:
        raise ValueError(f"expected images as an (N, H, W, 3) uint8 array or a list of them, got {type(X).__name__}")
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
    return images


class _CellFeatures(TransformerMixin, BaseEstimator):
    """Shared machinery: resize, segment once, compute the groups in `_groups`, append `segmentation_ok`.

    Parameters
    ----------
    size : int or None
        Side the images are resized to before segmentation (default 128); None keeps each image's size.
    n_jobs : int or None
        Images processed in parallel by joblib threads (None or 1: serial; -1: all cores). One image costs ~20 ms
        of CPU at size 128 (~12 ms of it segmentation). Threads, because on a 2-core machine they measured 28 ms
        per image against 31 serial and 59 for joblib's processes (start-up and pickling outweigh the gain); the
        per-image work is many small numpy / scipy calls, so threads gain little beyond ~2.
    """

    _groups: ClassVar[tuple[str, ...]] = ()

    def __init__(self, size: int | None = WORKING_SIZE, n_jobs: int | None = 1) -> None:
        self.size = size
        self.n_jobs = n_jobs

    def fit(self, X: Any, y: Any = None) -> _CellFeatures:
        """Nothing is learnt; checks X and records the output width."""
        _images(X)
        if self.size is not None and int(self.size) < 16:
            raise ValueError(f"{type(self).__name__}: size must be at least 16 pixels or None, got {self.size}")
        self.n_features_out_ = len(self._feature_names())
        return self

    def _feature_names(self) -> list[str]:
        return [name for group in self._groups for name in _GROUPS[group][0]] + ["segmentation_ok"]

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Column names of `transform`'s output (the image inputs have no feature names of their own)."""
        check_is_fitted(self, "n_features_out_")
        return np.asarray(self._feature_names(), dtype=object)

    def _one(self, image: np.ndarray) -> tuple[np.ndarray, CellSegmentation]:
        if self.size is not None:
            image = resize_rgb(image, int(self.size))
        seg = segment_cell(image)
        values = [_GROUPS[group][1](image, seg) for group in self._groups]
        row = np.concatenate([*values, [float(seg.ok)]])
        # The feature functions are NaN-free by construction; this guards the promise to the classifier.
        return np.nan_to_num(row, nan=0.0, posinf=0.0, neginf=0.0), seg

    def transform(self, X: Any) -> np.ndarray:
        """(N, F) float64 features; sets `segmentation_failures_` = [(row, note), ...] and warns once if any."""
        check_is_fitted(self, "n_features_out_")
        images = _images(X)
        if self.n_jobs in (None, 1) or len(images) < 2:
            results = [self._one(image) for image in images]
        else:
            results = Parallel(n_jobs=self.n_jobs, prefer="threads")(delayed(self._one)(image) for image in images)
        self.segmentation_failures_ = [(i, seg.note) for i, (_, seg) in enumerate(results) if not seg.ok]
        if self.segmentation_failures_:
            rows = ", ".join(str(i) for i, _ in self.segmentation_failures_[:10])
            more = ", ..." if len(self.segmentation_failures_) > 10 else ""
            warnings.warn(
                f"{type(self).__name__}: {len(self.segmentation_failures_)} of {len(images)} images could not be "
                f"segmented (rows {rows}{more}; first reason: {self.segmentation_failures_[0][1]}); their features "
                "are zeros with segmentation_ok = 0. See segmentation_failures_.",
                SegmentationWarning,
                stacklevel=2,
            )
        if not results:
            return np.zeros((0, self.n_features_out_))
        return np.vstack([row for row, _ in results]).astype(np.float64)


class MorphologyFeatures(_CellFeatures):
    """Shape of the nucleus and the cell: `MORPHOLOGY_FEATURES` + `segmentation_ok` (14 columns)."""

    _groups = ("morphology",)


class ColourFeatures(_CellFeatures):
    """Colour of the nucleus and the cytoplasm: `COLOUR_FEATURES` + `segmentation_ok` (25 columns)."""

    _groups = ("colour",)


class TextureFeatures(_CellFeatures):
    """Chromatin texture of the nucleus: `TEXTURE_FEATURES` + `segmentation_ok` (15 columns)."""

    _groups = ("texture",)


class HandcraftedFeatures(_CellFeatures):
    """Morphology, colour and texture from one segmentation per image, + `segmentation_ok` (52 columns)."""

    _groups = ("morphology", "colour", "texture")
