"""Where each single-cell crop was cut from: ALL-IDB2's crops located in ALL-IDB1's smear fields.

ALL-IDB2's crops were cut from ALL-IDB1's fields, so a model trained on the crops has seen cells of the fields.
Measured on the real sets: a crop is a plain cut of a field at the same scale, neither rotated nor flipped (ORB +
RANSAC similarity fits gave scale 0.97-0.99 and rotation under 0.3 degrees; most crops equal the decoded field's
pixels, normalised cross-correlation 1.000), 257 x 257 px centred on an annotated cell (`xyc/` blasts: 62 of 65
within 1.4 px; `xyc_other/`: 58 of 60 within 30 px), clipped where the field ends. About half of ALL-IDB2 (135 of
260 crops) comes from fields that this copy of ALL-IDB1 does not hold.

So a crop is found by normalised cross-correlation (NCC) of greyscale pixels, in two passes:
- coarse: the crop against every field at 1/8 scale, by FFT with each field's spectrum computed once; the best
  `_CANDIDATES` fields go on;
- fine: the crop's centre (a `_MARGIN` px border left out, so a crop may overhang a field's edge by that much: a few
  do by some pixels) at full resolution, within `_SEARCH` px of the coarse position.
A crop matches when the fine NCC reaches `MIN_CORRELATION`. Keypoints (ORB, as `duplicates.overlap_pairs` uses
for fields) were tried and not used: blurred or pale crops give too few keypoints to fit a transform.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import fft
from skimage.feature import match_template

from blastscan.data.images import is_image_file, load_rgb
from blastscan.data.parallel import threaded_map
from blastscan.errors import DatasetError

#: Fine NCC at or above which a crop is taken to be cut from the field. Measured on ALL-IDB: true crops scored
#: >= 0.98 (125 of 260, 121 of them >= 0.999); the best wrong field of any crop <= 0.93.
MIN_CORRELATION = 0.95
#: Field pixels per crop pixel: the scale the search assumes (ALL-IDB2 crops are cut at the field's scale).
SCALE = 1.0
_COARSE = 8  # the coarse pass works at 1/_COARSE of full resolution
_CANDIDATES = 3  # fields per crop the fine pass checks (the true field ranked first in the coarse pass for all 125)
_MARGIN = 32  # crop border left out of the fine pass, at most a quarter of the crop's side
_SEARCH = 24  # full-resolution pixels the fine pass searches around the coarse position (3 coarse pixels)


@dataclass(frozen=True)
class CropSource:
    """Where one crop was cut from; `field` and the position are None when no field holds it."""

    crop: str  # crop file name, e.g. "Im001_1.tif"
    field: str | None  # file name of the field it was cut from, e.g. "Im001_1.jpg"
    x: float | None  # the crop's centre pixel in the field: column ...
    y: float | None  # ... and row
    scale: float | None  # field pixels per crop pixel
    score: float  # the best fine NCC found (also when below MIN_CORRELATION), 0 when no field could be searched


_COLUMNS = tuple(f.name for f in dataclass_fields(CropSource))  # the CSV's columns


@dataclass(frozen=True)
class _Candidate:
    crop: int
    left: int  # coarse estimate of the crop's top-left corner in the field, full-resolution pixels
    top: int


def _grey(path: Path, factor: int = 1) -> np.ndarray:
    """Greyscale uint8 pixels of `path`, shrunk by `factor` (area average)."""
    with Image.open(path) as probe:
        width, height = probe.size
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    # JPEGs decode at a reduced scale no smaller than the target: a 2592 px field ~8x faster in the coarse pass.
    image = Image.fromarray(load_rgb(path, min_side=min(size) if factor > 1 else None)).convert("L")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image)


def _window_sums(integral: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums over every h x w window, from integral images (..., H + 1, W + 1)."""
    return integral[..., h:, w:] - integral[..., :-h, w:] - integral[..., h:, :-w] + integral[..., :-h, :-w]


