"""Time and peak memory of the data audit's duplicate search on 10^4, 10^5 and 10^6 synthetic rows.

Each size runs in its own process, so its peak resident memory (VmHWM in /proc/self/status) is its own. In it:
  search   `hamming_pairs` over N random 64-bit pHashes with planted pairs (exact copies, and near pairs at
           distances 1..threshold+1): the candidate search that used to compare every pair
  audit    `audit()` itself on an N-row manifest with a patient-level split: every per-row step runs (the threaded
           fingerprint pass, the hash search, the exact / fine-detail confirmation of each candidate, clusters,
           label conflicts, split leaks), except that decoding each image is replaced by a look-up of its synthetic
           fingerprint. Planted near pairs point at one textured image and all other rows at a blank one, so every
           candidate is confirmed by decoding real files and only the planted pairs pass.
The child checks that the audit reports exactly the planted pairs. Targets (issue 10): 10^6 rows under 2 GB and
under 10 minutes on 2 cores. Writes JSON (default benchmarks/results/audit_scaling.json).

    python benchmarks/audit_scaling.py [--rows 10000 100000 1000000] [--threshold 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
PLANTED_EXACT = 20


def _status_mb(field: str) -> float:
    match = re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def _images(folder: Path) -> tuple[Path, Path]:
    """A blank image (no fine detail: never a near duplicate) and a textured one (its own near duplicate)."""
    blank, textured = folder / "blank.png", folder / "textured.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(blank)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(textured)
    return blank, textured


def _hashes(rows: int, threshold: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Random hashes with planted pairs (first, second, distance): exact copies first, then one near pair at each
    distance 1..threshold+1 (the last must not be found)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=rows, dtype=np.uint64)
    planted = []
    for k, distance in enumerate([0] * PLANTED_EXACT + list(range(1, threshold + 2))):
        first, second = 2 * k * (rows // 100), 2 * k * (rows // 100) + 1
        bits = rng.choice(64, size=distance, replace=False)
        hashes[second] = hashes[first] ^ np.uint64(sum(1 << int(b) for b in bits))
        planted.append((first, second, distance))
    return hashes, planted


def child(rows: int, threshold: int, folder: Path) -> dict[str, float | int]:
    """One size, in this process: the search alone, then the whole audit."""
    from blastscan.data import audit as audit_module
    from blastscan.data.duplicates import Fingerprint, hamming_pairs
    from blastscan.data.manifest import Manifest
    from blastscan.data.splits import SplitResult

    rss_imports = _status_mb("VmRSS")
    hashes, planted = _hashes(rows, threshold)
    start = time.perf_counter()
    first, second, _ = hamming_pairs(hashes, threshold)
    search_s = time.perf_counter() - start
    peak_search = _status_mb("VmHWM")
    found = set(zip(first.tolist(), second.tolist(), strict=True))
    expected = {(a, b) for a, b, d in planted if d <= threshold}
    assert expected <= found and not {(a, b) for a, b, d in planted if d > threshold} & found

    blank, textured = _images(folder)
    exact = {b: a for a, b, d in planted if d == 0}
    near = {i for a, b, d in planted if 0 < d <= threshold for i in (a, b)}
    prints = [
        Fingerprint(
            file_sha256=f"{exact.get(i, i):064x}",
            pixel_sha256=f"{exact.get(i, i) + rows:064x}",
            phash=int(h),
            width=64,
            height=64,
            path=textured if i in near else blank,
        )
        for i, h in enumerate(hashes.tolist())
    ]
    names = [f"cells/{i:07d}.png" for i in range(rows)]
    patients = [f"P{i % (rows // 50)}" for i in range(rows)]  # 50 cells per patient, interleaved
    table = pd.DataFrame(
        {
            "path": names,
            "label": np.where(np.arange(rows) % 3 == 0, "leukemic", "normal"),
            "patient_id": patients,
            "group_id": patients,
            "dataset": "synthetic",
        }
    )
    manifest = Manifest(table=table, root=folder, format="synthetic")
    side = np.array(["train", "val", "test"])[[(i % (rows // 50)) % 3 for i in range(rows)]]
    splits = SplitResult(table=pd.DataFrame({"path": names, "split": side}), metadata={"level": "patient"})
    audit_module.fingerprint = lambda path: prints[int(Path(path).stem)]  # decoding replaced by a look-up
    start = time.perf_counter()
    report = audit_module.audit(manifest, splits, near_threshold=threshold)
    audit_s = time.perf_counter() - start
    kinds = [d.kind for d in report.duplicates]
    assert kinds.count("exact") == PLANTED_EXACT and kinds.count("near") == threshold, kinds
    assert not report.patient_leaks
    return {
        "rows": rows,
        "candidate_pairs": len(found),
        "search_s": round(search_s, 2),
        "peak_rss_search_mb": round(peak_search),
        "audit_s": round(audit_s, 2),
        "peak_rss_mb": round(_status_mb("VmHWM")),
        "rss_after_imports_mb": round(rss_imports),
        "exact_pairs": kinds.count("exact"),
        "near_pairs": kinds.count("near"),
        "duplicates_straddling_splits": len(report.duplicate_leaks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--threshold", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "audit_scaling.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threshold, args.folder)))
        return
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, __file__, "--child", str(rows), "--threshold", str(args.threshold)]
            done = subprocess.run([*command, "--folder", tmp], check=True, capture_output=True, text=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(figures)
        print(f"{rows:>9,} rows: search {figures['search_s']:.1f} s (peak RSS {figures['peak_rss_search_mb']} MB), "
              f"whole audit {figures['audit_s']:.1f} s, peak RSS {figures['peak_rss_mb']} MB "
              f"({figures['candidate_pairs']} candidate pairs; found {figures['exact_pairs']} exact + "
              f"{figures['near_pairs']} near, as planted)", flush=True)  # fmt: skip
    report = {
        "benchmark": "audit_scaling",
        "hashes": "uniform random 64-bit, with planted exact and near pairs; images not decoded (synthetic "
        "fingerprints), candidates confirmed on two small image files",
        "threshold": args.threshold,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
