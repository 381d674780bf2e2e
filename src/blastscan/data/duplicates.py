"""Finding exact and near-duplicate images, and grouping them so a split cannot separate them.

Three checks, from cheap to thorough:
- exact: SHA-256 of the file bytes and of the decoded pixels (the same picture saved twice);
- near: perceptual hash (pHash, 64 bits) Hamming distance at most a threshold (re-saved, re-coloured, slightly
  shifted crops of one cell), confirmed by comparing fine detail: the correlation of high-pass-filtered 128 px
  greyscale images after aligning them by phase correlation. A 64-bit hash sees only "a dark disc in the middle",
  so different centred cells often pass it; their fine detail does not match (measured: hash-only pairs of
  different cells correlate <= 0.32 on DeepAPL and <= 0.62 on synthetic cells; true pairs on ALL-IDB2 >= 0.86);
- overlap: ORB keypoints matched under a similarity transform with RANSAC, for smear fields, where one field can be
  a zoomed or shifted view of another (ALL-IDB1 has such pairs; a global hash does not see them).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.feature import ORB, match_descriptors
from skimage.measure import ransac
from skimage.registration import phase_cross_correlation
from skimage.transform import SimilarityTransform

from blastscan.data.images import load_rgb
from blastscan.data.parallel import threaded_map

#: pHash distance at or below which two images count as near duplicates. Chosen by inspecting ALL-IDB2: pairs at
#: <= 10 were the same cell (re-cropped or re-lit); pairs at 12-14 were mostly different cells.
DEFAULT_NEAR_THRESHOLD = 10
#: Aligned fine-detail correlation a near-duplicate candidate must reach (see the module docstring).
DEFAULT_MIN_CORRELATION = 0.75
_DETAIL_SIZE = 128
#: RANSAC inliers at or above which two fields are the same scene (ALL-IDB1: same-scene pairs had 12-14, others <= 5).
DEFAULT_OVERLAP_INLIERS = 10
#: Images whose longer side is at least this are fields (not single-cell crops) and get the overlap check.
FIELD_MIN_SIDE = 1000
_OVERLAP_WIDTH = 640


@dataclass(frozen=True)
class Fingerprint:
    """Hashes of one image."""

    file_sha256: str
    pixel_sha256: str
    phash: int
    width: int
    height: int
    path: Path


def _detail(path: Path) -> np.ndarray:
    """High-pass-filtered greyscale image at a fixed size: what distinguishes one cell from a look-alike."""
    grey = Image.fromarray(load_rgb(path)).convert("L").resize((_DETAIL_SIZE, _DETAIL_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.float32)
    return pixels - ndimage.gaussian_filter(pixels, 3)


def detail_correlation(first: Path, second: Path) -> float:
    """Correlation of two images' fine detail after aligning them (phase correlation, translation only)."""
    a, b = _detail(first), _detail(second)
    shift, _, _ = phase_cross_correlation(a, b, normalization=None)
    moved = ndimage.shift(b, shift, order=1, mode="constant")
    dy, dx = (min(int(abs(round(float(v)))), _DETAIL_SIZE // 2 - 1) for v in shift)
    overlap = (slice(dy, _DETAIL_SIZE - dy), slice(dx, _DETAIL_SIZE - dx))
    x, y = a[overlap].ravel(), moved[overlap].ravel()
    if x.std() < 1e-6 or y.std() < 1e-6:  # blank images: no detail to compare, so no evidence of a duplicate
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


@dataclass(frozen=True)
class DuplicatePair:
    """Two manifest rows (by index) that show the same picture or scene."""

    first: int
    second: int
    kind: str  # "exact", "near" or "overlap"
    distance: float  # pHash bits for exact/near, RANSAC inliers for overlap


def fingerprint(path: Path) -> Fingerprint:
    """Hash one image file (its bytes, its decoded pixels, its perceptual hash).

    Results are memoised per (path, size, modification time), so a changed file is hashed again.
    """
    stat = path.stat()
    return _fingerprint_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=50_000)
def _fingerprint_cached(path: Path, size: int, mtime_ns: int) -> Fingerprint:
    del size, mtime_ns  # part of the cache key only
    data = path.read_bytes()
    pixels = load_rgb(path)
    phash = imagehash.phash(Image.fromarray(pixels))
    return Fingerprint(
        file_sha256=hashlib.sha256(data).hexdigest(),
        pixel_sha256=hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest(),
        phash=int(str(phash), 16),
        width=pixels.shape[1],
        height=pixels.shape[0],
        path=path,
    )


def fingerprints(
    paths: Sequence[Path], workers: int = 4, progress: Callable[[int], None] | None = None
) -> list[Fingerprint]:
    """`fingerprint` for each path, decoded in threads."""
    return threaded_map(fingerprint, paths, workers, progress)


def _hamming_matrix_rows(hashes: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Hamming distances between hashes[start:stop] and all hashes, as uint8 (stop-start, N)."""
    xor = hashes[start:stop, None] ^ hashes[None, :]
    return np.unpackbits(xor.view(np.uint8).reshape((*xor.shape, 8)), axis=-1).sum(axis=-1, dtype=np.uint8)


def hash_duplicate_pairs(
    prints: Sequence[Fingerprint],
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
) -> list[DuplicatePair]:
    """Exact pairs (same bytes or same pixels), and near pairs: pHash distance <= `near_threshold` and
    aligned fine-detail correlation >= `min_correlation`."""
    hashes = np.array([p.phash for p in prints], dtype=np.uint64)
    pairs: list[DuplicatePair] = []
    block = 512  # keeps the (block, N) distance matrix small for DeepAPL-sized manifests
    for start in range(0, len(hashes), block):
        stop = min(start + block, len(hashes))
        distances = _hamming_matrix_rows(hashes, start, stop)
        rows, cols = np.nonzero(distances <= near_threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if c <= i:
                continue
            same = prints[i].file_sha256 == prints[c].file_sha256 or prints[i].pixel_sha256 == prints[c].pixel_sha256
            if same:
                pairs.append(DuplicatePair(i, c, "exact", float(distances[r, c])))
            elif detail_correlation(prints[i].path, prints[c].path) >= min_correlation:
                pairs.append(DuplicatePair(i, c, "near", float(distances[r, c])))
    return pairs


def _orb_features(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    pixels = load_rgb(path, min_side=_OVERLAP_WIDTH)
    image = Image.fromarray(pixels).convert("L")
    scale = _OVERLAP_WIDTH / image.width
    grey = np.asarray(image.resize((_OVERLAP_WIDTH, max(1, round(image.height * scale)))), dtype=np.float64) / 255
    orb = ORB(n_keypoints=300, fast_threshold=0.05)
    try:
        orb.detect_and_extract(grey)
    except RuntimeError:  # a blank field has no keypoints: it can overlap nothing
        return None
    return orb.keypoints, orb.descriptors


def _ransac_inliers(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], min_inliers: int) -> int:
    matches = match_descriptors(a[1], b[1], cross_check=True, max_ratio=0.8)
    if len(matches) < min_inliers:  # too few matches to ever reach the inlier bar: skip RANSAC
        return 0
    source, target = a[0][matches[:, 0]][:, ::-1], b[0][matches[:, 1]][:, ::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no inliers found" is an answer here, not a problem
        _, inliers = ransac(
            (source, target), SimilarityTransform, min_samples=3, residual_threshold=2, max_trials=200, rng=0
        )
    return 0 if inliers is None else int(inliers.sum())


def overlap_pairs(
    paths: Sequence[Path], min_inliers: int = DEFAULT_OVERLAP_INLIERS, workers: int = 4
) -> list[DuplicatePair]:
    """Pairs of smear fields that show the same scene (zoomed or shifted), by ORB + RANSAC; O(N^2) pair checks."""
    features = threaded_map(_orb_features, paths, workers)
    pairs = []
    for i, j in itertools.combinations(range(len(paths)), 2):
        if features[i] is None or features[j] is None:
            continue
        inliers = _ransac_inliers(features[i], features[j], min_inliers)  # type: ignore[arg-type]
        if inliers >= min_inliers:
            pairs.append(DuplicatePair(i, j, "overlap", float(inliers)))
    return pairs


def duplicate_groups(n: int, pairs: Sequence[DuplicatePair]) -> list[int]:
    """Connected components of the duplicate graph: a group number per row (rows without duplicates alone)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in pairs:
        a, b = find(pair.first), find(pair.second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = [find(i) for i in range(n)]
    numbering = {root: k for k, root in enumerate(dict.fromkeys(roots))}
    return [numbering[r] for r in roots]


def duplicate_pairs(
    prints: Sequence[Fingerprint],
    paths: Sequence[Path],
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    check_overlap: bool | None = None,
    workers: int = 4,
) -> tuple[list[DuplicatePair], bool]:
    """Every duplicate pair among already fingerprinted images, and whether the overlap check ran.

    `check_overlap=None` runs the field-overlap check only when the images are smear fields (longer side >=
    FIELD_MIN_SIDE) and there are at most 300 of them, since it compares every pair.
    """
    pairs = hash_duplicate_pairs(prints, near_threshold)
    if check_overlap is None:
        check_overlap = 0 < len(prints) <= 300 and all(max(p.width, p.height) >= FIELD_MIN_SIDE for p in prints)
    if check_overlap:
        known = {(p.first, p.second) for p in pairs}
        pairs += [p for p in overlap_pairs(paths, workers=workers) if (p.first, p.second) not in known]
    return sorted(pairs, key=lambda p: (p.first, p.second)), check_overlap


def find_duplicates(
    paths: Sequence[Path],
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    check_overlap: bool | None = None,
    workers: int = 4,
) -> list[DuplicatePair]:
    """Fingerprint every image and list every duplicate pair (see `duplicate_pairs`)."""
    prints = fingerprints(paths, workers=workers)
    return duplicate_pairs(prints, paths, near_threshold, check_overlap, workers)[0]
