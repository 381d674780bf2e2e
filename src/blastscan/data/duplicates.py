"""Finding exact and near-duplicate images, and grouping them so a split cannot separate them.

Three checks, from cheap to thorough:
- exact: SHA-256 of the file bytes and of the decoded pixels (the same picture saved twice);
- near: perceptual hash (pHash, 64 bits) Hamming distance at most a threshold (re-saved, re-coloured, slightly
  shifted crops of one cell), confirmed by the correlation of small greyscale thumbnails (CellaVision cells all
  look alike to a 64-bit hash: on DeepAPL, hash-only pairs of different cells correlate <= 0.67, true pairs on
  ALL-IDB2 >= 0.75);
- overlap: ORB keypoints matched under a similarity transform with RANSAC, for smear fields, where one field can be
  a zoomed or shifted view of another (ALL-IDB1 has such pairs; a global hash does not see them).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from skimage.feature import ORB, match_descriptors
from skimage.measure import ransac
from skimage.transform import SimilarityTransform

from blastscan.data.images import load_rgb

#: pHash distance at or below which two images count as near duplicates. Chosen by inspecting ALL-IDB2: pairs at
#: <= 10 were the same cell (re-cropped or re-lit); pairs at 12-14 were mostly different cells.
DEFAULT_NEAR_THRESHOLD = 10
#: Thumbnail correlation a near-duplicate candidate must reach (see the module docstring for how it was chosen).
DEFAULT_MIN_CORRELATION = 0.7
_THUMBNAIL = 32
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
    thumbnail: np.ndarray  # (32, 32) float32 greyscale, zero mean, unit variance


def _correlation(a: Fingerprint, b: Fingerprint) -> float:
    return float((a.thumbnail * b.thumbnail).mean())


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
    image = Image.fromarray(pixels)
    phash = imagehash.phash(image)
    grey = np.asarray(image.convert("L").resize((_THUMBNAIL, _THUMBNAIL), Image.Resampling.BILINEAR), np.float32)
    thumbnail = (grey - grey.mean()) / (grey.std() + 1e-6)
    return Fingerprint(
        file_sha256=hashlib.sha256(data).hexdigest(),
        pixel_sha256=hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest(),
        phash=int(str(phash), 16),
        width=pixels.shape[1],
        height=pixels.shape[0],
        thumbnail=thumbnail,
    )


def fingerprints(
    paths: Sequence[Path], workers: int = 4, progress: Callable[[int], None] | None = None
) -> list[Fingerprint]:
    """`fingerprint` for each path, decoded in threads."""
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(fingerprint, paths):
            results.append(result)
            if progress is not None:
                progress(1)
    return results


def _hamming_matrix_rows(hashes: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Hamming distances between hashes[start:stop] and all hashes, as uint8 (stop-start, N)."""
    xor = hashes[start:stop, None] ^ hashes[None, :]
    return np.unpackbits(xor.view(np.uint8).reshape((*xor.shape, 8)), axis=-1).sum(axis=-1, dtype=np.uint8)


def hash_duplicate_pairs(
    prints: Sequence[Fingerprint],
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
) -> list[DuplicatePair]:
    """Exact pairs (same bytes or same pixels), and near pairs: pHash distance <= `near_threshold` and thumbnail
    correlation >= `min_correlation`."""
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
            elif _correlation(prints[i], prints[c]) >= min_correlation:
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
    with ThreadPoolExecutor(max_workers=workers) as pool:
        features = list(pool.map(_orb_features, paths))
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
