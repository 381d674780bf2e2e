"""Centroid matching and VOC average precision, checked by hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from blastscan.smear.detection_metrics import average_precision, box_iou, match_centroids


def test_hungarian_matching_is_one_to_one_and_within_radius() -> None:
    truth = np.array([[0, 0], [10, 0]])
    found = np.array([[4, 0], [6, 0], [100, 100]])
    match = match_centroids(found, truth, radius=5)
    assert sorted(match.pairs) == [(0, 0), (1, 1)]
    assert match.unmatched_found == (2,)
    assert match_centroids(found[:1], truth, radius=3).true_positives == 0
    assert match_centroids(np.zeros((0, 2)), truth, 5).unmatched_truth == (0, 1)


def test_box_iou() -> None:
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)


def test_average_precision_perfect_and_ranked() -> None:
    truth = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10]])]
    perfect = [(np.array([[0, 0, 10, 10]]), np.array([0.9])), (np.array([[0, 0, 10, 10]]), np.array([0.8]))]
    assert average_precision(perfect, truth)["ap"] == pytest.approx(1.0)
    # A false positive ranked first: precision 1/2 at recall 0.5, 2/3 at recall 1; the all-point envelope takes the
    # best precision at or beyond each recall, so AP = 0.5 * 2/3 + 0.5 * 2/3.
    ranked = [
        (np.array([[50, 50, 60, 60], [0, 0, 10, 10]]), np.array([0.99, 0.9])),
        (np.array([[0, 0, 10, 10]]), np.array([0.8])),
    ]
    assert average_precision(ranked, truth)["ap"] == pytest.approx(2 / 3)
    assert average_precision([(np.zeros((0, 4)), np.zeros(0))], [np.zeros((0, 4))])["truth"] == 0
