"""Scoring a leukocyte finder against truth: centroid matching (ALL-IDB1) and box average precision (BCCD).

Centroids are matched one-to-one by the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`) within a
radius; boxes by greedy IoU matching in score order, as Pascal VOC does. VOC's all-point interpolated AP is written
here because torchmetrics' detection mAP needs pycocotools and COCO-format plumbing for what is ten lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["CentroidMatch", "average_precision", "box_iou", "match_centroids"]


@dataclass(frozen=True)
class CentroidMatch:
    """One-to-one matches between found and true centroids: index pairs plus the unmatched of each side."""

    pairs: tuple[tuple[int, int], ...]
    unmatched_found: tuple[int, ...]
    unmatched_truth: tuple[int, ...]

    @property
    def true_positives(self) -> int:
        return len(self.pairs)


def match_centroids(found: np.ndarray, truth: np.ndarray, radius: float) -> CentroidMatch:
    """Match (N, 2) found points to (M, 2) true points one-to-one, minimising total distance, within `radius`."""
    found = np.asarray(found, dtype=float).reshape(-1, 2)
    truth = np.asarray(truth, dtype=float).reshape(-1, 2)
    pairs: list[tuple[int, int]] = []
    if len(found) and len(truth):
        distance = np.hypot(found[:, None, 0] - truth[None, :, 0], found[:, None, 1] - truth[None, :, 1])
        # Pairs beyond the radius may not match: give them a cost no in-radius assignment can beat.
        cost = np.where(distance <= radius, distance, 1e9)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if distance[r, c] <= radius]
    used_found = {p[0] for p in pairs}
    used_truth = {p[1] for p in pairs}
    return CentroidMatch(
        pairs=tuple(pairs),
        unmatched_found=tuple(i for i in range(len(found)) if i not in used_found),
        unmatched_truth=tuple(j for j in range(len(truth)) if j not in used_truth),
    )


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of (N, 4) and (M, 4) boxes given as x0, y0, x1, y1."""
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    b = np.asarray(b, dtype=float).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def average_precision(
    found: Sequence[tuple[np.ndarray, np.ndarray]], truth: Sequence[np.ndarray], iou: float = 0.5
) -> dict[str, float]:
    """VOC all-point AP over images: `found[i]` is (boxes (N, 4), scores (N,)) and `truth[i]` (M, 4) per image.

    Detections are taken in descending score over all images; each matches the unmatched true box of its image
    with the highest IoU >= `iou`. Returns AP plus precision and recall at the lowest score (all detections kept).
    """
    records = []
    total = 0
    for image, ((_boxes, scores), true_boxes) in enumerate(zip(found, truth, strict=True)):
        total += len(true_boxes)
        records += [(float(s), image, k) for k, s in enumerate(np.asarray(scores, dtype=float))]
    records.sort(key=lambda r: -r[0])
    taken = [np.zeros(len(t), dtype=bool) for t in truth]
    hits = np.zeros(len(records))
    for rank, (_, image, k) in enumerate(records):
        true_boxes = truth[image]
        if len(true_boxes) == 0:
            continue
        overlaps = box_iou(np.asarray(found[image][0])[k], true_boxes)[0]
        overlaps[taken[image]] = -1
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou:
            taken[image][best] = True
            hits[rank] = 1
    if total == 0:
        return {
            "ap": float("nan"),
            "precision": float("nan"),
            "recall": float("nan"),
            "truth": 0,
            "found": len(records),
        }
    tp = np.cumsum(hits)
    recall = tp / total
    precision = tp / np.arange(1, len(records) + 1) if records else np.zeros(0)
    # All-point interpolation: precision made monotone from the right, integrated over recall steps.
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.concatenate([[0.0], recall])
    ap = float(np.sum((steps[1:] - steps[:-1]) * envelope[1:-1])) if records else 0.0
    return {
        "ap": ap,
        "precision": float(precision[-1]) if records else float("nan"),
        "recall": float(recall[-1]) if records else 0.0,
        "truth": total,
        "found": len(records),
    }
