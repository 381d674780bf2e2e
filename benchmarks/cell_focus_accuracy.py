"""How well `data.cell_focus` finds the leukocyte, measured against the public annotations that exist here.

- BCCD: every annotated `WBC` box of every field; a square of twice the box's larger side is cut around it (a
  single-cell crop), framed, and the segmented cell's box is compared with the annotated one (IoU).
- ALL-IDB1: every leukocyte centroid (`xyc/` blasts and `xyc_other/` other leukocytes); a 257-px crop is cut around
  it (as ALL-IDB2's crops were), framed, and the distance from the centroid to the framed cell's centre is measured,
  with whether the centroid lies inside the segmented cell's box.

No dataset here ships per-pixel leukocyte masks (C-NMC's cells on black are the nearest thing and are not here), so
boxes and centroids are the truth used. Failures (no cell found: the image would be used whole) are counted and
listed. Prints a summary and writes JSON (default benchmarks/results/cell_focus_accuracy.json).

    python benchmarks/cell_focus_accuracy.py [--data ../shared/datasets] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from blastscan.data.images import load_rgb
from blastscan.data.scan import scan
from blastscan.imaging.cell_focus import CellFocus
from blastscan.smear.field_truth import bccd_wbc_boxes, framing_against_boxes, framing_against_marks, read_marks

REPO_ROOT = Path(__file__).resolve().parent.parent


def bccd(root: Path, focus: CellFocus, limit: int | None) -> dict:
    manifest = scan(root, format="bccd", verify=False).manifest
    records = []
    for path, boxes in zip(manifest.absolute_paths()[:limit], manifest.table["boxes"][:limit], strict=True):
        wbc = bccd_wbc_boxes(json.loads(boxes) if isinstance(boxes, str) else None)
        if len(wbc):
            records += [{"field": path.name, **r} for r in framing_against_boxes(load_rgb(path), wbc, focus)]
    iou = np.array([r["iou"] for r in records])
    found = np.array([r["found"] for r in records])
    return {
        "cells": len(records),
        "not_found": int((~found).sum()),
        "iou_median": float(np.median(iou)),
        "iou_at_least_0.5": float((iou >= 0.5).mean()),
        "iou_percentiles_10_25_75": [float(v) for v in np.percentile(iou, [10, 25, 75])],
        "failures": [r for r in records if not r["found"]][:20],
    }


def allidb1(root: Path, focus: CellFocus, limit: int | None) -> dict:
    records = []
    for image in sorted((root / "im").glob("*.jpg"))[:limit]:
        marks = {kind: read_marks(root / folder / f"{image.stem}.xyc")
                 for kind, folder in (("blast", "xyc"), ("other", "xyc_other"))}  # fmt: skip
        if not any(len(m) for m in marks.values()):
            continue
        field = load_rgb(image)
        for kind, points in marks.items():
            records += [{"field": image.name, "kind": kind, **r} for r in framing_against_marks(field, points, focus)]
    found = np.array([r["found"] for r in records])
    distance = np.array([r["distance"] for r in records if r["found"]])
    inside = np.array([r["inside"] for r in records])
    by_kind = {
        kind: {"cells": sum(r["kind"] == kind for r in records),
               "not_found": sum(r["kind"] == kind and not r["found"] for r in records),
               "centroid_inside_box": float(np.mean([r["inside"] for r in records if r["kind"] == kind]))}
        for kind in ("blast", "other")
    }  # fmt: skip
    return {
        "cells": len(records),
        "not_found": int((~found).sum()),
        "centroid_inside_box": float(inside.mean()),
        "centre_distance_px_median": float(np.median(distance)),
        "centre_distance_px_90th": float(np.percentile(distance, 90)),
        "by_kind": by_kind,
        "failures": [r for r in records if not r["inside"]][:20],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BLASTSCAN_DATA", "../shared/datasets")))
    parser.add_argument("--limit", type=int, default=None, help="At most this many fields per dataset.")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "cell_focus_accuracy.json")
    args = parser.parse_args()
    focus = CellFocus("crop")
    started = time.perf_counter()
    results = {
        "focus": focus.to_dict(),
        "bccd_wbc_boxes": bccd(args.data / "BCCD", focus, args.limit),
        "allidb1_centroids": allidb1(args.data / "ALL_IDB" / "ALL_IDB1", focus, args.limit),
    }
    results["seconds"] = time.perf_counter() - started
    b, a = results["bccd_wbc_boxes"], results["allidb1_centroids"]
    print(f"BCCD: {b['cells']} WBC boxes, no cell found in {b['not_found']}, IoU median {b['iou_median']:.2f}, "
          f"IoU >= 0.5 in {b['iou_at_least_0.5']:.1%}")  # fmt: skip
    print(f"ALL-IDB1: {a['cells']} leukocyte centroids, no cell found in {a['not_found']}, centroid inside the "
          f"framed cell's box in {a['centroid_inside_box']:.1%}, centre distance median "
          f"{a['centre_distance_px_median']:.1f} px (90th: {a['centre_distance_px_90th']:.1f})")  # fmt: skip
    for kind, row in a["by_kind"].items():
        print(f"  {kind}: {row['cells']} cells, {row['not_found']} not found, inside {row['centroid_inside_box']:.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
