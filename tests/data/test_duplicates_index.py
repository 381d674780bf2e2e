"""The near-duplicate search (multi-index hashing over 64-bit pHashes) finds exactly the pairs that comparing every
pair finds, on random hashes with planted pairs and on the real datasets, so the audit's findings are unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blastscan.data.audit import audit
from blastscan.data.duplicates import (
    DEFAULT_MIN_CORRELATION,
    DEFAULT_NEAR_THRESHOLD,
    _index_pairs,
    _index_plan,
    _popcount_swar,
    detail_correlation,
    fingerprints,
    hamming_pairs,
)
from blastscan.data.scan import scan

# The plans the index uses from a handful of hashes up to 10^7 (fewer, wider chunks with larger radii as N grows).
PLAN_SIZES = (10, 10**4, 10**5, 10**6, 10**7)


BITS_IN = np.array([bin(v).count("1") for v in range(1 << 16)], dtype=np.int64)  # set bits of each 16-bit value


def brute_force_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """(first, second, distance) for every pair within `max_distance` bits, by comparing every pair."""
    pairs = []
    for i in range(len(hashes) - 1):
        xor = hashes[i] ^ hashes[i + 1 :]
        distances = sum(BITS_IN[(xor >> np.uint64(16 * k)) & np.uint64(0xFFFF)] for k in range(4))
        pairs += [(i, i + 1 + j, int(distances[j])) for j in np.flatnonzero(distances <= max_distance).tolist()]
    return pairs


def as_triples(found: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[tuple[int, int, int]]:
    return list(zip(*(a.tolist() for a in found), strict=True))


def flip(value: int, bits: np.ndarray) -> int:
    """`value` with each listed bit toggled (a bit listed twice is toggled back)."""
    for bit in bits:
        value ^= 1 << int(bit)
    return value


def hashes_with_planted_pairs(threshold: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """400 random hashes; a near pair at every distance 0..threshold+1; a clump of hashes sharing one 32-bit half
    (a crowded bucket in every chunk of that half) and one repeated 20 times."""
    rng = np.random.default_rng(seed)
    values = [int(v) for v in rng.integers(0, 2**64, size=400, dtype=np.uint64)]
    planted = []
    for distance in range(threshold + 2):
        base = int(rng.integers(0, 2**64, dtype=np.uint64))
        planted.append((len(values), len(values) + 1, distance))
        values += [base, flip(base, rng.choice(64, size=distance, replace=False))]
    half = int(rng.integers(0, 2**32))
    values += [(int(v) << 32) | half for v in rng.integers(0, 2**32, size=60)]
    values += [values[0]] * 20
    order = rng.permutation(len(values))  # planted rows scattered, and in either order
    where = np.argsort(order)
    planted = [(int(min(where[a], where[b])), int(max(where[a], where[b])), d) for a, b, d in planted]
    return np.array(values, dtype=np.uint64)[order], planted


@pytest.mark.parametrize("threshold", [0, 1, 3, DEFAULT_NEAR_THRESHOLD, 11, 16])
def test_index_finds_exactly_the_pairs_of_the_exhaustive_search(threshold: int) -> None:
    hashes, planted = hashes_with_planted_pairs(threshold)
    expected = brute_force_pairs(hashes, threshold)
    found = set(expected)
    assert {p for p in planted if p[2] <= threshold} <= found  # every planted pair within the threshold ...
    assert not {(a, b) for a, b, d in planted if d > threshold} & {(a, b) for a, b, _ in found}  # ... only those
    for n in PLAN_SIZES:
        assert as_triples(_index_pairs(hashes, threshold, _index_plan(n, threshold))) == expected, n
    for method in ("auto", "index", "exhaustive"):
        assert as_triples(hamming_pairs(hashes, threshold, method)) == expected, method


@pytest.mark.parametrize("threshold", [3, DEFAULT_NEAR_THRESHOLD, 16])
@pytest.mark.parametrize("plan_size", PLAN_SIZES)
def test_index_finds_pairs_at_the_pigeonhole_boundary(threshold: int, plan_size: int) -> None:
    # The hardest pairs for a plan: every chunk but one differs in radius + 1 bits, that one in exactly its radius.
    plan = _index_plan(plan_size, threshold)
    rng = np.random.default_rng(plan_size + threshold)
    values = [int(v) for v in rng.integers(0, 2**64, size=200, dtype=np.uint64)]
    for tight in range(len(plan)):
        for _ in range(3):
            bits = [
                shift + rng.choice(width, size=min(width, radius + (k != tight)), replace=False)
                for k, (shift, width, radius) in enumerate(plan)
            ]
            values += [values[-1], flip(values[-1], np.concatenate(bits))]
    hashes = np.array(values, dtype=np.uint64)
    expected = brute_force_pairs(hashes, threshold)
    assert sum(d == threshold for _, _, d in expected) >= len(plan)  # the boundary pairs are within the threshold
    assert as_triples(_index_pairs(hashes, threshold, plan)) == expected


def test_index_plans_satisfy_the_pigeonhole_bound() -> None:
    for threshold in range(64):
        for n in PLAN_SIZES:
            plan = _index_plan(n, threshold)
            assert sum(width for _, width, _ in plan) == 64
            assert [shift for shift, _, _ in plan] == [sum(w for _, w, _ in plan[:k]) for k in range(len(plan))]
            assert sum(radius + 1 for _, _, radius in plan) > threshold
            assert all(0 <= radius <= width <= 22 for _, width, radius in plan)


near_hash_sets = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=6).flatmap(
    lambda bases: st.lists(
        st.tuples(st.sampled_from(bases), st.lists(st.integers(0, 63), max_size=14)), min_size=0, max_size=60
    )
)


@settings(max_examples=60, deadline=None)
@given(near_hash_sets, st.integers(0, 20), st.sampled_from(PLAN_SIZES))
def test_index_equals_brute_force_on_clustered_hashes(rows: list, threshold: int, plan_size: int) -> None:
    hashes = np.array([flip(base, np.array(bits, dtype=int)) for base, bits in rows], dtype=np.uint64)
    expected = brute_force_pairs(hashes, threshold) if len(hashes) else []
    assert as_triples(_index_pairs(hashes, threshold, _index_plan(plan_size, threshold))) == expected
    assert as_triples(hamming_pairs(hashes, threshold)) == expected


def test_edge_cases_and_popcount() -> None:
    hashes = np.array([0, 2**64 - 1, 0], dtype=np.uint64)
    assert as_triples(hamming_pairs(hashes, 63)) == [(0, 2, 0)]
    assert as_triples(hamming_pairs(hashes, 64)) == [(0, 1, 64), (0, 2, 0), (1, 2, 64)]
    assert as_triples(hamming_pairs(hashes, -1)) == []
    assert as_triples(hamming_pairs(hashes[:1], 10)) == []
    with pytest.raises(ValueError, match="method"):
        hamming_pairs(hashes, 10, method="fast")
    values = np.random.default_rng(0).integers(0, 2**64, size=1000, dtype=np.uint64)
    assert _popcount_swar(values).tolist() == [bin(int(v)).count("1") for v in values]


def exhaustive_findings(paths: list[Path]) -> set[tuple[int, int, str, float]]:
    """What the audit reported before the index: every pair within the threshold by brute force, then confirmed
    the same way (same bytes or pixels: exact; else matching fine detail: near)."""
    prints = fingerprints(paths)
    hashes = np.array([p.phash for p in prints], dtype=np.uint64)
    found = set()
    for i, j, distance in brute_force_pairs(hashes, DEFAULT_NEAR_THRESHOLD):
        a, b = prints[i], prints[j]
        if a.file_sha256 == b.file_sha256 or a.pixel_sha256 == b.pixel_sha256:
            found.add((i, j, "exact", float(distance)))
        elif detail_correlation(a.path, b.path) >= DEFAULT_MIN_CORRELATION:
            found.add((i, j, "near", float(distance)))
    for method in ("index", "exhaustive", "auto"):
        assert as_triples(hamming_pairs(hashes, DEFAULT_NEAR_THRESHOLD, method)) == brute_force_pairs(
            hashes, DEFAULT_NEAR_THRESHOLD
        )
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "exact", "near"), [("allidb2_dir", 1, 10), ("deepapl_dir", 10, 0)])
def test_real_audit_findings_equal_the_exhaustive_search(
    dataset: str, exact: int, near: int, request: pytest.FixtureRequest
) -> None:
    manifest = scan(request.getfixturevalue(dataset), verify=False).manifest
    report = audit(manifest)
    assert not report.unreadable
    rows = {str(p): k for k, p in enumerate(manifest.table["path"])}
    reported = {(rows[d.first], rows[d.second], d.kind, d.distance) for d in report.duplicates}
    assert reported == exhaustive_findings(manifest.absolute_paths())
    kinds = [d.kind for d in report.duplicates]
    assert (kinds.count("exact"), kinds.count("near")) == (exact, near)  # the README's table
