"""Procedurally drawn, clearly labelled SYNTHETIC smear images for the demo and the tests: single cells and fields.

Single-cell images (`draw_cell`, `generate_dataset`): one white cell centred on a pale Wright/Giemsa-like smear
background with a few red cells in view. `leukemic` images show blasts (large cell, high nucleus-to-cytoplasm
ratio, fine chromatin, pale nucleoli, thin blue cytoplasm); `normal` images show mature lymphocytes (small, dense
clumped nucleus) or segmented neutrophils (2-5 lobes, pale pink granular cytoplasm).

Whole smear fields (`draw_field`, `generate_fields`): a dense monolayer of red cells, platelets and a few
leukocytes drawn by the same cell drawers, sized in red-cell diameters as in blood, two of them touching and one
cut by the border, with the true centroid and box of every leukocyte - test data for finding leukocytes in a field.

Images are composed in optical density (Beer-Lambert), three dyes mixed per pixel, so that a per-patient (or
per-field) stain style recolours every structure consistently.

Nothing here is real patient data; `generate_dataset` and `generate_fields` say so in the first line of the
folder's README.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import zoom
from skimage.draw import polygon
from skimage.filters import gaussian

from blastscan.data.manifest import LEUKEMIC, NORMAL
from blastscan.errors import DatasetError

__all__ = [
    "CANVAS_RED_CELLS",
    "CELL_KINDS",
    "DATASET_NAME",
    "MAX_BLAST_SHARE",
    "MIN_FIELD_SIZE",
    "MIN_RED_CELL_DIAMETER",
    "MIN_SIZE",
    "README_FIRST_LINE",
    "SYNTHETIC_TAG",
    "FieldCell",
    "StainStyle",
    "SyntheticField",
    "draw_cell",
    "draw_field",
    "generate_dataset",
    "generate_fields",
]

SYNTHETIC_TAG = "SYNTHETIC"

#: The cell kinds `draw_cell` can draw, and the binary label each one carries.
CELL_KINDS: dict[str, str] = {"blast": LEUKEMIC, "lymphocyte": NORMAL, "neutrophil": NORMAL}

#: The `dataset` column of the synthetic labels.csv.
DATASET_NAME = "synthetic"

README_FIRST_LINE = (
    f"{SYNTHETIC_TAG}: everything in this folder is SYNTHETIC, procedurally drawn by blastscan; "
    "it is not real patient data and must not be used for diagnosis."
)
_README_LAST_LINE = "Use it only to exercise and test software. Results on it say nothing about real blood smears."

#: A leukemic patient's share of blasts is at most this, so every leukemic patient also has normal cells.
MAX_BLAST_SHARE = 0.85
MIN_SIZE = 32

RGB = tuple[float, float, float]


def _od(rgb: RGB) -> np.ndarray:
    """Optical density per channel of a dye seen at unit concentration as colour `rgb` on white."""
    return -np.log(np.asarray(rgb, dtype=float) / 255.0)


# Reference dye colours at unit concentration; Wright-like smears stain redder, Giemsa-like ones bluer.
_WRIGHT = {"nucleus": _od((115, 50, 130)), "cytoplasm": _od((165, 185, 228)), "eosin": _od((236, 172, 188))}
_GIEMSA = {"nucleus": _od((80, 58, 150)), "cytoplasm": _od((140, 168, 222)), "eosin": _od((226, 188, 204))}


@dataclass(frozen=True)
class StainStyle:
    """One patient's stain and microscope: dye colours, stain strength, illumination, noise and blur.

    Dye colours are optical densities (R, G, B) per unit concentration: `nucleus_od` for the purple
    azure-eosinate of chromatin, `cytoplasm_od` for basophilic (blue) cytoplasm, `eosin_od` for the pink of red
    cells, background and neutrophil cytoplasm. The defaults are a mid Wright/Giemsa stain on a clean microscope.
    """

    nucleus_od: RGB = (0.95, 1.55, 0.6)
    cytoplasm_od: RGB = (0.52, 0.38, 0.13)
    eosin_od: RGB = (0.1, 0.36, 0.27)
    #: Multiplies every dye's concentration (thick or long-stained smears are darker).
    strength: float = 1.0
    #: Eosin concentration of the plasma film between cells.
    background_density: float = 0.22
    #: Lamp brightness, 1 = full white.
    brightness: float = 0.96
    #: Linear illumination gradient across the field (fraction of brightness) and its direction in radians.
    gradient: float = 0.05
    gradient_angle: float = 0.0
    #: Darkening towards the corners (fraction of brightness).
    vignette: float = 0.08
    #: Camera white balance: gain per channel (R, G, B); warm cameras lift red, cool ones blue.
    white_balance: RGB = (1.0, 1.0, 1.0)
    #: Sensor noise standard deviation, in 0-255 grey levels.
    noise: float = 2.5
    #: Optical blur, Gaussian sigma in pixels at 128 px.
    blur: float = 0.6

    @classmethod
    def sample(cls, rng: np.random.Generator) -> StainStyle:
        """A random but plausible stain style: Wright-to-Giemsa tint, dye and strength jitter, lamp, noise, blur."""
        giemsa = rng.uniform()
        dyes = {}
        for name in ("nucleus", "cytoplasm", "eosin"):
            mixed = (1 - giemsa) * _WRIGHT[name] + giemsa * _GIEMSA[name]
            # Per-channel jitter shifts the hue a little, independently of the Wright/Giemsa axis.
            dyes[name] = tuple(float(v) for v in mixed * rng.uniform(0.88, 1.12, size=3))
        # Colour temperature plus a small per-channel error; the largest gain is 1 so white stays white.
        warmth = rng.normal(scale=0.05)
        gains = np.array([1 + warmth, 1.0, 1 - warmth]) * (1 + rng.normal(scale=0.02, size=3))
        return cls(
            nucleus_od=dyes["nucleus"],
            cytoplasm_od=dyes["cytoplasm"],
            eosin_od=dyes["eosin"],
            strength=float(rng.uniform(0.75, 1.25)),
            background_density=float(rng.uniform(0.1, 0.4)),
            brightness=float(rng.uniform(0.86, 1.0)),
            gradient=float(rng.uniform(0.0, 0.12)),
            gradient_angle=float(rng.uniform(0, 2 * math.pi)),
            vignette=float(rng.uniform(0.0, 0.18)),
            white_balance=tuple(float(g) for g in gains / gains.max()),
            noise=float(rng.uniform(1.0, 5.0)),
            blur=float(rng.uniform(0.4, 1.1)),
        )


@dataclass
class _Dyes:
    """Concentration maps of the three dyes over the image, composed into RGB by `_render`."""

    nucleus: np.ndarray
    cytoplasm: np.ndarray
    eosin: np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# Shapes and textures


Shape = int | tuple[int, int]
Window = tuple[slice, slice]


def _dims(shape: Shape) -> tuple[int, int]:
    """(rows, cols) of an image given as one side (square single-cell images) or as (rows, cols) (fields)."""
    return shape if isinstance(shape, tuple) else (shape, shape)


def _window(shape: Shape, center: tuple[float, float], reach: float) -> Window:
    """The part of the image within `reach` pixels of `center` (drawing there only keeps small shapes cheap)."""
    rows, cols = _dims(shape)
    # Clipped to the image at both ends, so a window wholly outside it is empty (and patches cut to it fit).
    r0, r1 = min(rows, max(0, int(center[0] - reach))), min(rows, math.ceil(center[0] + reach) + 1)
    c0, c1 = min(cols, max(0, int(center[1] - reach))), min(cols, math.ceil(center[1] + reach) + 1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _blob(
    size: int,
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    rng: np.random.Generator,
    irregularity: float = 0.03,
    soft: float = 0.8,
) -> np.ndarray:
    """A soft-edged [0, 1] mask of a rotated ellipse whose outline wobbles by about `irregularity` of its radius."""
    window, patch = _blob_patch(size, center, radii, angle, rng, irregularity, soft)
    mask = np.zeros((size, size))
    mask[window] = patch
    return mask


def _blob_patch(
    shape: Shape,
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    rng: np.random.Generator,
    irregularity: float = 0.03,
    soft: float = 0.8,
) -> tuple[Window, np.ndarray]:
    """`_blob` drawn only where it is non-zero: the window of the image it covers, and the mask there."""
    theta = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        # Low harmonics only: outlines stay smooth, like membranes, rather than jagged.
        wobble += irregularity / (k - 1) * rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    x = radii[1] * wobble * np.cos(theta)
    y = radii[0] * wobble * np.sin(theta)
    rows = center[0] + x * math.sin(angle) + y * math.cos(angle)
    cols = center[1] + x * math.cos(angle) - y * math.sin(angle)
    reach = max(np.abs(rows - center[0]).max(), np.abs(cols - center[1]).max()) + 4 * soft
    win_r, win_c = _window(shape, center, reach)
    local = np.zeros((win_r.stop - win_r.start, win_c.stop - win_c.start))
    rr, cc = polygon(rows - win_r.start, cols - win_c.start, shape=local.shape)
    local[rr, cc] = 1.0
    if soft > 0 and local.size:
        local = gaussian(local, sigma=soft)
    return (win_r, win_c), local


def _segment(size: int, start: np.ndarray, end: np.ndarray, width: float) -> np.ndarray:
    """A soft [0, 1] mask of a straight band of `width` pixels from `start` to `end` (row, col)."""
    direction = end - start
    normal = np.array([-direction[1], direction[0]]) / (np.linalg.norm(direction) + 1e-9) * width / 2
    corners = np.array([start + normal, end + normal, end - normal, start - normal])
    mask = np.zeros((size, size))
    rr, cc = polygon(corners[:, 0], corners[:, 1], shape=mask.shape)
    mask[rr, cc] = 1.0
    return gaussian(mask, sigma=0.7)


def _texture(shape: Shape, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Smooth random field with zero mean and unit standard deviation; `sigma` sets the grain in pixels."""
    field = gaussian(rng.normal(size=_dims(shape)), sigma=sigma)
    return (field - field.mean()) / (field.std() + 1e-9)


