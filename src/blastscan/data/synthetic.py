"""A procedurally drawn, clearly labelled SYNTHETIC single-cell smear dataset for the demo and the tests.

Each image is one white cell centred on a pale Wright/Giemsa-like smear background with a few red cells in view.
`leukemic` images show blasts (large cell, high nucleus-to-cytoplasm ratio, fine chromatin, pale nucleoli, thin
blue cytoplasm); `normal` images show mature lymphocytes (small, dense clumped nucleus) or segmented neutrophils
(2-5 lobes, pale pink granular cytoplasm). Images are composed in optical density (Beer-Lambert), three dyes
mixed per pixel, so that a per-patient stain style recolours every structure consistently.

Nothing here is real patient data; `generate_dataset` says so in the first line of the folder's README.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import polygon
from skimage.filters import gaussian

from blastscan.data.manifest import LEUKEMIC, NORMAL
from blastscan.errors import DatasetError

SYNTHETIC_TAG = "SYNTHETIC"

#: The cell kinds `draw_cell` can draw, and the binary label each one carries.
CELL_KINDS: dict[str, str] = {"blast": LEUKEMIC, "lymphocyte": NORMAL, "neutrophil": NORMAL}

#: The `dataset` column of the synthetic labels.csv.
DATASET_NAME = "synthetic"

README_FIRST_LINE = (
    f"{SYNTHETIC_TAG}: everything in this folder is SYNTHETIC, procedurally drawn by blastscan; "
    "it is not real patient data and must not be used for diagnosis."
)

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


def _window(size: int, center: tuple[float, float], reach: float) -> tuple[slice, slice]:
    """The part of the image within `reach` pixels of `center` (drawing there only keeps small shapes cheap)."""
    r0, r1 = max(0, int(center[0] - reach)), min(size, math.ceil(center[0] + reach) + 1)
    c0, c1 = max(0, int(center[1] - reach)), min(size, math.ceil(center[1] + reach) + 1)
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
    theta = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        # Low harmonics only: outlines stay smooth, like membranes, rather than jagged.
        wobble += irregularity / (k - 1) * rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    x = radii[1] * wobble * np.cos(theta)
    y = radii[0] * wobble * np.sin(theta)
    rows = center[0] + x * math.sin(angle) + y * math.cos(angle)
    cols = center[1] + x * math.cos(angle) - y * math.sin(angle)
    mask = np.zeros((size, size))
    win_r, win_c = _window(size, center, max(np.abs(rows - center[0]).max(), np.abs(cols - center[1]).max()) + 4 * soft)
    local = mask[win_r, win_c]
    rr, cc = polygon(rows - win_r.start, cols - win_c.start, shape=local.shape)
    local[rr, cc] = 1.0
    if soft > 0 and local.size:
        mask[win_r, win_c] = gaussian(local, sigma=soft)
    return mask


def _segment(size: int, start: np.ndarray, end: np.ndarray, width: float) -> np.ndarray:
    """A soft [0, 1] mask of a straight band of `width` pixels from `start` to `end` (row, col)."""
    direction = end - start
    normal = np.array([-direction[1], direction[0]]) / (np.linalg.norm(direction) + 1e-9) * width / 2
    corners = np.array([start + normal, end + normal, end - normal, start - normal])
    mask = np.zeros((size, size))
    rr, cc = polygon(corners[:, 0], corners[:, 1], shape=mask.shape)
    mask[rr, cc] = 1.0
    return gaussian(mask, sigma=0.7)


def _texture(size: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Smooth random field with zero mean and unit standard deviation; `sigma` sets the grain in pixels."""
    field = gaussian(rng.normal(size=(size, size)), sigma=sigma)
    return (field - field.mean()) / (field.std() + 1e-9)


