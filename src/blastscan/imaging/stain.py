"""Stain normalisation and stain augmentation for Wright / May-Grünwald-Giemsa blood smears.

One door, `create_stain_method(name, **kwargs)`, gives a normaliser ("reinhard", "macenko", "none") with the
torchstain-sized API: `fit(target) -> self`, `normalize(image) -> image` (H x W x 3 uint8 in and out), and its
state as plain lists (`to_dict()` / `stain_method_from_dict(d)`). `StainJitter` is the training-time augmentation:
per-stain optical-density scale/shift (Tellez et al. 2019), for one uint8 image or a whole (B, 3, H, W) torch batch.

Background is never treated as stain. Two kinds exist: pale glass (the brightest colour of a smear, which is grey in
ALL-IDB and peach in CellaVision/DeepAPL images, so it is measured per image rather than assumed white) and the black
surround of segmented cells (C-NMC). `foreground_mask` says which pixels are cells; only those enter any statistic.
Normalisers map glass onto the target's glass colour and leave black untouched; the jitter leaves both untouched.
An image with too little foreground (blank, black, one colour) is returned unchanged, and `fit` on it raises.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from skimage.color import lab2rgb, rgb2lab

from blastscan.errors import BlastscanError, ConfigError
from blastscan.registry import Registry

if TYPE_CHECKING:
    import torch

__all__ = [
    "GIEMSA_REFERENCE",
    "STAIN_METHODS",
    "Macenko",
    "NoNormalization",
    "Reinhard",
    "StainError",
    "StainJitter",
    "StainNormalizer",
    "create_stain_method",
    "foreground_mask",
    "stain_method_from_dict",
    "stain_method_names",
]


class StainError(BlastscanError):
    """A stain method cannot be fitted to an image, or its saved state is not usable."""


#: A pixel whose brightest channel is at or below this level is the black surround of a segmented cell (C-NMC).
BLACK_LEVEL = 20
#: A pixel is stained (foreground) when its largest per-channel optical density above the glass exceeds this.
#: Chosen on ALL-IDB2 and DeepAPL: 0.06 keeps red cells and pale cytoplasm and drops JPEG/sensor noise on glass.
OD_THRESHOLD = 0.06
#: Fewer foreground pixels than this fraction of the image: normalise/jitter return the input, fit raises.
MIN_FOREGROUND = 0.01
#: An image whose black share is at least this is a segmented cell on black: all its non-black pixels are cell.
SEGMENTED_BLACK_SHARE = 0.2
#: The glass colour is this per-channel percentile of the image (robust to specks brighter than the glass).
ILLUMINANT_PERCENTILE = 98.0


# ---------------------------------------------------------------------------------------------------------------
# Foreground, glass colour and optical density (numpy; the torch batch path mirrors these in StainJitter)
# ---------------------------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise StainError(f"{what}: expected a numpy array of shape (H, W, 3) and dtype uint8, got {type(image)!r}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise StainError(f"{what}: expected shape (H, W, 3) RGB, got {image.shape}; convert with blastscan's load_rgb")
    if image.dtype != np.uint8:
        raise StainError(f"{what}: expected dtype uint8 (0-255), got {image.dtype}; convert before normalising")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise StainError(f"{what}: empty image of shape {image.shape}")
    return image


def _kth_percentile(values: np.ndarray, percentile: float) -> np.ndarray:
    """Per-column order statistic of rank ceil(p * n), which the torch batch path takes too (same glass colour)."""
    k = max(1, math.ceil(percentile / 100.0 * values.shape[0]))
    return np.partition(values, k - 1, axis=0)[k - 1]


class _Analysis:
    """Per-pixel quantities every method needs, computed once per image."""

    def __init__(self, image: np.ndarray) -> None:
        pixels = image.reshape(-1, 3)
        self.shape = image.shape
        self.black = pixels.max(axis=1) <= BLACK_LEVEL
        self.segmented = bool(self.black.mean() >= SEGMENTED_BLACK_SHARE)
        # Segmented crops have no glass left to measure; their cells were imaged on (and are judged against) white.
        self.illuminant = (
            np.full(3, 255.0) if self.segmented else _kth_percentile(pixels, ILLUMINANT_PERCENTILE).astype(np.float64)
        )
        # Beer-Lambert optical density relative to the glass; +1 keeps log finite at 0, clipping drops glass noise.
        self.od = np.clip(-np.log10((pixels.astype(np.float64) + 1.0) / (self.illuminant + 1.0)), 0.0, None)
        self.od_max = self.od.max(axis=1)
        self.foreground = ~self.black if self.segmented else ~self.black & (self.od_max > OD_THRESHOLD)
        self.enough = bool(self.foreground.mean() >= MIN_FOREGROUND)

    def weight(self, background_kept: bool) -> np.ndarray:
        """How much of the foreground mapping each pixel gets: a ramp in OD up to twice the threshold, so no seam
        shows where cell meets glass. With `background_kept` the ramp starts at the threshold (every background
        pixel gets 0); otherwise at half of it, so the faintest stain (red-cell pallor) leans to the glass mapping
        instead of a colour transfer extrapolated far from the foreground's mean (which tints it green)."""
        if self.segmented:
            return self.foreground.astype(np.float64)
        start = OD_THRESHOLD if background_kept else OD_THRESHOLD / 2
        return np.clip((self.od_max - start) / (2 * OD_THRESHOLD - start), 0.0, 1.0) * ~self.black


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: True on stained cell pixels; False on glass (the image's brightest colour) and on black surround.

    Glass is found per image as the 98th-percentile colour, so grey (ALL-IDB), peach (CellaVision) and white glass
    all count as background; in a segmented cell on black (C-NMC) every non-black pixel is foreground.
    """
    analysis = _Analysis(_check_image(image))
    return analysis.foreground.reshape(image.shape[:2])


def _too_few(analysis: _Analysis, what: str) -> StainError:
    share = float(analysis.foreground.mean())
    return StainError(
        f"{what}: too few foreground pixels ({share:.2%} of the image, at least {MIN_FOREGROUND:.0%} needed); "
        "the image looks blank, black or of one colour. Fit on a smear image with stained cells"
    )


def _od_to_rgb(od: np.ndarray, illuminant: np.ndarray) -> np.ndarray:
    return (illuminant + 1.0) * np.power(10.0, -od) - 1.0


def _finish(
    image: np.ndarray, analysis: _Analysis, weight: np.ndarray, mapped_fg: np.ndarray, mapped_bg: np.ndarray
) -> np.ndarray:
    """Blend the foreground and glass mappings by `weight`; black pixels keep their value."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    w = weight[:, None]
    out = w * mapped_fg + (1.0 - w) * mapped_bg
    out = np.where(analysis.black[:, None], pixels, out)
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(image.shape)


def _glass_to_target(image: np.ndarray, analysis: _Analysis, target_illuminant: np.ndarray) -> np.ndarray:
    """Von Kries white balance: glass becomes the target's glass colour, and its texture is kept."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    return (pixels + 1.0) * (target_illuminant + 1.0) / (analysis.illuminant + 1.0) - 1.0


# ---------------------------------------------------------------------------------------------------------------
# Normalisers and their registry
# ---------------------------------------------------------------------------------------------------------------


class StainNormalizer(ABC):
    """Construct, `fit(target)`, `normalize(image)`; state is plain arrays, saved with `to_dict()`."""

    #: The name `create_stain_method` knows it by: the one it is registered under in `STAIN_METHODS`.
    name: ClassVar[str]

    @abstractmethod
    def fit(self, target: np.ndarray) -> StainNormalizer:
        """Learn the target's colour from an (H, W, 3) uint8 smear image; raises StainError when it cannot."""

    @abstractmethod
    def normalize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 in the target's colours; returned unchanged when it has too little foreground."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state, including `method`: the registry name."""

    @classmethod
    @abstractmethod
    def from_dict(cls, state: dict[str, Any]) -> StainNormalizer:
        """Rebuild from `to_dict()`'s output."""


#: The stain normalisers, by name; each class below registers itself with `@STAIN_METHODS.register(name)`, the
#: name its `name` attribute and its saved state's `method` repeat.
STAIN_METHODS: Registry[type[StainNormalizer]] = Registry("stain method")


def stain_method_names() -> list[str]:
    """Names `create_stain_method` accepts."""
    return STAIN_METHODS.names()


def create_stain_method(name: str, **kwargs: Any) -> StainNormalizer:
    """The single door: a stain normaliser by name ("reinhard", "macenko", "none"), with its keyword options."""
    key = name.strip().lower()
    if key not in STAIN_METHODS:
        raise ConfigError(f"unknown stain method {name!r}; choose one of {', '.join(STAIN_METHODS.names())}")
    try:
        return STAIN_METHODS.get(key)(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"stain method {key!r}: {exc}") from None


def stain_method_from_dict(state: dict[str, Any]) -> StainNormalizer:
    """Rebuild whichever normaliser `state` (a `to_dict()` output, e.g. read back from JSON) describes."""
    method = state.get("method") if isinstance(state, dict) else None
    if not isinstance(method, str) or method not in STAIN_METHODS:
        raise StainError(
            f"saved stain state names method {method!r}; expected one of {', '.join(STAIN_METHODS.names())}"
        )
    return STAIN_METHODS.get(method).from_dict(state)


def _array(state: dict[str, Any], key: str, shape: tuple[int, ...], method: str) -> np.ndarray:
    try:
        value = np.asarray(state[key], dtype=np.float64)
    except KeyError:
        raise StainError(f"saved {method} state lacks {key!r}") from None
    except (TypeError, ValueError) as exc:
        raise StainError(f"saved {method} state: {key!r} is not numeric ({exc})") from None
    if value.shape != shape or not np.all(np.isfinite(value)):
        raise StainError(f"saved {method} state: {key!r} must be finite with shape {shape}, got {value.shape}")
    return value


def _check_method(state: dict[str, Any], method: str) -> None:
    if not isinstance(state, dict) or state.get("method") != method:
        found = state.get("method") if isinstance(state, dict) else type(state).__name__
        raise StainError(f"saved stain state is for {found!r}, not {method!r}")


# Default target for both normalisers: a typical CellaVision May-Grünwald-Giemsa image. Derived by fitting Macenko
# (alpha=1, percentile=99) and Reinhard, with the foreground rules above, on 238 DeepAPL cells (every 27th file of the
# sorted DeepAPL/Data/All/**/*.jpg) and keeping the image whose stain matrix is nearest the per-entry median (the
# medoid; single-image estimates vary, IQR 0.07-0.3 per entry); the values are that image's fit, rounded.
# tests/data/test_stain.py re-derives them from the image.
# Row 0 is the basophilic (azure B-DNA, purple nuclei) direction, row 1 the eosinophilic (red cells) one; neither
# resembles H&E's reference (hematoxylin 0.5626, 0.7201, 0.4062; eosin 0.2159, 0.8012, 0.5581).
GIEMSA_REFERENCE: dict[str, Any] = {
    "source": "DeepAPL/Data/All/Patient_69/10026924218/Signed slides/Lymphocyte/LY_14433957.jpg",
    "stain_matrix": [[0.4596, 0.8743, 0.1562], [0.4631, 0.7191, 0.5181]],
    "max_concentrations": [0.9858, 0.3888],
    "illuminant": [255.0, 233.0, 205.0],
    "lab_mean": [55.741, 22.603, -8.722],
    "lab_std": [12.421, 8.915, 13.532],
}


@STAIN_METHODS.register("none")
class NoNormalization(StainNormalizer):
    """The identity: for runs that switch stain normalisation off through the same door."""

    name = "none"

    def fit(self, target: np.ndarray) -> NoNormalization:
        _check_image(target, "target")
        return self

    def normalize(self, image: np.ndarray) -> np.ndarray:
        return _check_image(image).copy()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> NoNormalization:
        _check_method(state, cls.name)
        return cls()


def _lab(pixels: np.ndarray) -> np.ndarray:
    return rgb2lab(np.clip(pixels, 0.0, 255.0).reshape(-1, 1, 3) / 255.0).reshape(-1, 3)


def _rgb(lab: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # Out-of-gamut Lab (possible after the affine map) is clipped below; skimage's warning adds nothing.
        warnings.simplefilter("ignore")
        return lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3) * 255.0


@STAIN_METHODS.register("reinhard")
class Reinhard(StainNormalizer):
    """Reinhard et al. 2001 colour transfer in CIELAB: match the foreground's per-channel mean and std to the target's.

    Statistics come from foreground pixels only; glass is white-balanced onto the target's glass colour.
    """

    name = "reinhard"
    #: Lab std floor, so a near-uniform foreground cannot blow the scale up.
    MIN_STD: ClassVar[float] = 1.0

    def __init__(self) -> None:
        self.lab_mean = np.asarray(GIEMSA_REFERENCE["lab_mean"], dtype=np.float64)
        self.lab_std = np.asarray(GIEMSA_REFERENCE["lab_std"], dtype=np.float64)
        self.illuminant = np.asarray(GIEMSA_REFERENCE["illuminant"], dtype=np.float64)

    @staticmethod
    def _stats(image: np.ndarray, analysis: _Analysis) -> tuple[np.ndarray, np.ndarray]:
        lab = _lab(image.reshape(-1, 3)[analysis.foreground].astype(np.float64))
        return lab.mean(axis=0), lab.std(axis=0)

    def fit(self, target: np.ndarray) -> Reinhard:
        analysis = _Analysis(_check_image(target, "target"))
        if not analysis.enough:
            raise _too_few(analysis, "Reinhard.fit")
        self.lab_mean, self.lab_std = self._stats(target, analysis)
        self.illuminant = analysis.illuminant.copy()
        return self

    def normalize(self, image: np.ndarray) -> np.ndarray:
        analysis = _Analysis(_check_image(image))
        if not analysis.enough:
            return image.copy()
        mean, std = self._stats(image, analysis)
        scale = self.lab_std / np.maximum(std, self.MIN_STD)
        pixels = image.reshape(-1, 3).astype(np.float64)
        weight = analysis.weight(background_kept=False)
        active = weight > 0
        mapped_fg = np.zeros_like(pixels)
        mapped_fg[active] = _rgb((_lab(pixels[active]) - mean) * scale + self.lab_mean)
        return _finish(image, analysis, weight, mapped_fg, _glass_to_target(image, analysis, self.illuminant))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "lab_mean": self.lab_mean.tolist(),
            "lab_std": self.lab_std.tolist(),
            "illuminant": self.illuminant.tolist(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Reinhard:
        _check_method(state, cls.name)
        method = cls()
        method.lab_mean = _array(state, "lab_mean", (3,), cls.name)
        method.lab_std = _array(state, "lab_std", (3,), cls.name)
        method.illuminant = _array(state, "illuminant", (3,), cls.name)
        return method


#: Stain directions are estimated from pixels with at least this OD (vector norm): fainter ones have noisy angles.
_ESTIMATION_OD = 0.15
_MIN_ESTIMATION_PIXELS = 100
#: Two stain vectors closer than this (degrees) are one colour: no second stain to separate.
_MIN_STAIN_ANGLE = 3.0
#: |det| of a stain basis (= sine of the angle between its stains) below which it cannot be inverted safely.
_MIN_BASIS_DET = 0.5 * math.sin(math.radians(_MIN_STAIN_ANGLE))


def _macenko_stains(od: np.ndarray, alpha: float) -> np.ndarray | None:
    """Macenko et al. 2009 ("A method for normalizing histology slides for quantitative analysis", ISBI):
    project foreground OD onto the plane of its two largest principal directions, take the robust extreme angles
    (alpha and 100 - alpha percentiles) as the two stain directions. None when they coincide (one colour only)."""
    centred = od - od.mean(axis=0)
    _, eigvecs = np.linalg.eigh(centred.T @ centred / max(1, od.shape[0] - 1))
    plane = eigvecs[:, [2, 1]]  # largest first
    # eigh's signs are arbitrary; point the first axis into positive OD so angles lie in (-90, 90] degrees.
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    projected = od @ plane
    phi = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    if np.degrees(hi - lo) < _MIN_STAIN_ANGLE:
        return None
    # Basophilic (azure/methylene-blue) staining absorbs red rather than blue, eosin blue rather than red: put the
    # more basophilic direction first, as hematoxylin is in H&E.
    stains = np.stack([v_lo, v_hi] if v_lo[0] - v_lo[2] > v_hi[0] - v_hi[2] else [v_hi, v_lo])
    # A stain cannot absorb negatively (Beer-Lambert); such components are extrapolation past the data.
    stains = np.clip(stains, 0.0, None)
    norms = np.linalg.norm(stains, axis=1, keepdims=True)
    if np.any(norms < 1e-6):
        return None
    stains = stains / norms
    if np.degrees(np.arccos(np.clip(stains[0] @ stains[1], -1.0, 1.0))) < _MIN_STAIN_ANGLE:
        return None
    return stains


def _stain_basis(stain_matrix: np.ndarray) -> np.ndarray:
    """3 x 3 basis: the two stains plus the unit direction orthogonal to both (the residual, as DAB is in HED).

    The cross product's orientation follows the stains' order, so paired bases map residual onto residual."""
    residual = np.cross(stain_matrix[0], stain_matrix[1])
    return np.stack([stain_matrix[0], stain_matrix[1], residual / max(float(np.linalg.norm(residual)), 1e-12)])


@STAIN_METHODS.register("macenko")
class Macenko(StainNormalizer):
    """Macenko et al. 2009 stain normalisation on optical density, adapted to Giemsa-family stains.

    `stain_matrix` (2 x 3 unit rows: the basophilic/nuclear direction, then the eosinophilic one) and
    `max_concentrations` (their `percentile`-th percentiles) default to `GIEMSA_REFERENCE`, fitted on a
    May-Grünwald-Giemsa smear: H&E's reference matrix does not describe these stains. Two changes to the original
    method, both for Giemsa: the source's directions are paired with the target's and any further than
    `max_angle` degrees from its partner is replaced by it, and the OD left over by the two stains is carried
    along the direction orthogonal to both instead of being dropped.

    On Giemsa the two extreme directions depend on a cell's content (three hues, ~20 degrees apart), so Macenko is
    less dependable here than on H&E: on ALL-IDB2 <-> DeepAPL pairs it brings the foreground's mean colour closer
    in about two pairs of three, where Reinhard does in all. Fit it on a smear showing nuclei and red cells.
    """

    name = "macenko"

    def __init__(self, alpha: float = 1.0, percentile: float = 99.0, max_angle: float = 10.0) -> None:
        if not 0.0 <= alpha < 50.0:
            raise ConfigError(f"macenko alpha must be a percentile in [0, 50), got {alpha}")
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"macenko percentile must be in (50, 100], got {percentile}")
        if not 0.0 <= max_angle <= 180.0:
            raise ConfigError(f"macenko max_angle must be in degrees within [0, 180], got {max_angle}")
        self.alpha = float(alpha)
        self.percentile = float(percentile)
        self.max_angle = float(max_angle)
        self.stain_matrix = np.asarray(GIEMSA_REFERENCE["stain_matrix"], dtype=np.float64)
        self.max_concentrations = np.asarray(GIEMSA_REFERENCE["max_concentrations"], dtype=np.float64)
        self.illuminant = np.asarray(GIEMSA_REFERENCE["illuminant"], dtype=np.float64)

    def _directions(self, analysis: _Analysis) -> np.ndarray | None:
        od = analysis.od[analysis.foreground]
        strong = od[np.linalg.norm(od, axis=1) > _ESTIMATION_OD]
        return _macenko_stains(strong, self.alpha) if len(strong) >= _MIN_ESTIMATION_PIXELS else None

    def _max_concentrations(self, analysis: _Analysis, basis: np.ndarray) -> np.ndarray:
        concentrations = analysis.od[analysis.foreground] @ np.linalg.inv(basis)
        return np.percentile(concentrations[:, :2], self.percentile, axis=0)

    def _pair(self, stains: np.ndarray) -> np.ndarray:
        """The source's two directions matched to the target's; a direction of a different hue is replaced.

        Giemsa stains three hues (azure blue, azure-DNA purple, eosin pink) that lie only ~20 degrees apart in OD
        space, and which two are a cell's extremes depends on its content (blue cytoplasm, red cells). Without
        this, a blue-cytoplasm extreme mapped onto the target's eosin turns red cells magenta.
        """
        target = self.stain_matrix
        if np.trace(stains @ target.T) < np.trace(stains[::-1] @ target.T):
            stains = stains[::-1]
        far = np.degrees(np.arccos(np.clip(np.sum(stains * target, axis=1), -1.0, 1.0))) > self.max_angle
        return np.where(far[:, None], target, stains)

    def fit(self, target: np.ndarray) -> Macenko:
        analysis = _Analysis(_check_image(target, "target"))
        if not analysis.enough:
            raise _too_few(analysis, "Macenko.fit")
        stains = self._directions(analysis)
        max_c = None if stains is None else self._max_concentrations(analysis, _stain_basis(stains))
        if stains is None or max_c is None or np.any(max_c <= 0):
            raise StainError(
                "Macenko.fit: the target's foreground has too little colour variation to separate two stains; "
                "fit on a smear image showing both nuclei and red cells"
            )
        self.stain_matrix, self.max_concentrations = stains, max_c
        self.illuminant = analysis.illuminant.copy()
        return self

    def normalize(self, image: np.ndarray) -> np.ndarray:
        analysis = _Analysis(_check_image(image))
        stains = self._directions(analysis) if analysis.enough else None
        if stains is None:
            return image.copy()
        basis = _stain_basis(self._pair(stains))
        if abs(np.linalg.det(basis)) < _MIN_BASIS_DET:
            return image.copy()
        # A stain nearly absent from the source would otherwise get an exploding scale.
        max_c = self._max_concentrations(analysis, basis)
        scale = self.max_concentrations / np.maximum(max_c, 0.05 * self.max_concentrations)
        # Two stains leave ~20% of a Giemsa smear's OD unexplained (three hues); keep it along the orthogonal
        # direction, so that normalising the image a normaliser was fitted on returns that image.
        concentrations = analysis.od @ np.linalg.inv(basis)
        concentrations[:, :2] *= scale
        # Nothing stained is brighter than the glass (negative OD would also mislead the next glass estimate).
        mapped_fg = _od_to_rgb(np.clip(concentrations @ _stain_basis(self.stain_matrix), 0.0, None), self.illuminant)
        weight = analysis.weight(background_kept=False)
        return _finish(image, analysis, weight, mapped_fg, _glass_to_target(image, analysis, self.illuminant))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "alpha": self.alpha,
            "percentile": self.percentile,
            "max_angle": self.max_angle,
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_concentrations.tolist(),
            "illuminant": self.illuminant.tolist(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Macenko:
        _check_method(state, cls.name)
        try:
            method = cls(**{k: float(state[k]) for k in ("alpha", "percentile", "max_angle") if k in state})
        except (TypeError, ValueError) as exc:
            raise StainError(f"saved macenko state: bad parameter ({exc})") from None
        matrix = _array(state, "stain_matrix", (2, 3), cls.name)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if np.any(norms == 0) or abs(np.linalg.det(_stain_basis(matrix / norms))) < _MIN_BASIS_DET:
            raise StainError("saved macenko state: stain_matrix rows are zero or (nearly) parallel")
        method.stain_matrix = matrix / norms
        method.max_concentrations = _array(state, "max_concentrations", (2,), cls.name)
        if np.any(method.max_concentrations <= 0):
            raise StainError("saved macenko state: max_concentrations must be positive")
        method.illuminant = _array(state, "illuminant", (3,), cls.name)
        return method


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------


class StainJitter:
    """Tellez et al. 2019 HED-style stain augmentation, on Giemsa stains: per stain channel, concentration
    c -> c * a + b with a ~ U(1 - sigma_alpha, 1 + sigma_alpha) and b ~ U(-sigma_beta, sigma_beta).

    The channels are the two Giemsa stains of `stain_matrix` plus their residual direction (DAB's place in HED).
    All three are scaled; only the two stains are shifted, because a shift along the residual adds a colour no
    stain has (green on these smears). Concentrations are log10 optical densities along unit stain vectors,
    measured from the image's own glass; skimage's HED units are 1/6 of these (ln 10 / ln 1e6), so Tellez's
    'light' 0.05 is 0.3 here, and the default shift is milder. The stain matrix is `GIEMSA_REFERENCE`'s unless a
    fitted one (e.g. `Macenko().fit(smear).stain_matrix`) is given. Background (glass, black surround) keeps its
    value; images with too little foreground come back unchanged.
    """

    def __init__(self, sigma_alpha: float = 0.05, sigma_beta: float = 0.05, stain_matrix: Any = None) -> None:
        if not (0.0 <= sigma_alpha < 1.0 and sigma_beta >= 0.0):
            raise ConfigError(
                f"StainJitter needs 0 <= sigma_alpha < 1 and sigma_beta >= 0, got {sigma_alpha}, {sigma_beta}"
            )
        matrix = np.asarray(GIEMSA_REFERENCE["stain_matrix"] if stain_matrix is None else stain_matrix, dtype=float)
        if matrix.shape != (2, 3) or not np.all(np.isfinite(matrix)) or np.any(np.linalg.norm(matrix, axis=1) == 0):
            raise ConfigError(f"StainJitter stain_matrix must be a finite 2 x 3 array of non-zero rows, got {matrix}")
        self.sigma_alpha = float(sigma_alpha)
        self.sigma_beta = float(sigma_beta)
        self.basis = _stain_basis(matrix / np.linalg.norm(matrix, axis=1, keepdims=True))
        if abs(np.linalg.det(self.basis)) < _MIN_BASIS_DET:
            raise ConfigError("StainJitter stain_matrix rows are (nearly) parallel; give two distinct stain vectors")
        self.basis_inv = np.linalg.inv(self.basis)

    def concentrations(self, image: np.ndarray) -> np.ndarray | None:
        """(n, 3) concentrations of an (H, W, 3) uint8 image's stained pixels along this jitter's two stains and
        their residual (what `apply` scales and shifts); None when the image has too little stain."""
        analysis = _Analysis(_check_image(image))
        if not analysis.enough:
            return None
        return analysis.od[analysis.foreground] @ self.basis_inv

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One draw: alpha (3,) for the two stains and the residual, beta (3,) with the residual's shift 0."""
        alpha = rng.uniform(1.0 - self.sigma_alpha, 1.0 + self.sigma_alpha, size=3)
        beta = np.append(rng.uniform(-self.sigma_beta, self.sigma_beta, size=2), 0.0)
        return alpha, beta

    def apply(self, image: np.ndarray, alpha: Any, beta: Any) -> np.ndarray:
        """The jitter with given per-channel scale `alpha` and shift `beta` (each (3,)) on an (H, W, 3) uint8 image."""
        analysis = _Analysis(_check_image(image))
        if not analysis.enough:
            return image.copy()
        alpha, beta = np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64)
        # OD' = ((OD B^-1) * alpha + beta) B, as one 3 x 3 map and an offset.
        od_map = self.basis_inv @ (alpha[:, None] * self.basis)
        od = np.clip(analysis.od @ od_map + beta @ self.basis, 0.0, None)
        pixels = image.reshape(-1, 3).astype(np.float64)
        weight = analysis.weight(background_kept=True)
        return _finish(image, analysis, weight, _od_to_rgb(od, analysis.illuminant), pixels)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """A jittered copy of an (H, W, 3) uint8 image; `rng` (a Generator or a seed) makes it repeatable."""
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return self.apply(image, *self.sample(generator))

    def apply_batch(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Jitter a (B, 3, H, W) float batch in [0, 1], one draw per image, vectorised on the batch's device.

        Same rules as the uint8 path (glass per image, black surround, too-little-foreground images unchanged).
        `generator` makes it repeatable; it must live on the batch's device (torch.rand's rule).
        """
        import torch

        _check_batch(batch)
        n = batch.shape[0]
        u = torch.rand((n, 5), generator=generator, device=batch.device, dtype=torch.float64)
        alpha = 1.0 + self.sigma_alpha * (2.0 * u[:, :3] - 1.0)
        beta = torch.nn.functional.pad(self.sigma_beta * (2.0 * u[:, 3:] - 1.0), (0, 1))
        return self.apply_batch_with(batch, alpha, beta)

    def _torch_basis(self, dtype: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The stain basis and its inverse as tensors, copied to each device once (a per-step copy from numpy
        would make the CPU wait for the GPU every step)."""
        import torch

        cache = self.__dict__.setdefault("_torch_bases", {})
        key = (dtype, str(device))
        if key not in cache:
            cache[key] = (
                torch.as_tensor(self.basis, dtype=dtype, device=device),
                torch.as_tensor(self.basis_inv, dtype=dtype, device=device),
            )
        return cache[key]

    def apply_batch_with(self, batch: torch.Tensor, alpha: Any, beta: Any) -> torch.Tensor:
        """`apply_batch` with given (B, 3) `alpha` and `beta` (tensors or arrays)."""
        import torch

        _check_batch(batch)
        dtype = batch.dtype if batch.dtype == torch.float64 else torch.float32
        x = batch.to(dtype)
        alpha = torch.as_tensor(alpha, dtype=dtype, device=x.device)
        beta = torch.as_tensor(beta, dtype=dtype, device=x.device)
        basis, basis_inv = self._torch_basis(dtype, x.device)
        od_map = basis_inv @ (alpha[:, :, None] * basis)
        offset = beta @ basis
        eps = 1.0 / 255.0  # the uint8 path's +1

        black = x.amax(dim=1, keepdim=True) <= BLACK_LEVEL / 255.0
        segmented = black.flatten(1).to(dtype).mean(dim=1) >= SEGMENTED_BLACK_SHARE
        pixels = x.shape[2] * x.shape[3]
        k = max(1, math.ceil(ILLUMINANT_PERCENTILE / 100.0 * pixels))
        # The k-th smallest is the least of the (n - k + 1) largest; topk is ~2.5x faster than kthvalue on CPU.
        illuminant = x.flatten(2).topk(pixels - k + 1, dim=2, sorted=False).values.amin(dim=2)
        illuminant = torch.where(segmented[:, None], torch.ones_like(illuminant), illuminant)[:, :, None, None]

        od = (torch.log10(illuminant + eps) - torch.log10(x + eps)).clamp_min(0.0)
        od_max = od.amax(dim=1, keepdim=True)
        seg = segmented[:, None, None, None]
        ramp = ((od_max - OD_THRESHOLD) / OD_THRESHOLD).clamp(0.0, 1.0)
        weight = torch.where(seg, torch.ones_like(ramp), ramp) * ~black
        foreground = ~black & (seg | (od_max > OD_THRESHOLD))
        enough = foreground.flatten(1).to(dtype).mean(dim=1) >= MIN_FOREGROUND
        weight = weight * enough[:, None, None, None]

        jittered = (torch.einsum("bchw,bcd->bdhw", od, od_map) + offset[:, :, None, None]).clamp_min(0.0)
        out = ((illuminant + eps) * torch.exp(-math.log(10.0) * jittered) - eps).clamp(0.0, 1.0)
        return (x + weight * (out - x)).to(batch.dtype)


def _check_batch(batch: Any) -> None:
    import torch

    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise StainError(f"apply_batch: expected a (B, 3, H, W) tensor, got {shape}")
    if not batch.is_floating_point():
        raise StainError(f"apply_batch: expected a float tensor in [0, 1], got {batch.dtype}")
    if batch.numel() == 0:
        raise StainError(f"apply_batch: empty batch of shape {tuple(batch.shape)}")