class _CoarseFields:
    """Fields of one shape at coarse scale: their spectra and integral images, made once for every crop."""

    def __init__(self, images: np.ndarray, workers: int) -> None:
        images = images.astype(np.float32)  # single precision: ~1.5x faster, and a coarse peak needs no more
        self.height, self.width = images.shape[1:]
        self.fft_shape = (fft.next_fast_len(self.height, real=True), fft.next_fast_len(self.width, real=True))
        self.workers = workers
        self.spectra = fft.rfft2(images, s=self.fft_shape, workers=workers)
        padded = np.pad(images.astype(np.float64), ((0, 0), (1, 0), (1, 0)))  # integral images need doubles
        self.sums = padded.cumsum(1).cumsum(2)
        self.squares = (padded**2).cumsum(1).cumsum(2)
        self._spreads: dict[tuple[int, int], np.ndarray] = {}

    def _spread(self, h: int, w: int) -> np.ndarray:
        """sqrt(sum of squared deviations) of every h x w window of every field (cached per template shape)."""
        if (h, w) not in self._spreads:
            s, s2 = _window_sums(self.sums, h, w), _window_sums(self.squares, h, w)
            self._spreads[(h, w)] = np.sqrt(np.maximum(s2 - s * s / (h * w), 0))
        return self._spreads[(h, w)]

    def peaks(self, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each field's best NCC with `template` and where (row, column of the top-left corner, coarse pixels)."""
        h, w = template.shape
        n = len(self.spectra)
        if h > self.height or w > self.width:
            return np.full(n, -1.0), np.zeros((n, 2), dtype=int)
        centred = template - template.mean()
        norm = float(np.sqrt((centred**2).sum()))
        if norm < 1e-6:  # a flat template correlates with nothing
            return np.full(n, -1.0), np.zeros((n, 2), dtype=int)
        spectrum = np.conj(fft.rfft2(centred, s=self.fft_shape, workers=self.workers))
        products = fft.irfft2(self.spectra * spectrum, s=self.fft_shape, workers=self.workers)
        spread = self._spread(h, w)
        products = products[:, : self.height - h + 1, : self.width - w + 1]
        ncc = np.where(spread > 1e-6, products / np.maximum(spread, 1e-6) / norm, 0.0).reshape(n, -1)
        best = ncc.argmax(axis=1)
        rows, columns = np.unravel_index(best, products.shape[1:])
        return ncc[np.arange(n), best], np.stack([rows, columns], axis=1)


def _coarse_candidates(crops: list[np.ndarray], fields: Sequence[Path], workers: int) -> dict[int, list[_Candidate]]:
    """For each field (by index), the crops whose best coarse matches include it, with the coarse positions."""
    coarse_fields = threaded_map(lambda p: _grey(p, _COARSE), fields, workers)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(coarse_fields):
        groups.setdefault(image.shape, []).append(index)
    banks = [(ids, _CoarseFields(np.stack([coarse_fields[i] for i in ids]), workers)) for ids in groups.values()]
    scores = np.full((len(crops), len(fields)), -1.0)
    corners = np.zeros((len(crops), len(fields), 2), dtype=int)
    for c, crop in enumerate(crops):
        size = (max(1, round(crop.shape[1] / _COARSE)), max(1, round(crop.shape[0] / _COARSE)))
        template = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BOX), dtype=np.float32)
        for ids, bank in banks:
            scores[c, ids], corners[c, ids] = bank.peaks(template)
    candidates: dict[int, list[_Candidate]] = {}
    for c in range(len(crops)):
        for f in np.argsort(-scores[c], kind="stable")[:_CANDIDATES]:
            if scores[c, f] > -1:
                top, left = corners[c, f] * _COARSE
                candidates.setdefault(int(f), []).append(_Candidate(c, int(left), int(top)))
    return candidates