def _scatter(size: int, rng: np.random.Generator, count: int, region: np.ndarray, radius: float) -> np.ndarray:
    """A [0, 1] map of `count` small round dots placed at random inside `region` (> 0.5)."""
    rows, cols = np.nonzero(region > 0.5)
    dots = np.zeros((size, size))
    if rows.size == 0:
        return dots
    picks = rng.integers(0, rows.size, size=count)
    dots[rows[picks], cols[picks]] = 1.0
    dots = gaussian(dots, sigma=radius)
    return np.clip(dots / (dots.max() + 1e-9), 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Background: plasma film and red cells


def _red_cell(size: int, rng: np.random.Generator, center: tuple[float, float], radius: float) -> np.ndarray:
    """Eosin concentration of one biconcave red cell: a pink disc with a paler centre."""
    disc = _blob(size, center, (radius, radius * rng.uniform(0.88, 1.0)), rng.uniform(0, math.pi), rng, 0.03, 1.0)
    win_r, win_c = _window(size, center, radius * 1.2)
    rows, cols = np.mgrid[win_r, win_c].astype(float)
    r = np.hypot(rows - center[0], cols - center[1]) / radius
    pallor = np.ones((size, size))
    pallor[win_r, win_c] = 1 - rng.uniform(0.45, 0.7) * np.exp(-((r / 0.5) ** 2))
    return disc * rng.uniform(0.75, 1.05) * pallor


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
        red = np.maximum(red, _red_cell(size, rng, center, radius))
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


def _illumination(size: int, stain: StainStyle) -> np.ndarray:
    """Lamp brightness over the field: a linear gradient times a radial vignette."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    ramp = 1 + stain.gradient * (x * math.cos(stain.gradient_angle) + y * math.sin(stain.gradient_angle)) / 2
    vignette = 1 - stain.vignette * (x**2 + y**2) / 2
    return stain.brightness * ramp * vignette


def _render(dyes: _Dyes, stain: StainStyle, rng: np.random.Generator, size: int) -> np.ndarray:
    """Beer-Lambert: light through the three dyes, then optical blur, lamp field and sensor noise -> uint8 RGB."""
    od = stain.strength * (
        dyes.nucleus[..., None] * np.asarray(stain.nucleus_od)
        + dyes.cytoplasm[..., None] * np.asarray(stain.cytoplasm_od)
        + dyes.eosin[..., None] * np.asarray(stain.eosin_od)
    )
    od = gaussian(od, sigma=stain.blur * size / 128, channel_axis=-1)
    light = 255.0 * _illumination(size, stain)[..., None] * np.asarray(stain.white_balance) * np.exp(-od)
    light += rng.normal(scale=stain.noise, size=light.shape)
    return np.clip(np.rint(light), 0, 255).astype(np.uint8)


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
    return _render(dyes, stain, rng, size)


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


def _is_previous_synthetic(out_dir: Path) -> bool:
    """True when `out_dir` holds only a dataset this module wrote: the tagged README, labels.csv, images/SYN-*/."""
    readme = out_dir / "README.txt"
    if not readme.is_file():
        return False
    with readme.open(encoding="utf-8", errors="replace") as handle:
        if not handle.readline().startswith(f"{SYNTHETIC_TAG}:"):
            return False
    if any(p.name not in ("README.txt", "labels.csv", "images") for p in out_dir.iterdir()):
        return False
    images = out_dir / "images"
    if not images.exists():
        return True
    # Links could lead outside the folder: what gets deleted must be plain folders and files we wrote.
    if images.is_symlink() or not images.is_dir():
        return False
    for patient in images.iterdir():
        if patient.is_symlink() or not (patient.is_dir() and patient.name.startswith("SYN-P")):
            return False
        if any(f.is_symlink() or not (f.is_file() and f.suffix == ".png") for f in patient.iterdir()):
            return False
    return True


def _prepare_out_dir(out_dir: Path) -> None:
    """Make `out_dir` ready for writing; clear a previous synthetic dataset, but never anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir}: exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not _is_previous_synthetic(out_dir):
            raise DatasetError(
                f"{out_dir}: folder is not empty and does not hold only a previous synthetic dataset; "
                "refusing to write into it. Choose an empty or new folder"
            )
        if (out_dir / "images").exists():
            shutil.rmtree(out_dir / "images")
        (out_dir / "labels.csv").unlink(missing_ok=True)
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


def _write_readme(out_dir: Path, n_patients: int, cells_per_patient: int, size: int, seed: int) -> None:
    """The README whose first line marks the folder as synthetic (and lets a later run overwrite it)."""
    lines = [
        README_FIRST_LINE,
        "",
        f"Generated by blastscan.data.synthetic.generate_dataset(n_patients={n_patients}, "
        f"cells_per_patient={cells_per_patient}, size={size}, seed={seed}).",
        "Cartoon single-cell images: 'leukemic' = blast-like cells; 'normal' = mature lymphocytes and segmented",
        "neutrophils. Patients SYN-Pxx are invented; each has its own random stain and illumination.",
        "labels.csv columns: path (relative to this folder), label, patient_id, cell_type, dataset.",
        "Use it only to exercise and test software. Results on it say nothing about real blood smears.",
    ]
    (out_dir / "README.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


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
    _prepare_out_dir(out_dir)
    # The README goes first, so a folder left half-written by an interrupted run is still recognised as ours.
    _write_readme(out_dir, n_patients, cells_per_patient, size, seed)
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
    """labels.csv with '\\n' line endings on every platform (so files are byte-identical)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["path", "label", "patient_id", "cell_type", "dataset"], lineterminator="\n"
        )
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "dataset": DATASET_NAME})