def _scatter(shape: Shape, rng: np.random.Generator, count: int, region: np.ndarray, radius: float) -> np.ndarray:
    """A [0, 1] map of `count` small round dots placed at random inside `region` (> 0.5)."""
    rows, cols = np.nonzero(region > 0.5)
    dots = np.zeros(_dims(shape))
    if rows.size == 0:
        return dots
    picks = rng.integers(0, rows.size, size=count)
    dots[rows[picks], cols[picks]] = 1.0
    dots = gaussian(dots, sigma=radius)
    return np.clip(dots / (dots.max() + 1e-9), 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Background: plasma film and red cells


def _red_cell(
    shape: Shape, rng: np.random.Generator, center: tuple[float, float], radius: float
) -> tuple[Window, np.ndarray]:
    """Eosin concentration of one biconcave red cell, a pink disc with a paler centre: its window and values there."""
    disc_window, disc = _blob_patch(
        shape, center, (radius, radius * rng.uniform(0.88, 1.0)), rng.uniform(0, math.pi), rng, 0.03, 1.0
    )
    pallor_window = _window(shape, center, radius * 1.2)
    # The cell's window holds both the disc and its pallor; outside them the disc is 0 and the pallor 1.
    window = (_union(disc_window[0], pallor_window[0]), _union(disc_window[1], pallor_window[1]))
    rows, cols = np.mgrid[pallor_window].astype(float)
    r = np.hypot(rows - center[0], cols - center[1]) / radius
    pallor = np.ones((window[0].stop - window[0].start, window[1].stop - window[1].start))
    pallor[_within(pallor_window, window)] = 1 - rng.uniform(0.45, 0.7) * np.exp(-((r / 0.5) ** 2))
    patch = np.zeros_like(pallor)
    patch[_within(disc_window, window)] = disc
    return window, patch * rng.uniform(0.75, 1.05) * pallor


def _union(a: slice, b: slice) -> slice:
    """The smallest range of pixels that holds both `a` and `b`."""
    return slice(min(a.start, b.start), max(a.stop, b.stop))


def _within(inner: Window, outer: Window) -> Window:
    """`inner`, a window of the image, as a window of the patch that covers `outer`."""
    return (
        slice(inner[0].start - outer[0].start, inner[0].stop - outer[0].start),
        slice(inner[1].start - outer[1].start, inner[1].stop - outer[1].start),
    )


def _background(size: int, rng: np.random.Generator, stain: StainStyle, cell_radius: float) -> np.ndarray:
    """Eosin concentration of the smear around the white cell: uneven plasma film plus 4-11 red cells."""
    film = stain.background_density * (1 + 0.15 * _texture(size, rng, sigma=size / 8))
    red = np.zeros((size, size))
    for _ in range(int(rng.integers(4, 12))):
        radius = size * rng.uniform(0.12, 0.15)
        # Red cells sit around the white cell, many cut by the image border ("partly in view").
        distance = rng.uniform(cell_radius + 0.4 * radius, 0.5 * size * math.sqrt(2) + 0.3 * radius)
        angle = rng.uniform(0, 2 * math.pi)
        center = (size / 2 + distance * math.sin(angle), size / 2 + distance * math.cos(angle))
        window, patch = _red_cell(size, rng, center, radius)
        red[window] = np.maximum(red[window], patch)
    return film + red


# ---------------------------------------------------------------------------------------------------------------
# White cells: each returns its dye maps and its cell mask (which hides the background beneath it)


def _centre(size: int, rng: np.random.Generator) -> tuple[float, float]:
    """The cell centre: near the middle of the image, nudged as a hand-centred crop would be."""
    jitter = rng.normal(scale=0.06 * size, size=2)
    return (size / 2 + float(jitter[0]), size / 2 + float(jitter[1]))


def _offset(center: tuple[float, float], distance: float, angle: float) -> tuple[float, float]:
    """The point `distance` pixels from `center` in direction `angle`."""
    return (center[0] + distance * math.sin(angle), center[1] + distance * math.cos(angle))


def _blast(size: int, rng: np.random.Generator) -> tuple[_Dyes, np.ndarray, float]:
    """A blast: large round cell, nucleus filling most of it, fine pale chromatin, nucleoli, thin blue rim."""
    # Sizes overlap large lymphocytes a little (small, L1-type blasts), so size alone is not the answer.
    center, radius = _centre(size, rng), size * rng.uniform(0.2, 0.3)
    cell = _blob(size, center, (radius, radius * rng.uniform(0.86, 1.0)), rng.uniform(0, math.pi), rng, 0.03)
    n_radius = radius * rng.uniform(0.8, 0.9)
    n_center = _offset(center, radius * rng.uniform(0.0, 0.07), rng.uniform(0, 2 * math.pi))
    nucleus = _blob(size, n_center, (n_radius, n_radius * rng.uniform(0.85, 1.0)), rng.uniform(0, math.pi), rng, 0.04)
    # Fine, evenly dispersed chromatin: small grain, low contrast, lighter than mature nuclei.
    chromatin = rng.uniform(0.6, 0.78) * (1 + 0.1 * _texture(size, rng, sigma=0.8) + 0.05 * _texture(size, rng, 3))
    nucleoli = np.zeros((size, size))
    for _ in range(int(rng.choice([0, 1, 1, 2, 2]))):
        spot = _offset(n_center, n_radius * rng.uniform(0.0, 0.55), rng.uniform(0, 2 * math.pi))
        r = n_radius * rng.uniform(0.14, 0.22)
        nucleoli = np.maximum(nucleoli, _blob(size, spot, (r, r * rng.uniform(0.75, 1.0)), rng.uniform(0, 3), rng))
    # Nucleoli: pale blue holes in the chromatin, ringed by a little condensed chromatin.
    ring = np.clip(gaussian(nucleoli, sigma=1.2) - nucleoli, 0, 1)
    chromatin = chromatin * (1 - 0.7 * nucleoli) * (1 + 0.8 * ring)
    cyto = cell * (1 - nucleus)
    dyes = _Dyes(
        nucleus=nucleus * chromatin,
        cytoplasm=cyto * rng.uniform(0.95, 1.3) + nucleus * (0.08 + 0.35 * nucleoli),
        eosin=cell * 0.05,
    )
    return dyes, cell, radius


def _lymphocyte(size: int, rng: np.random.Generator) -> tuple[_Dyes, np.ndarray, float]:
    """A mature lymphocyte: small cell, dense dark round nucleus with clumped chromatin, scant pale-blue cytoplasm."""
    center, radius = _centre(size, rng), size * rng.uniform(0.15, 0.2)
    cell = _blob(size, center, (radius, radius * rng.uniform(0.88, 1.0)), rng.uniform(0, math.pi), rng, 0.03)
    n_radius = radius * rng.uniform(0.8, 0.9)
    # Eccentric nucleus: the scant cytoplasm shows as a crescent on one side.
    n_center = _offset(center, radius * rng.uniform(0.04, 0.12), rng.uniform(0, 2 * math.pi))
    nucleus = _blob(size, n_center, (n_radius, n_radius * rng.uniform(0.88, 1.0)), rng.uniform(0, math.pi), rng, 0.04)
    # Coarse clumps: a large-grain field pushed towards two levels (condensed blocks and paler gaps).
    clumps = np.tanh(1.8 * _texture(size, rng, sigma=size / 64 * 1.6))
    chromatin = rng.uniform(1.05, 1.3) * (1 + 0.28 * clumps + 0.06 * _texture(size, rng, sigma=0.7))
    cyto = cell * (1 - nucleus)
    dyes = _Dyes(nucleus=nucleus * chromatin, cytoplasm=cyto * rng.uniform(0.5, 0.8), eosin=cell * 0.04)
    return dyes, cell, radius


def _lobes(size: int, rng: np.random.Generator, center: tuple[float, float], radius: float) -> np.ndarray:
    """A segmented nucleus: 2-5 oval lobes along a curved path, joined by thin chromatin filaments."""
    count = int(rng.integers(2, 6))
    path_radius = radius * rng.uniform(0.36, 0.46)
    step = rng.uniform(0.9, 1.15) * (1.0 if count > 2 else 1.5)
    start = rng.uniform(0, 2 * math.pi) - step * (count - 1) / 2
    # Lobe centres along an arc (a C shape) around a point near the cell centre.
    arc_center = _offset(center, radius * rng.uniform(0.0, 0.12), rng.uniform(0, 2 * math.pi))
    centres, angles = [], []
    for i in range(count):
        angle = start + i * step + rng.normal(scale=0.1)
        centres.append(np.array(_offset(arc_center, path_radius * rng.uniform(0.9, 1.1), angle)))
        angles.append(angle)
    mask = np.zeros((size, size))
    for c, angle in zip(centres, angles, strict=True):
        lobe_r = radius * rng.uniform(0.29, 0.35)
        # Lobes lie across the arc, like beads pressed together on a string.
        lobe = _blob(size, (c[0], c[1]), (lobe_r * rng.uniform(0.7, 0.85), lobe_r), angle, rng, 0.06)
        mask = np.maximum(mask, lobe)
    for a, b in itertools.pairwise(centres):
        mask = np.maximum(mask, _segment(size, a, b, width=max(2.0, radius * 0.11)))
    return mask


def _neutrophil(size: int, rng: np.random.Generator) -> tuple[_Dyes, np.ndarray, float]:
    """A segmented neutrophil: larger cell, 2-5 dense lobes, abundant pale pink-lilac granular cytoplasm."""
    center, radius = _centre(size, rng), size * rng.uniform(0.21, 0.26)
    cell = _blob(size, center, (radius, radius * rng.uniform(0.9, 1.0)), rng.uniform(0, math.pi), rng, 0.035)
    nucleus = _lobes(size, rng, center, radius) * cell
    clumps = np.tanh(1.5 * _texture(size, rng, sigma=size / 64 * 1.2))
    chromatin = rng.uniform(1.0, 1.2) * (1 + 0.2 * clumps)
    cyto = cell * (1 - nucleus)
    # Fine neutrophilic granules: many tiny lilac specks over the pink cytoplasm.
    granules = _scatter(size, rng, int(radius**2 * 0.6), cyto, radius=0.5)
    dyes = _Dyes(
        nucleus=nucleus * chromatin + cyto * granules * 0.1,
        cytoplasm=cyto * 0.05,
        eosin=cyto * (rng.uniform(0.38, 0.55) + 0.15 * granules),
    )
    return dyes, cell, radius


_DRAWERS = {"blast": _blast, "lymphocyte": _lymphocyte, "neutrophil": _neutrophil}


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _illumination(shape: Shape, stain: StainStyle) -> np.ndarray:
    """Lamp brightness over the field: a linear gradient times a radial vignette."""
    rows, cols = _dims(shape)
    # A column of row coordinates and a row of column coordinates, in [-1, 1]; broadcasting makes the grid.
    y = (np.arange(rows) / (rows - 1) * 2 - 1)[:, None]
    x = (np.arange(cols) / (cols - 1) * 2 - 1)[None, :]
    ramp = 1 + stain.gradient * (x * math.cos(stain.gradient_angle) + y * math.sin(stain.gradient_angle)) / 2
    vignette = 1 - stain.vignette * (x**2 + y**2) / 2
    return stain.brightness * ramp * vignette


def _render(dyes: _Dyes, stain: StainStyle, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Beer-Lambert: light through the three dyes, then optical blur, lamp field and sensor noise -> uint8 RGB.

    The image's shape is the dye maps'; `scale` is its pixel size relative to a 128-pixel single-cell image's (the
    blur grows with it).
    """
    # In place where it can be, so that a whole field needs few image-sized temporaries.
    od = dyes.nucleus[..., None] * np.asarray(stain.nucleus_od)
    od += dyes.cytoplasm[..., None] * np.asarray(stain.cytoplasm_od)
    od += dyes.eosin[..., None] * np.asarray(stain.eosin_od)
    od *= stain.strength
    od = gaussian(od, sigma=stain.blur * scale, channel_axis=-1)
    transmitted = np.exp(np.negative(od, out=od), out=od)
    light = 255.0 * _illumination(dyes.nucleus.shape, stain)[..., None] * np.asarray(stain.white_balance)
    light *= transmitted
    light += rng.normal(scale=stain.noise, size=light.shape)
    return np.clip(np.rint(light, out=light), 0, 255, out=light).astype(np.uint8)


def draw_cell(kind: str, rng: np.random.Generator, size: int = 128, stain: StainStyle | None = None) -> np.ndarray:
    """One SYNTHETIC single-cell image, `(size, size, 3)` uint8 RGB, the cell centred on a smear background.

    `kind` is "blast", "lymphocyte" or "neutrophil". Without `stain`, a stain style is drawn from `rng`.
    The same `rng` state gives the same image.
    """
    if kind not in _DRAWERS:
        raise DatasetError(f"unknown synthetic cell kind {kind!r}; choose one of {', '.join(_DRAWERS)}")
    if size < MIN_SIZE:
        raise DatasetError(f"synthetic image size {size} is too small; use at least {MIN_SIZE} pixels")
    stain = stain if stain is not None else StainStyle.sample(rng)
    dyes, cell, radius = _DRAWERS[kind](size, rng)
    # The white cell lies on top: the film and red cells beneath it are hidden.
    dyes.eosin = dyes.eosin + _background(size, rng, stain, radius) * (1 - cell)
    return _render(dyes, stain, rng, size / 128)


# ---------------------------------------------------------------------------------------------------------------
# Whole smear fields

#: Leukocytes are drawn on canvases this many red-cell diameters wide. The drawers size a cell as a fraction of its
#: canvas, so lymphocytes come out 1.0-1.33, neutrophils 1.4-1.73 and blasts 1.33-2.0 red cells across, as in blood.
CANVAS_RED_CELLS = 10 / 3
#: Fields narrower or lower than this are refused.
MIN_FIELD_SIZE = 64
#: Red cells smaller than this (in pixels) would leave leukocytes too few pixels to show their structure.
MIN_RED_CELL_DIAMETER = 8.0


@dataclass(frozen=True)
class FieldCell:
    """One leukocyte drawn in a synthetic field, measured on its own cell mask (> 0.5) as pasted into the field."""

    #: "blast", "lymphocyte" or "neutrophil".
    kind: str
    #: Centroid of the cell mask, in field pixels (x = column, y = row).
    x: float
    y: float
    #: x0, y0, x1, y1 of the cell mask (x1 and y1 exclusive).
    box: tuple[int, int, int, int]
    #: The cell mask reaches the field's edge: the cell is cut by the border.
    touches_border: bool


@dataclass(frozen=True)
class SyntheticField:
    """A SYNTHETIC whole smear field and what is in it."""

    #: (height, width, 3) uint8 RGB.
    image: np.ndarray
    cells: tuple[FieldCell, ...]
    #: (x, y) of each platelet drawn; platelets are not leukocytes.
    platelets: tuple[tuple[float, float], ...]
    #: Mean red-cell diameter, pixels.
    red_cell_diameter: float


@dataclass
class _Leukocyte:
    """A white cell drawn on its own canvas, and where the canvas's top-left corner lies in the field."""

    kind: str
    dyes: _Dyes
    mask: np.ndarray
    #: (row, col) of the centroid of mask > 0.5, canvas pixels; and the farthest such pixel's distance from it.
    centroid: np.ndarray
    reach: float
    corner: np.ndarray

    @property
    def center(self) -> np.ndarray:
        """The centroid in field pixels (row, col)."""
        return self.centroid + self.corner

    def move_to(self, center: np.ndarray) -> None:
        """Place the canvas (on whole pixels) so that the centroid lies as near `center` as it can."""
        self.corner = np.rint(np.asarray(center, dtype=float) - self.centroid)

    def support(self, direction: np.ndarray) -> float:
        """How far the mask reaches from its centroid along the unit vector `direction` (row, col)."""
        rows, cols = np.nonzero(self.mask > 0.5)
        return float(((rows - self.centroid[0]) * direction[0] + (cols - self.centroid[1]) * direction[1]).max())


def _draw_leukocyte(kind: str, rng: np.random.Generator, side: int) -> _Leukocyte:
    """One leukocyte of `kind` by its single-cell drawer, on a `side`-pixel canvas, not yet placed."""
    dyes, mask, _ = _DRAWERS[kind](side, rng)
    rows, cols = np.nonzero(mask > 0.5)
    centroid = np.array([rows.mean(), cols.mean()])
    reach = float(np.hypot(rows - centroid[0], cols - centroid[1]).max()) + 0.5
    return _Leukocyte(kind, dyes, mask, centroid, reach, np.zeros(2))


def _paste_windows(corner: np.ndarray, side: int, dims: tuple[int, int]) -> tuple[Window, Window]:
    """Where a canvas at `corner` meets the field: that window of the field and the same pixels of the canvas."""
    field, canvas = [], []
    for start, size in zip((int(corner[0]), int(corner[1])), dims, strict=True):
        lo, hi = max(0, start), min(size, start + side)
        hi = max(lo, hi)
        field.append(slice(lo, hi))
        canvas.append(slice(lo - start, hi - start))
    return (field[0], field[1]), (canvas[0], canvas[1])


def _overlap(a: _Leukocyte, b: _Leukocyte) -> int:
    """Pixels that both cells' masks (> 0.5) cover, wherever they are placed."""
    side = a.mask.shape[0]
    shift = b.corner - a.corner
    in_a, in_b = _paste_windows(shift, side, (side, side))
    return int(np.count_nonzero((a.mask[in_a] > 0.5) & (b.mask[in_b] > 0.5)))


def _touch(a: _Leukocyte, b: _Leukocyte, angle: float, rng: np.random.Generator) -> None:
    """Place `b` against the placed `a` in direction `angle`: their masks meet, overlapping by a pixel or two."""
    direction = np.array([math.sin(angle), math.cos(angle)])
    distance = a.support(direction) + b.support(-direction) + 2
    b.move_to(a.center + distance * direction)
    # Slide b towards a until the masks share pixels (outlines are not quite round, so the supports are a start).
    while _overlap(a, b) == 0 and distance > 0:
        distance -= 0.5
        b.move_to(a.center + distance * direction)
    b.move_to(a.center + (distance - rng.uniform(0, 1.5)) * direction)


def _place_leukocytes(
    cells: list[_Leukocyte],
    dims: tuple[int, int],
    rng: np.random.Generator,
    touching: bool,
    border: bool,
    diameter: float,
) -> None:
    """Place `cells` in the field: the first two touching (`touching`), the last cut by an edge (`border`), the
    others apart from each other and from the border by a quarter red cell. DatasetError if they do not fit."""
    placed: list[_Leukocyte] = []
    gap = diameter / 4

    def inside(cell: _Leukocyte) -> bool:
        low = cell.reach + gap
        return all(low <= c <= size - 1 - low for c, size in zip(cell.center, dims, strict=True))

    def clear(cell: _Leukocyte) -> bool:
        return all(np.hypot(*(cell.center - o.center)) >= cell.reach + o.reach + gap for o in placed)

    def somewhere(cell: _Leukocyte) -> None:
        low = cell.reach + gap
        cell.move_to([rng.uniform(low, max(low, size - 1 - low)) for size in dims])

    def on_edge(cell: _Leukocyte) -> None:
        # The centroid lies inside, a little less than the cell's reach from one edge, so the edge cuts the cell.
        axis, far = int(rng.integers(0, 2)), bool(rng.integers(0, 2))
        depth = rng.uniform(0.1, 0.6) * cell.reach
        low = cell.reach + gap
        along = rng.uniform(low, max(low, dims[1 - axis] - 1 - low))
        center = np.empty(2)
        center[axis] = dims[axis] - 1 - depth if far else depth
        center[1 - axis] = along
        cell.move_to(center)

    def edge_ok(cell: _Leukocyte) -> bool:
        low = cell.reach + gap
        # Its mask really reaches the edge, and it is clear of the other three edges.
        cuts = [c < cell.reach or c > size - 1 - cell.reach for c, size in zip(cell.center, dims, strict=True)]
        spare = [low <= c <= size - 1 - low for c, size in zip(cell.center, dims, strict=True)]
        return sum(cuts) == 1 and spare[cuts.index(False)] and _field_cell(cell, dims).touches_border

    def pair(first: _Leukocyte) -> None:
        somewhere(first)
        _touch(first, cells[1], rng.uniform(0, 2 * math.pi), rng)

    # Each step proposes a place for a group (its first cell, and the second of a touching pair along with it).
    Step = tuple[list[_Leukocyte], Callable[[_Leukocyte], None], Callable[[_Leukocyte], bool]]
    steps: list[Step] = []
    rest = cells
    if touching:
        steps.append((cells[:2], pair, lambda first: inside(first) and inside(cells[1])))
        rest = rest[2:]
    if border:
        steps.append((rest[-1:], on_edge, edge_ok))
        rest = rest[:-1]
    steps.extend(([cell], somewhere, inside) for cell in rest)
    for group, propose, accept in steps:
        for _ in range(200):
            propose(group[0])
            if accept(group[0]) and all(clear(cell) for cell in group):
                break
        else:
            raise DatasetError(
                f"cannot fit {len(cells)} leukocytes into a {dims[1]}x{dims[0]} field with red cells "
                f"{diameter:g} px across; use a larger field, a smaller red_cell_diameter or fewer kinds"
            )
        placed.extend(group)


def _scattered(
    rng: np.random.Generator, dims: tuple[int, int], diameter: float, spacing: float, per_area: float, rim: float
) -> list[tuple[float, float]]:
    """Random points (row, col) at least `spacing` apart: about `per_area` tries per `diameter`**2 pixels over the
    field grown by `rim` on every side (random sequential adsorption, on a grid so each try looks at few points)."""
    rows, cols = dims[0] + 2 * rim, dims[1] + 2 * rim
    tries = rng.uniform(size=(int(rows * cols / diameter**2 * per_area), 2)) * (rows, cols) - rim
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}
    kept = []
    for r, c in tries.tolist():
        key = (int(r // spacing), int(c // spacing))
        near = (p for dr in (-1, 0, 1) for dc in (-1, 0, 1) for p in grid.get((key[0] + dr, key[1] + dc), ()))
        if all((r - pr) ** 2 + (c - pc) ** 2 >= spacing**2 for pr, pc in near):
            grid.setdefault(key, []).append((r, c))
            kept.append((r, c))
    return kept


def _film(dims: tuple[int, int], rng: np.random.Generator, stain: StainStyle, diameter: float) -> np.ndarray:
    """Eosin concentration of the plasma film: uneven on the scale of a red cell, drawn coarse and stretched."""
    step = max(1, int(diameter / 4))
    coarse = _texture((dims[0] // step + 2, dims[1] // step + 2), rng, sigma=diameter / 2 / step)
    grain = zoom(coarse, step, order=1)[: dims[0], : dims[1]]
    return stain.background_density * (1 + 0.15 * grain)


def _red_cells(dims: tuple[int, int], rng: np.random.Generator, diameter: float) -> np.ndarray:
    """Eosin concentration of a dense monolayer of red cells; where two overlap a little the lens is darker."""
    red = np.zeros(dims)
    # Centres at least 0.8 diameters apart: neighbours touch or overlap a little; density varies between fields.
    for center in _scattered(rng, dims, diameter, 0.8 * diameter, rng.uniform(2.2, 3.5), diameter / 2):
        window, patch = _red_cell(dims, rng, center, diameter / 2 * rng.uniform(0.92, 1.08))
        # Half the second cell's stain shows through: a visible lens, not one that turns an overlap purple.
        below = red[window]
        red[window] = np.maximum(below, patch) + 0.5 * np.minimum(below, patch)
    return red


def _platelets(
    dyes: _Dyes, rng: np.random.Generator, count: int, diameter: float, cells: list[_Leukocyte]
) -> list[tuple[float, float]]:
    """Draw `count` platelets into `dyes` away from the leukocytes; return their centroids (x, y).

    A platelet is 0.2-0.3 red cells across: a pale blue-lilac disc (hyalomere) around purple granules.
    """
    dims = dyes.nucleus.shape
    found: list[tuple[float, float]] = []
    for _ in range(count):
        radius = diameter * rng.uniform(0.1, 0.15)
        for _ in range(200):
            center = np.array([rng.uniform(radius + 2, size - radius - 3) for size in dims])
            if all(np.hypot(*(center - c.center)) > c.reach + radius + diameter / 2 for c in cells) and all(
                math.hypot(center[0] - y, center[1] - x) > 4 * radius for x, y in found
            ):
                break
        else:
            raise DatasetError(f"cannot fit {count} platelets beside the leukocytes; use fewer or a larger field")
        window, body = _blob_patch(
            dims, (center[0], center[1]), (radius, radius * rng.uniform(0.7, 1.0)), rng.uniform(0, 3), rng, 0.12, 0.6
        )
        # Granules crowd the middle (granulomere); the rim (hyalomere) stays a paler lilac.
        granules = _scatter(body.shape, rng, int(rng.integers(5, 12)), body**8, radius=max(0.5, radius / 4))
        dyes.nucleus[window] += body * rng.uniform(0.2, 0.3) + granules * rng.uniform(0.45, 0.7)
        dyes.cytoplasm[window] += body * rng.uniform(0.3, 0.5)
        rows, cols = np.nonzero(body > 0.5)
        found.append((float(cols.mean()) + window[1].start, float(rows.mean()) + window[0].start))
    return found


def _field_cell(cell: _Leukocyte, dims: tuple[int, int]) -> FieldCell:
    """What the field shows of a placed leukocyte: its mask's centroid and box there, and whether an edge cuts it."""
    field, canvas = _paste_windows(cell.corner, cell.mask.shape[0], dims)
    rows, cols = np.nonzero(cell.mask[canvas] > 0.5)
    rows, cols = rows + field[0].start, cols + field[1].start
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    touches = box[0] == 0 or box[1] == 0 or box[2] == dims[1] or box[3] == dims[0]
    return FieldCell(cell.kind, float(cols.mean()), float(rows.mean()), box, touches)


def _check_field(width: int, height: int, red_cell_diameter: float, platelets: int) -> None:
    """Raise a DatasetError naming the first argument `draw_field` cannot use."""
    for name, value in (("width", width), ("height", height)):
        if value < MIN_FIELD_SIZE:
            raise DatasetError(f"{name} must be at least {MIN_FIELD_SIZE} pixels, got {value}")
    if not red_cell_diameter >= MIN_RED_CELL_DIAMETER:
        raise DatasetError(
            f"red_cell_diameter must be at least {MIN_RED_CELL_DIAMETER:g} pixels, got {red_cell_diameter}"
        )
    if platelets < 0:
        raise DatasetError(f"platelets must be 0 or more, got {platelets}")


def draw_field(
    rng: np.random.Generator,
    width: int = 640,
    height: int = 480,
    *,
    red_cell_diameter: float = 40.0,
    kinds: Sequence[str] | None = None,
    touching_pair: bool = True,
    border_cell: bool = True,
    platelets: int = 6,
    stain: StainStyle | None = None,
) -> SyntheticField:
    """A SYNTHETIC whole smear field, `(height, width, 3)` uint8 RGB, with the true position of every leukocyte.

    A dense monolayer of red cells `red_cell_diameter` pixels across on a plasma film, `platelets` platelets, and a
    leukocyte of each of `kinds` ("blast", "lymphocyte", "neutrophil"; default 2-6 drawn from `rng`) on top, sized
    in red cells as in blood (lymphocytes 1.0-1.3, neutrophils 1.4-1.7, blasts 1.3-2.0 diameters). With
    `touching_pair` the first two `kinds` touch (as clustered blasts do); with `border_cell` one more leukocyte, of
    a kind from `kinds`, is cut by the image border and comes last in `cells`. The others keep apart from each
    other and from the border. `cells` follow `kinds`' order. Without `stain`, a stain style is drawn from `rng`.
    The same `rng` state gives the same field. DatasetError for a bad argument or leukocytes that do not fit.
    """
    _check_field(width, height, red_cell_diameter, platelets)
    if kinds is None:
        kinds = rng.choice(list(_DRAWERS), size=int(rng.integers(2, 7))).tolist()
    kinds = list(kinds)
    for kind in kinds:
        if kind not in _DRAWERS:
            raise DatasetError(f"unknown synthetic cell kind {kind!r}; choose one of {', '.join(_DRAWERS)}")
    if touching_pair and len(kinds) < 2:
        raise DatasetError(f"touching_pair needs at least two kinds, got {len(kinds)}")
    stain = stain if stain is not None else StainStyle.sample(rng)
    dims = (height, width)
    side = round(CANVAS_RED_CELLS * red_cell_diameter)
    if border_cell:
        kinds.append(str(rng.choice(sorted(set(kinds)) or list(_DRAWERS))))
    cells = [_draw_leukocyte(kind, rng, side) for kind in kinds]
    _place_leukocytes(cells, dims, rng, touching_pair, border_cell, red_cell_diameter)
    dyes = _Dyes(np.zeros(dims), np.zeros(dims), _film(dims, rng, stain, red_cell_diameter))
    dyes.eosin += _red_cells(dims, rng, red_cell_diameter)
    platelet_xy = _platelets(dyes, rng, platelets, red_cell_diameter, cells)
    for cell in cells:
        # Each leukocyte lies on top: the film, red cells and any cell beneath it are hidden.
        field, canvas = _paste_windows(cell.corner, side, dims)
        cover = 1 - cell.mask[canvas]
        for name in ("nucleus", "cytoplasm", "eosin"):
            below, own = getattr(dyes, name), getattr(cell.dyes, name)
            below[field] = below[field] * cover + own[canvas]
    image = _render(dyes, stain, rng, side / 128)
    return SyntheticField(
        image=image,
        cells=tuple(_field_cell(cell, dims) for cell in cells),
        platelets=tuple(platelet_xy),
        red_cell_diameter=float(red_cell_diameter),
    )


# ---------------------------------------------------------------------------------------------------------------
# Dataset


def _validate(n_patients: int, cells_per_patient: int, size: int, leukemic_fraction: float) -> None:
    """Raise a DatasetError naming the first argument `generate_dataset` cannot use."""
    if n_patients < 1:
        raise DatasetError(f"n_patients must be at least 1, got {n_patients}")
    if cells_per_patient < 1:
        raise DatasetError(f"cells_per_patient must be at least 1, got {cells_per_patient}")
    if size < MIN_SIZE:
        raise DatasetError(f"synthetic image size {size} is too small; use at least {MIN_SIZE} pixels")
    if not 0.0 <= leukemic_fraction <= 1.0:
        raise DatasetError(f"leukemic_fraction must be between 0 and 1, got {leukemic_fraction}")


@dataclass(frozen=True)
class _Layout:
    """What one writer puts in its output folder, so that a later run can recognise the folder and replace it."""

    #: What the folder holds, in error messages.
    name: str
    #: Plain files beside README.txt.
    files: tuple[str, ...]
    #: The folder of images, and the name prefixes of its entries by depth: folders above, PNG files at the end.
    folder: str
    prefixes: tuple[str, ...]


_DATASET_LAYOUT = _Layout("synthetic dataset", ("labels.csv",), "images", ("SYN-P", ""))
_FIELDS_LAYOUT = _Layout("synthetic field set", ("cells.csv", "platelets.csv"), "fields", ("SYN-FIELD-",))


def _holds_only(folder: Path, prefixes: tuple[str, ...]) -> bool:
    """True when `folder` is a plain folder whose entries are named `prefixes[0]`..., and are PNG files when no
    prefix follows, else plain folders that hold only what the following prefixes say."""
    # Links could lead outside the folder: what gets deleted must be plain folders and files we wrote.
    if folder.is_symlink() or not folder.is_dir():
        return False
    head, *rest = prefixes
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.name.startswith(head):
            return False
        if rest and not _holds_only(entry, tuple(rest)):
            return False
        if not rest and not (entry.is_file() and entry.suffix == ".png"):
            return False
    return True


def _is_previous_synthetic(out_dir: Path, layout: _Layout) -> bool:
    """True when `out_dir` holds only what this module writes in `layout`, under the tagged README."""
    readme = out_dir / "README.txt"
    if not readme.is_file():
        return False
    with readme.open(encoding="utf-8", errors="replace") as handle:
        if not handle.readline().startswith(f"{SYNTHETIC_TAG}:"):
            return False
    if any(p.name not in ("README.txt", *layout.files, layout.folder) for p in out_dir.iterdir()):
        return False
    images = out_dir / layout.folder
    return not images.exists() or _holds_only(images, layout.prefixes)


def _prepare_out_dir(out_dir: Path, layout: _Layout) -> None:
    """Make `out_dir` ready for writing; clear what a previous run wrote in `layout`, but never anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir}: exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not _is_previous_synthetic(out_dir, layout):
            raise DatasetError(
                f"{out_dir}: folder is not empty and does not hold only a previous {layout.name}; "
                "refusing to write into it. Choose an empty or new folder"
            )
        if (out_dir / layout.folder).exists():
            shutil.rmtree(out_dir / layout.folder)
        for name in layout.files:
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _plan_patients(
    n_patients: int, cells_per_patient: int, leukemic_fraction: float, rng: np.random.Generator
) -> list[int]:
    """Blasts per patient: leukemic patients (chosen at random) share the blasts, the others have none."""
    total = n_patients * cells_per_patient
    n_blasts = round(leukemic_fraction * total)
    if n_blasts == 0:
        return [0] * n_patients
    per_patient_max = max(1, math.floor(MAX_BLAST_SHARE * cells_per_patient))
    n_leukemic = min(n_patients, math.ceil(n_blasts / per_patient_max))
    shares = [n_blasts // n_leukemic + (1 if i < n_blasts % n_leukemic else 0) for i in range(n_leukemic)]
    plan = shares + [0] * (n_patients - n_leukemic)
    return [plan[i] for i in rng.permutation(n_patients)]


def _patient_kinds(n_blasts: int, n_cells: int, rng: np.random.Generator) -> list[str]:
    """The cell kinds one patient contributes, in random order: blasts, then lymphocytes/neutrophils half-half."""
    normals = rng.choice(["lymphocyte", "neutrophil"], size=n_cells - n_blasts).tolist()
    kinds = ["blast"] * n_blasts + normals
    return [kinds[i] for i in rng.permutation(n_cells)]


def _write_readme(out_dir: Path, lines: list[str]) -> None:
    """The README whose first line marks the folder as synthetic (and lets a later run overwrite it)."""
    text = "\n".join([README_FIRST_LINE, "", *lines]) + "\n"
    (out_dir / "README.txt").write_text(text, encoding="utf-8")


def _dataset_readme(n_patients: int, cells_per_patient: int, size: int, seed: int) -> list[str]:
    """What the single-cell dataset's README says below its first line."""
    return [
        f"Generated by blastscan.data.synthetic.generate_dataset(n_patients={n_patients}, "
        f"cells_per_patient={cells_per_patient}, size={size}, seed={seed}).",
        "Cartoon single-cell images: 'leukemic' = blast-like cells; 'normal' = mature lymphocytes and segmented",
        "neutrophils. Patients SYN-Pxx are invented; each has its own random stain and illumination.",
        "labels.csv columns: path (relative to this folder), label, patient_id, cell_type, dataset.",
        _README_LAST_LINE,
    ]


def generate_dataset(
    out_dir: str | Path,
    n_patients: int = 12,
    cells_per_patient: int = 20,
    size: int = 128,
    seed: int = 0,
    leukemic_fraction: float = 0.5,
) -> Path:
    """Write a SYNTHETIC dataset to `out_dir` and return `out_dir`.

    Layout: `images/<patient>/<label>_<idx>.png`, `labels.csv` (path,label,patient_id,cell_type,dataset) and
    `README.txt` whose first line says the data are synthetic. Patients are `SYN-P00`, `SYN-P01`, ... About
    `leukemic_fraction` of all cells are blasts (label "leukemic"), held by randomly chosen leukemic patients, each
    with at most 85% blasts unless the fraction needs more; the other patients have only normal cells (lymphocytes
    and neutrophils). Every patient has its own stain style. The same arguments give byte-identical files.
    A non-empty `out_dir` is refused with a DatasetError unless it holds only a previous synthetic dataset.
    """
    _validate(n_patients, cells_per_patient, size, leukemic_fraction)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, _DATASET_LAYOUT)
    # The README goes first, so a folder left half-written by an interrupted run is still recognised as ours.
    _write_readme(out_dir, _dataset_readme(n_patients, cells_per_patient, size, seed))
    plan_seed, *patient_seeds = np.random.SeedSequence(seed).spawn(n_patients + 1)
    blasts = _plan_patients(n_patients, cells_per_patient, leukemic_fraction, np.random.default_rng(plan_seed))
    rows: list[dict[str, str]] = []
    for number, (n_blasts, patient_seed) in enumerate(zip(blasts, patient_seeds, strict=True)):
        rng = np.random.default_rng(patient_seed)
        patient = f"SYN-P{number:02d}"
        stain = StainStyle.sample(rng)
        (out_dir / "images" / patient).mkdir(parents=True, exist_ok=True)
        for idx, kind in enumerate(_patient_kinds(n_blasts, cells_per_patient, rng)):
            label = CELL_KINDS[kind]
            path = f"images/{patient}/{label}_{idx:03d}.png"
            Image.fromarray(draw_cell(kind, rng, size, stain)).save(out_dir / path, format="PNG", compress_level=1)
            rows.append({"path": path, "label": label, "patient_id": patient, "cell_type": kind})
    _write_labels(out_dir / "labels.csv", rows)
    return out_dir


def _write_labels(path: Path, rows: list[dict[str, str]]) -> None:
    """labels.csv, every row in the synthetic dataset."""
    fieldnames = ["path", "label", "patient_id", "cell_type", "dataset"]
    _write_csv(path, fieldnames, [{**row, "dataset": DATASET_NAME} for row in rows])


def _write_csv(path: Path, fieldnames: list[str], rows: list[dict[str, object]]) -> None:
    """A CSV with '\\n' line endings on every platform (so files are byte-identical)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------------------
# Field set


_BOX = ("x0", "y0", "x1", "y1")


def _field_kinds(blasts: bool, rng: np.random.Generator) -> list[str]:
    """The leukocytes of one field, 2-6: a blast field starts with a blast and holds mostly blasts, as ALL-IDB1's
    leukemic fields do; the others hold only lymphocytes and neutrophils."""
    count = int(rng.integers(2, 7))
    if not blasts:
        return rng.choice(["lymphocyte", "neutrophil"], size=count).tolist()
    return ["blast", *rng.choice(list(_DRAWERS), size=count - 1, p=[0.6, 0.25, 0.15]).tolist()]


def _fields_readme(
    n_fields: int, seed: int, width: int, height: int, red_cell_diameter: float, blast_fraction: float
) -> list[str]:
    """What the field set's README says below its first line."""
    return [
        f"Generated by blastscan.data.synthetic.generate_fields(n_fields={n_fields}, seed={seed}, width={width}, "
        f"height={height}, red_cell_diameter={red_cell_diameter:g}, blast_fraction={blast_fraction:g}).",
        "Cartoon whole smear fields: red cells, platelets and leukocytes (blasts, mature lymphocytes, segmented",
        "neutrophils). fields/SYN-FIELD-XXX_Y.png: Y = 1 when the field holds at least one blast, else 0 (as in",
        "ALL-IDB1's names). Each field has its own random stain and illumination.",
        "cells.csv: one row per leukocyte: field (the image's name without .png), kind, x, y (centroid of the cell",
        "mask in pixels, x = column), x0, y0, x1, y1 (the mask's box, x1 and y1 exclusive), touches_border.",
        "platelets.csv: field, x, y of every platelet (platelets are not leukocytes).",
        _README_LAST_LINE,
    ]


def generate_fields(
    out_dir: str | Path,
    n_fields: int = 4,
    *,
    seed: int = 0,
    width: int = 640,
    height: int = 480,
    red_cell_diameter: float = 40.0,
    blast_fraction: float = 0.5,
) -> Path:
    """Write a SYNTHETIC set of whole smear fields with known leukocyte positions to `out_dir`; return `out_dir`.

    Layout: `fields/SYN-FIELD-XXX_Y.png` (Y = 1 for a field holding at least one blast), `cells.csv` (field, kind,
    x, y, x0, y0, x1, y1, touches_border; see `FieldCell`), `platelets.csv` (field, x, y) and `README.txt` whose
    first line says the data are synthetic. About `blast_fraction` of the fields, chosen at random, hold blasts;
    the others only lymphocytes and neutrophils. Each field is a `draw_field` with a touching pair and a cell cut
    by the border. The same arguments give byte-identical files. A non-empty `out_dir` is refused with a
    DatasetError unless it holds only a previous synthetic field set.
    """
    if n_fields < 1:
        raise DatasetError(f"n_fields must be at least 1, got {n_fields}")
    if not 0.0 <= blast_fraction <= 1.0:
        raise DatasetError(f"blast_fraction must be between 0 and 1, got {blast_fraction}")
    _check_field(width, height, red_cell_diameter, platelets=0)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, _FIELDS_LAYOUT)
    # The README goes first, so a folder left half-written by an interrupted run is still recognised as ours.
    _write_readme(out_dir, _fields_readme(n_fields, seed, width, height, red_cell_diameter, blast_fraction))
    (out_dir / "fields").mkdir()
    plan_seed, *field_seeds = np.random.SeedSequence(seed).spawn(n_fields + 1)
    order = np.random.default_rng(plan_seed).permutation(n_fields).tolist()
    blast_fields = set(order[: round(blast_fraction * n_fields)])
    cells: list[dict[str, object]] = []
    platelets: list[dict[str, object]] = []
    for number, field_seed in enumerate(field_seeds):
        rng = np.random.default_rng(field_seed)
        kinds = _field_kinds(number in blast_fields, rng)
        field = draw_field(rng, width, height, red_cell_diameter=red_cell_diameter, kinds=kinds)
        name = f"SYN-FIELD-{number:03d}_{int(any(cell.kind == 'blast' for cell in field.cells))}"
        Image.fromarray(field.image).save(out_dir / "fields" / f"{name}.png", format="PNG", compress_level=1)
        for cell in field.cells:
            where = {"x": round(cell.x, 2), "y": round(cell.y, 2), **dict(zip(_BOX, cell.box, strict=True))}
            cells.append({"field": name, "kind": cell.kind, **where, "touches_border": cell.touches_border})
        platelets.extend({"field": name, "x": round(x, 2), "y": round(y, 2)} for x, y in field.platelets)
    _write_csv(out_dir / "cells.csv", ["field", "kind", "x", "y", *_BOX, "touches_border"], cells)
    _write_csv(out_dir / "platelets.csv", ["field", "x", "y"], platelets)
    return out_dir