def _fine_match(field: np.ndarray, crop: np.ndarray, near: _Candidate) -> tuple[float, float, float] | None:
    """NCC of the crop's centre near the coarse position at full resolution: (score, centre x, centre y)."""
    h, w = crop.shape
    mh, mw = min(_MARGIN, h // 4), min(_MARGIN, w // 4)
    template = crop[mh : h - mh, mw : w - mw]
    top, left = max(0, near.top + mh - _SEARCH), max(0, near.left + mw - _SEARCH)
    window = field[top : near.top + h - mh + _SEARCH, left : near.left + w - mw + _SEARCH]
    if window.shape[0] < template.shape[0] or window.shape[1] < template.shape[1] or template.std() < 1e-6:
        return None
    ncc = match_template(window, template)
    row, column = np.unravel_index(int(ncc.argmax()), ncc.shape)
    return float(ncc[row, column]), float(left + column - mw + (w - 1) / 2), float(top + row - mh + (h - 1) / 2)


def locate_crop_sources(crops: Sequence[Path], fields: Sequence[Path], *, workers: int = 2) -> list[CropSource]:
    """For each crop (in order), the field it was cut from and where, or field None when no field holds it.

    A crop is matched to the one field where its pixels correlate best, when that reaches MIN_CORRELATION (see the
    module docstring for the method and what it assumes: same scale, no rotation). All 260 ALL-IDB2 crops against
    all 55 ALL-IDB1 fields take 20-30 s on 2 cores.
    """
    crop_pixels = threaded_map(_grey, crops, workers)
    candidates = _coarse_candidates(crop_pixels, fields, workers) if fields else {}

    def fine(index: int) -> list[tuple[int, int, tuple[float, float, float]]]:
        field = _grey(fields[index]).astype(np.float32)
        found = [
            (near.crop, index, _fine_match(field, crop_pixels[near.crop].astype(np.float32), near))
            for near in candidates[index]
        ]
        return [(c, f, match) for c, f, match in found if match is not None]

    best: dict[int, tuple[int, tuple[float, float, float]]] = {}
    for per_field in threaded_map(fine, sorted(candidates), workers):
        for c, f, match in per_field:
            if c not in best or match[0] > best[c][1][0]:
                best[c] = (f, match)
    sources = []
    for c, path in enumerate(crops):
        if c not in best:
            sources.append(CropSource(path.name, None, None, None, None, 0.0))
            continue
        f, (score, x, y) = best[c]
        if score >= MIN_CORRELATION:
            sources.append(CropSource(path.name, fields[f].name, x, y, SCALE, score))
        else:
            sources.append(CropSource(path.name, None, None, None, None, score))
    return sources


def fields_seen_in_training(
    training_crops: Sequence[Path],
    fields: Sequence[Path],
    sources: Sequence[CropSource] | None = None,
    *,
    workers: int = 2,
) -> dict[str, list[str]]:
    """{field file name: [names of the training crops cut from it]} for the evaluated `fields`; {} = no overlap.

    `sources` (e.g. those a training run recorded) are used for the crops they name; crops it does not name are located
    against `fields`. Crops are matched to sources by file name.
    """
    known = {s.crop: s for s in sources or ()}
    missing = [p for p in training_crops if p.name not in known]
    if missing:
        known.update((s.crop, s) for s in locate_crop_sources(missing, fields, workers=workers))
    evaluated = {p.name for p in fields}
    seen: dict[str, list[str]] = {}
    for path in training_crops:
        field = known[path.name].field
        if field is not None and field in evaluated:
            seen.setdefault(field, []).append(path.name)
    return {p.name: seen[p.name] for p in fields if p.name in seen}


def field_images(folder: str | Path) -> list[Path]:
    """The smear-field images of an ALL-IDB1 folder (in its `im/` subfolder, else in the folder itself), sorted."""
    folder = Path(folder)
    images = folder / "im" if (folder / "im").is_dir() else folder
    if not images.is_dir():
        raise DatasetError(f"{folder}: no such folder of smear fields (expected ALL-IDB1's folder, with im/)")
    return sorted(p for p in images.iterdir() if is_image_file(p))


def resolve_fields(folder: str | Path, names: Sequence[str]) -> list[Path]:
    """The field images `names` (file names or stems, e.g. "Im001_1.jpg" or "Im001_1") in `folder`; a DatasetError
    names every one that is not there."""
    available = field_images(folder)
    by_name = {p.name: p for p in available} | {p.stem: p for p in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        listed = ", ".join(p.stem for p in available[:5]) + (", ..." if len(available) > 5 else "")
        raise DatasetError(
            f"field(s) {', '.join(unknown)} not found among the {len(available)} smear fields of {folder} "
            f"({listed or 'none'})"
        )
    return list(dict.fromkeys(by_name[n] for n in names))


def default_fields_root(crops_root: str | Path) -> Path | None:
    """ALL-IDB1's folder beside an ALL-IDB2 folder in the standard layout (`ALL_IDB/ALL_IDB2[/img]`, or `ALL_IDB`
    itself); None when `crops_root` is not laid out so or the folder is missing."""
    crops_root = Path(crops_root)
    for folder in (crops_root, crops_root.parent, crops_root.parent.parent):
        if folder.name == "ALL_IDB2":
            sibling = folder.parent / "ALL_IDB1"
            return sibling if sibling.is_dir() else None
    inside = crops_root / "ALL_IDB1"
    return inside if inside.is_dir() and (crops_root / "ALL_IDB2").is_dir() else None


def crop_sources_csv(sources: Sequence[CropSource], path: str | Path) -> Path:
    """`sources` as a CSV file with the dataclass's columns (empty cells for None); parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(_COLUMNS)
        for s in sources:
            writer.writerow(["" if getattr(s, c) is None else str(getattr(s, c)) for c in _COLUMNS])
    return path


def read_crop_sources(path: str | Path) -> list[CropSource]:
    """Crop sources written by `crop_sources_csv`; a DatasetError names the file (and line) when it is not one."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != _COLUMNS:
                raise DatasetError(f"{path}: not a crop sources file (columns {reader.fieldnames}; want {_COLUMNS})")
            return [_source_row(row, path, reader.line_num) for row in reader]
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such crop sources file") from None


def _source_row(row: dict[str, str], path: Path, line: int) -> CropSource:
    def number(key: str) -> float | None:
        return float(row[key]) if row[key] != "" else None

    try:
        score = number("score")
        values = {"crop": row["crop"], "field": row["field"] or None, "x": number("x"), "y": number("y")}
        return CropSource(**values, scale=number("scale"), score=0.0 if score is None else score)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}, line {line}: not a crop source ({exc})") from None
