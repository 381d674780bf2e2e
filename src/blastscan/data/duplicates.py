"""Finding exact and near-duplicate images, and grouping them so a split cannot separate them.

Three checks, from cheap to thorough:
- exact: SHA-256 of the file bytes and of the decoded pixels (the same picture saved twice);
- near: perceptual hash (pHash, 64 bits) Hamming distance at most a threshold (re-saved, re-coloured, slightly
  shifted crops of one cell), confirmed by comparing fine detail: the correlation of high-pass-filtered 128 px
  greyscale images after aligning them by phase correlation. A 64-bit hash sees only "a dark disc in the middle",
  so different centred cells often pass it; their fine detail does not match (measured: hash-only pairs of
  different cells correlate <= 0.32 on DeepAPL and <= 0.62 on synthetic cells; true pairs on ALL-IDB2 >= 0.86).
  The pairs within the threshold are found by multi-index hashing (`hamming_pairs`): exactly the pairs that
  comparing every pair finds, in memory that grows linearly with the number of images;
- overlap: ORB keypoints matched under a similarity transform with RANSAC, for smear fields, where one field can be
  a zoomed or shifted view of another (ALL-IDB1 has such pairs; a global hash does not see them).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
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


#: Largest chunk of the hash that multi-index hashing buckets directly (a table of 2**22 offsets, 32 MB).
_MAX_CHUNK_BITS = 22
#: Candidate pairs (or matrix cells) compared at once: bounds the working memory at a few hundred MB.
_BLOCK = 1 << 21
# Rough seconds per unit of work, measured on one core with numpy 2: one probe of one hash; one candidate pair
# gathered and compared; one cell of the exhaustive distance matrix; the fixed cost of one probe pass; one bucket.
_COST_PROBE, _COST_CANDIDATE, _COST_CELL, _COST_PASS, _COST_TABLE = 2.6e-8, 1.9e-8, 2.5e-9, 1e-4, 5e-9


def _popcount_swar(values: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64, as uint8, by bit arithmetic (for numpy < 2, which lacks bitwise_count)."""
    v = values - ((values >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((v * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.uint8)


_popcount: Callable[[np.ndarray], np.ndarray] = getattr(np, "bitwise_count", _popcount_swar)


def _flip_masks(width: int, radius: int) -> list[int]:
    """Every `width`-bit mask with at most `radius` bits set, 0 first."""
    return [sum(1 << b for b in bits) for k in range(radius + 1) for bits in itertools.combinations(range(width), k)]


def _index_plan(n: int, max_distance: int) -> tuple[tuple[int, int, int], ...]:
    """Chunks (shift, width, radius) of the 64-bit hash for multi-index hashing, the cheapest for `n` hashes.

    Pigeonhole: if two hashes differ in at most `max_distance` bits and the hash is cut into m chunks with radii
    summing to at least max_distance - m + 1, then in some chunk they differ in at most that chunk's radius bits
    (otherwise they would differ in at least sum(radius + 1) > max_distance bits).
    """
    fewest = -(-64 // _MAX_CHUNK_BITS)  # chunks, so that each fits a bucket table
    best: tuple[float, tuple[tuple[int, int, int], ...]] | None = None
    for m in range(fewest, max(fewest, min(max_distance + 1, 64)) + 1):
        widths = [64 // m + (k < 64 % m) for k in range(m)]
        spare = max(0, max_distance - m + 1)
        radii = [min(w, spare // m + (k < spare % m)) for k, w in enumerate(widths)]
        if sum(radii) < spare:
            continue
        plan = tuple(zip([sum(widths[:k]) for k in range(m)], widths, radii, strict=True))
        cost = _plan_cost(n, plan)
        if best is None or cost < best[0]:
            best = (cost, plan)
    assert best is not None  # m = fewest always qualifies
    return best[1]


def _plan_cost(n: int, plan: Sequence[tuple[int, int, int]]) -> float:
    """Estimated seconds of `_index_pairs` on `n` uniformly random hashes."""
    cost = 0.0
    for _, w, r in plan:
        probes = sum(math.comb(w, k) for k in range(r + 1))
        cost += 2**w * _COST_TABLE + probes * (_COST_PASS + n * _COST_PROBE + n * n / 2 / 2**w * _COST_CANDIDATE)
    return cost


def _index_pairs(
    hashes: np.ndarray, max_distance: int, plan: Sequence[tuple[int, int, int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-index hashing: for each chunk, bucket the hashes by its value, probe every bucket within the chunk's
    radius, and keep candidates within `max_distance` bits; a pair is kept only at the first chunk that finds it."""
    n = len(hashes)
    rows = np.arange(n, dtype=np.int64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for chunk, (shift, width, radius) in enumerate(plan):
        keys = ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        members = np.argsort(keys, kind="stable")  # row numbers, grouped by bucket
        offsets = np.zeros((1 << width) + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys, minlength=1 << width), out=offsets[1:])
        for mask in _flip_masks(width, radius):
            # A pair whose chunks differ by `mask` is probed once: from the row with 0 in mask's top bit (or, for
            # mask 0, from both rows, keeping first < second below).
            queries = rows if mask == 0 else np.flatnonzero((keys & (1 << (mask.bit_length() - 1))) == 0)
            probed = keys[queries] ^ mask
            starts = offsets[probed]
            counts = offsets[probed + 1] - starts
            hit = counts > 0
            queries, starts, counts = queries[hit], starts[hit], counts[hit]
            ends = np.cumsum(counts)
            pieces = np.searchsorted(ends, np.arange(_BLOCK, ends[-1], _BLOCK)) + 1 if len(ends) else []
            for q, s, c in zip(*(np.split(a, pieces) for a in (queries, starts, counts)), strict=True):
                if not len(q):
                    continue
                before = np.cumsum(c) - c
                first = np.repeat(q, c)
                second = members[np.repeat(s - before, c) + np.arange(int(before[-1] + c[-1]))]
                if mask == 0:
                    keep = second > first
                    first, second = first[keep], second[keep]
                xor = hashes[first] ^ hashes[second]
                keep = _popcount(xor) <= max_distance
                for earlier_shift, earlier_width, earlier_radius in plan[:chunk]:
                    part = (xor >> np.uint64(earlier_shift)) & np.uint64((1 << earlier_width) - 1)
                    keep &= _popcount(part) > earlier_radius
                if keep.any():
                    first, second = first[keep], second[keep]
                    found.append((np.minimum(first, second), np.maximum(first, second), _popcount(xor[keep])))
    return _sorted_pairs(found)


def _exhaustive_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair compared, a block of rows at a time against the rows after them."""
    n = len(hashes)
    block = max(1, _BLOCK // max(n, 1))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, n - 1, block):
        stop = min(start + block, n - 1)
        distances = _popcount(hashes[start:stop, None] ^ hashes[None, start + 1 :])
        r, c = np.nonzero(distances <= max_distance)
        keep = c >= r  # column c is row start + 1 + c: after row start + r
        r, c = r[keep], c[keep]
        found.append((r + start, c + start + 1, distances[r, c]))
    return _sorted_pairs(found)


def _sorted_pairs(found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    first, second, distance = (np.concatenate(parts) for parts in zip(*found, strict=True))
    order = np.lexsort((second, first))
    return first[order].astype(np.int64), second[order].astype(np.int64), distance[order].astype(np.uint8)


def hamming_pairs(
    hashes: np.ndarray, max_distance: int, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of 64-bit hashes that differ in at most `max_distance` bits: row arrays `first < second` and the
    distances, sorted by (first, second).

    `method`: "index" (multi-index hashing: the hash cut into chunks, rows bucketed by each chunk's value, only
    rows in nearby buckets compared; see `_index_plan`), "exhaustive" (every pair, a block at a time) or "auto",
    whichever a cost estimate says is faster. All give exactly the same pairs, in memory linear in len(hashes)
    (plus the pairs found).
    """
    if method not in ("auto", "index", "exhaustive"):
        raise ValueError(f"method must be 'auto', 'index' or 'exhaustive', not {method!r}")
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if n < 2 or max_distance < 0:
        return _sorted_pairs([])
    if method == "exhaustive" or max_distance >= 64:
        return _exhaustive_pairs(hashes, max_distance)
    plan = _index_plan(n, max_distance)
    if method == "auto" and n * (n - 1) / 2 * _COST_CELL < _plan_cost(n, plan):
        return _exhaustive_pairs(hashes, max_distance)
    return _index_pairs(hashes, max_distance, plan)


def hash_duplicate_pairs(
    prints: Sequence[Fingerprint],
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
) -> list[DuplicatePair]:
    """Exact pairs (same bytes or same pixels), and near pairs: pHash distance <= `near_threshold` and
    aligned fine-detail correlation >= `min_correlation`."""
    hashes = np.fromiter((p.phash for p in prints), dtype=np.uint64, count=len(prints))
    pairs: list[DuplicatePair] = []
    for i, c, distance in zip(*(a.tolist() for a in hamming_pairs(hashes, near_threshold)), strict=True):
        same = prints[i].file_sha256 == prints[c].file_sha256 or prints[i].pixel_sha256 == prints[c].pixel_sha256
        if same:
            pairs.append(DuplicatePair(i, c, "exact", float(distance)))
        elif detail_correlation(prints[i].path, prints[c].path) >= min_correlation:
            pairs.append(DuplicatePair(i, c, "near", float(distance)))
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
