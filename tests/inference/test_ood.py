"""The in-distribution profile (`blastscan.inference.ood`), temperature-scaled thresholds and the abstention
metrics, on arrays whose answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blastscan.errors import ConfigError
from blastscan.evaluation.metrics import abstention_gain_with_ci, score_auroc_with_ci, selective_accuracy
from blastscan.inference import calibrated_threshold, probabilities
from blastscan.inference.ood import OOD_METHODS, OodProfile, energy_score, mahalanobis_score, msp_score


def _features(rng: np.random.Generator, n: int, shift: float = 0.0, dim: int = 16) -> list[np.ndarray]:
    """Two stages of feature statistics, as a network's stages give them."""
    return [rng.normal(shift, 1.0, size=(n, dim)), rng.normal(shift, 1.0, size=(n, dim // 2))]


@pytest.fixture(scope="module")
def fitted() -> OodProfile:
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1], 200)
    train = [stage + targets[:, None] * 3.0 for stage in _features(rng, 400)]
    val = [stage + np.repeat([0, 1], 50)[:, None] * 3.0 for stage in _features(rng, 100)]
    return OodProfile().fit(train, targets, val, rng.normal(size=(100, 2)))


def test_mahalanobis_scores_shifted_features_higher_and_flags_about_one_percent_of_inliers(
    fitted: OodProfile,
) -> None:
    rng = np.random.default_rng(1)
    logits = np.zeros((500, 2))
    inliers = fitted.scores(_features(rng, 500), logits)
    outliers = fitted.scores(_features(rng, 500, shift=-4.0), logits)  # far from both class means
    assert score_auroc_with_ci(inliers, outliers, n_boot=50)["auroc"] > 0.99
    assert fitted.flags(outliers).mean() > 0.95
    assert fitted.flags(inliers).mean() < 0.05  # the validation 99th percentile, on new inliers


def test_the_three_scores_match_their_definitions() -> None:
    logits = np.array([[0.0, 0.0], [5.0, -5.0], [1.0, 3.0]])
    np.testing.assert_allclose(energy_score(logits), -np.log(np.exp(logits).sum(axis=1)))
    np.testing.assert_allclose(msp_score(logits), 1 - np.exp(logits).max(axis=1) / np.exp(logits).sum(axis=1))
    means, precision = np.array([[0.0, 0.0], [10.0, 0.0]]), np.diag([1.0, 4.0])
    np.testing.assert_allclose(mahalanobis_score(np.array([[1.0, 1.0], [9.0, 0.0]]), means, precision), [5.0, 1.0])


def test_a_profile_survives_safetensors_and_a_damaged_file_is_a_clear_error(fitted: OodProfile, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "ood.safetensors")
    loaded = OodProfile.load(path)
    rng = np.random.default_rng(2)
    features, logits = _features(rng, 20), rng.normal(size=(20, 2))
    for method in OOD_METHODS:
        np.testing.assert_allclose(
            loaded.scores(features, logits, method), fitted.scores(features, logits, method), rtol=1e-4, atol=1e-3
        )
    assert loaded.summary() == fitted.summary()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="not a readable in-distribution profile"):
        OodProfile.load(path)
    with pytest.raises(ConfigError, match="choose one of"):
        OodProfile(method="distance")
    with pytest.raises(ConfigError, match="feature stages"):
        loaded.scores(features[:1], logits)


def test_without_features_mahalanobis_is_nan_and_never_flags(fitted: OodProfile) -> None:
    scores = fitted.scores(None, np.zeros((3, 2)))
    assert np.isnan(scores).all() and not fitted.flags(scores).any()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-30, 30), min_size=1, max_size=40),
    st.floats(0.001, 0.999),
    st.floats(0.05, 20.0),
)
def test_temperature_scaling_changes_probabilities_never_calls(
    margins: list[float], threshold: float, t: float
) -> None:
    logits = np.stack([np.zeros(len(margins)), np.array(margins)], axis=1)
    raw = probabilities(logits) >= threshold
    scaled = probabilities(logits, t) >= calibrated_threshold(threshold, t)
    near = np.abs(np.array(margins) - np.log(threshold / (1 - threshold))) < 1e-6
    assert np.array_equal(raw[~near], scaled[~near])


def test_abstaining_on_the_least_certain_raises_accuracy_when_errors_are_the_uncertain_ones() -> None:
    rng = np.random.default_rng(3)
    uncertainty = rng.random(1000)
    correct = rng.random(1000) > uncertainty * 0.5  # errors grow with uncertainty
    curve = selective_accuracy(correct, uncertainty)
    accuracies = [row["accuracy"] for row in curve]
    assert curve[0]["coverage"] == 1.0 and curve[0]["n_answered"] == 1000
    assert accuracies[-1] > accuracies[0]
    gain = abstention_gain_with_ci(correct, uncertainty, 0.9, n_boot=200)
    assert gain["gain"] > 0 and gain["ci95"][0] > 0
    flat = abstention_gain_with_ci(correct, np.zeros(1000), 0.9, n_boot=50)
    assert abs(flat["gain"]) < 0.05  # no information in the ranking: no reliable gain


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=60))
def test_the_bootstrap_auroc_equals_sklearns_with_ties(pairs: list[tuple[int, int]]) -> None:
    from sklearn.metrics import roc_auc_score

    from blastscan.evaluation.metrics import auroc_or_nan

    y = np.array([label for label, _ in pairs])
    s = np.array([score for _, score in pairs], dtype=float)
    expected = roc_auc_score(y, s) if len(np.unique(y)) == 2 else float("nan")
    assert auroc_or_nan(y, s) == pytest.approx(expected, nan_ok=True)
