"""Evaluation metrics checked against values worked out by hand on tiny examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from blastscan.errors import BlastscanError, ConfigError
from blastscan.evaluation.metrics import (
    CI_METRICS,
    BootstrapCI,
    EvaluationError,
    apply_temperature,
    binary_metrics,
    bootstrap_ci,
    expected_calibration_error,
    fit_temperature,
    metrics_with_ci,
    paired_bootstrap_ci,
    patient_level_metrics,
    patient_table,
    reliability_curve,
    sensitivity_at_specificity,
    threshold_for_specificity,
    youden_threshold,
)

# Example A: four negatives, four positives.
Y_A = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P_A = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])


def _synthetic(n: int, n_patients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients of one class each, scores that separate the classes fairly well, with ties (2 decimals)."""
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, n_patients, n)
    patient_label = np.arange(n_patients) % 2
    y = patient_label[patients]
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2)
    return y, p, patients


# ------------------------------------------------------------------------------------------- binary_metrics


def test_binary_metrics_example_a_by_hand() -> None:
    m = binary_metrics(Y_A, P_A, 0.5)
    # Calls p >= 0.5: negatives .1 .2 .3 -> TN=3, .6 -> FP=1; positives .4 -> FN=1, .7 .8 .9 -> TP=3.
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    # accuracy (3+3)/8, precision 3/(3+1), recall 3/(3+1), specificity 3/(3+1), f1 2*3/(2*3+1+1) = 6/8.
    for key in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert m[key] == pytest.approx(0.75)
    # F1 of class 0: 2*3/(2*3+1+1) = .75 too; weighted by support 4 and 4 -> .75.
    assert m["f1_weighted"] == pytest.approx(0.75)
    # AUROC: concordant (positive, negative) pairs out of 4*4 = 16. Positive .4 beats .1 .2 .3 but not .6 -> 3;
    # .7, .8, .9 each beat all four -> 12. 15/16 = 0.9375. (The brief said 14/16; recounting gives 15.)
    assert m["roc_auc"] == pytest.approx(15 / 16)
    # Average precision, scores descending: .9 (+) P=1 R=1/4; .8 (+) P=1 R=2/4; .7 (+) P=1 R=3/4; .6 (-);
    # .4 (+) P=4/5 R=1. AP = 1/4 * (1 + 1 + 1 + 4/5) = 0.95.
    assert m["pr_auc"] == pytest.approx(0.95)
    assert m["n_images"] == 8


def test_binary_metrics_second_example_by_hand() -> None:
    # y = 0 0 0 1 1 at threshold .5 with p = .2 .6 .7 .4 .9: TN=1 (.2), FP=2 (.6 .7), FN=1 (.4), TP=1 (.9).
    m = binary_metrics([0, 0, 0, 1, 1], [0.2, 0.6, 0.7, 0.4, 0.9], 0.5)
    assert m["confusion_matrix"] == [[1, 2], [1, 1]]
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))  # 2/5
    # F1 class 0: 2*1/(2*1+1+2) = 2/5, so weighted (3*2/5 + 2*2/5)/5 = 2/5.
    assert m["f1_weighted"] == pytest.approx(2 / 5)
    # Pairs: .4 beats .2 only (1); .9 beats all three (3) -> 4/6.
    assert m["roc_auc"] == pytest.approx(4 / 6)


def test_binary_metrics_undefined_values_are_nan() -> None:
    # Only negatives, no positive calls: recall, pr_auc, roc_auc, precision and f1 are undefined.
    m = binary_metrics([0, 0], [0.1, 0.2], 0.5)
    for key in ("recall", "roc_auc", "pr_auc", "precision", "f1"):
        assert math.isnan(m[key]), key
    assert m["specificity"] == 1.0
    assert m["accuracy"] == 1.0
    assert m["f1_weighted"] == 1.0  # class 0 F1 = 1 with all the support; class 1 has none
    # Positives but no positive calls: precision undefined, f1 = 2*0/(0+0+1) = 0, not NaN.
    m = binary_metrics([1, 0], [0.1, 0.2], 0.5)
    assert math.isnan(m["precision"])
    assert m["recall"] == 0.0
    assert m["f1"] == 0.0
    # Only positives: specificity and roc_auc undefined, average precision is 1.
    m = binary_metrics([1, 1], [0.3, 0.8], 0.5)
    assert math.isnan(m["specificity"])
    assert math.isnan(m["roc_auc"])
    assert m["pr_auc"] == 1.0


# ------------------------------------------------------------------------------------------ operating points


def test_youden_threshold_by_hand() -> None:
    # y = 0 0 0 1 1 1, p = .1 .4 .35 .3 .8 .9. J = TPR - FPR for t (descending): .9: 1/3-0; .8: 2/3-0 = 2/3;
    # .4: 2/3-1/3; .35: 2/3-2/3; .3: 1-2/3; .1: 1-1. The maximum is at .8; the next lower score is .4, so the
    # threshold moves to the middle of that gap, (.8 + .4) / 2 = .6, which makes the same calls on these data.
    assert youden_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.4, 0.35, 0.3, 0.8, 0.9]) == pytest.approx(0.6)


def test_youden_threshold_tie_goes_to_the_highest_threshold() -> None:
    # Example A: t=.7 gives TPR 3/4, FPR 0 (J=.75); t=.4 gives TPR 1, FPR 1/4 (J=.75); every other t is lower.
    # The tie goes to .7, then to the middle of the gap down to the next score, .6: (.7 + .6) / 2 = .65.
    assert youden_threshold(Y_A, P_A) == pytest.approx(0.65)


def test_threshold_for_specificity_by_hand() -> None:
    # Example A negatives: .1 .2 .3 .6. Specificity at t = #(negatives < t) / 4.
    # Target .75 needs 3 negatives below t, so t > .3; the lowest observed score above .3 is .4.
    assert threshold_for_specificity(Y_A, P_A, 0.75) == pytest.approx(0.4)
    # Target .8 (and 1.0) needs all 4 below: t > .6, lowest observed score .7.
    assert threshold_for_specificity(Y_A, P_A, 0.8) == pytest.approx(0.7)
    assert threshold_for_specificity(Y_A, P_A, 1.0) == pytest.approx(0.7)
    # Target .5 needs 2 below: t > .2, so .3 (negatives below .3: .1 .2 -> 2/4).
    assert threshold_for_specificity(Y_A, P_A, 0.5) == pytest.approx(0.3)
    # The specificity at the returned threshold is what was asked for.
    assert binary_metrics(Y_A, P_A, 0.4)["specificity"] == pytest.approx(0.75)


def test_threshold_for_specificity_can_be_call_nothing() -> None:
    # The top score .9 is a negative, so specificity 1 needs t > .9: just above the maximum, still finite.
    t = threshold_for_specificity([0, 1, 0], [0.9, 0.5, 0.2], 1.0)
    assert 0.9 < t < 0.9 + 1e-9
    assert binary_metrics([0, 1, 0], [0.9, 0.5, 0.2], t)["specificity"] == 1.0


def test_sensitivity_at_specificity_oracle_by_hand() -> None:
    # Ten samples: negatives .1 .3 .5 .7 .9, positives .2 .4 .6 .8 .95.
    y = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    p = [0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6, 0.8, 0.95]
    # Spec >= .8 needs 4 of 5 negatives below t: t > .7, best t = .8 -> positives .8 .95 -> 2/5.
    assert sensitivity_at_specificity(y, p, 0.8) == pytest.approx(0.4)
    # Spec >= .6 needs 3 below: t > .5, best t = .6 -> .6 .8 .95 -> 3/5.
    assert sensitivity_at_specificity(y, p, 0.6) == pytest.approx(0.6)
    # Spec >= .95 needs 4.75, i.e. all 5 below: t > .9, best t = .95 -> 1/5.
    assert sensitivity_at_specificity(y, p, 0.95) == pytest.approx(0.2)
    # No constraint: call everything -> 5/5.
    assert sensitivity_at_specificity(y, p, 0.0) == pytest.approx(1.0)


def test_sensitivity_at_specificity_without_positives_is_nan() -> None:
    assert math.isnan(sensitivity_at_specificity([0, 0, 0], [0.1, 0.2, 0.3], 0.95))


# ------------------------------------------------------------------------------------------------ calibration


def test_expected_calibration_error_by_hand() -> None:
    # Two bins [0, .5) and [.5, 1]. Bin 1: p .2 .4 (mean .3), y 0 1 (share .5): |.3 - .5| = .2, weight 2/4.
    # Bin 2: p .6 .9 (mean .75), y 1 1 (share 1): |.75 - 1| = .25, weight 2/4. ECE = .1 + .125 = .225.
    assert expected_calibration_error([0, 1, 1, 1], [0.2, 0.4, 0.6, 0.9], n_bins=2) == pytest.approx(0.225)
    # One bin: |mean p - share of 1s| = |2.1/4 - 3/4| = .225 as well.
    assert expected_calibration_error([0, 1, 1, 1], [0.2, 0.4, 0.6, 0.9], n_bins=1) == pytest.approx(0.225)
    # Perfectly calibrated in each bin: p = .25 in a bin with one 1 among four.
    assert expected_calibration_error([1, 0, 0, 0], [0.25] * 4, n_bins=10) == pytest.approx(0.0)


def test_reliability_curve_empty_bins_are_nan() -> None:
    # Ten bins: .15 -> bin 1, .45 -> 4, .65 and .66 -> 6, 1.0 -> 9 (the last bin is closed at 1).
    curve = reliability_curve([0, 1, 1, 0, 1], [0.15, 0.45, 0.65, 0.66, 1.0], n_bins=10)
    np.testing.assert_allclose(curve["bin_edges"], np.linspace(0, 1, 11))
    assert curve["counts"].tolist() == [0, 1, 0, 0, 1, 0, 2, 0, 0, 1]
    filled = curve["counts"] > 0
    np.testing.assert_allclose(curve["mean_predicted"][filled], [0.15, 0.45, 0.655, 1.0])
    np.testing.assert_allclose(curve["observed_frequency"][filled], [0.0, 1.0, 0.5, 1.0])
    assert np.isnan(curve["mean_predicted"][~filled]).all()
    assert np.isnan(curve["observed_frequency"][~filled]).all()


def test_fit_temperature_recovers_a_known_temperature() -> None:
    # Labels drawn from sigmoid(z / 2): the NLL-optimal temperature for logits z is 2.
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 4.0, 20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-z / 2))).astype(int)
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.0, rel=0.05)
    # (N, 2) logits: only the margin logit_1 - logit_0 matters.
    assert fit_temperature(np.column_stack([np.zeros_like(z), z]), y) == pytest.approx(t, rel=1e-4)
    assert fit_temperature(np.column_stack([-z / 2, z / 2]), y) == pytest.approx(t, rel=1e-4)


def test_apply_temperature_by_hand() -> None:
    # sigmoid(2 / 2) = 1 / (1 + e^-1) = 0.731059; sigmoid(0) = .5; two-class [1, -1] has margin -2.
    np.testing.assert_allclose(apply_temperature([2.0, 0.0], 2.0), [1 / (1 + math.exp(-1)), 0.5])
    np.testing.assert_allclose(apply_temperature([[1.0, -1.0]], 2.0), [1 / (1 + math.exp(1))])
    # Huge logits neither overflow nor leave [0, 1].
    out = apply_temperature([1e6, -1e6], 1.0)
    assert out.tolist() == [1.0, 0.0]


# -------------------------------------------------------------------------------------------------- bootstrap


def _two_identical_patients() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Patient A: 100 leukemic images all scored .9 (right); patient B: 100 normal images all scored .8 (wrong).
    y = np.r_[np.ones(100, int), np.zeros(100, int)]
    p = np.r_[np.full(100, 0.9), np.full(100, 0.8)]
    patients = np.r_[np.full(100, "A"), np.full(100, "B")]
    return y, p, patients


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p >= 0.5) == y))


def test_patient_bootstrap_is_wider_than_image_bootstrap() -> None:
    y, p, patients = _two_identical_patients()
    # Accuracy is .5. Drawing patients gives AA (1.0), AB/BA (.5) or BB (0.0): the interval spans [0, 1].
    by_patient = bootstrap_ci(y, p, _accuracy, groups=patients, n_boot=500)
    # Drawing 200 images gives about .5 +- 2 * sqrt(.25 / 200) = .5 +- .07.
    by_image = bootstrap_ci(y, p, _accuracy, n_boot=500)
    assert (by_patient.low, by_patient.high) == (0.0, 1.0)
    assert by_image.high - by_image.low < 0.2
    assert by_patient.high - by_patient.low > by_image.high - by_image.low
    assert by_patient.unit == "patients"
    assert by_image.unit == "images"


def test_bootstrap_degenerate_statistic_gives_the_value() -> None:
    y, p, patients = _two_identical_patients()
    low, high = bootstrap_ci(y, p, lambda y, p: 0.7, groups=patients, n_boot=200)
    assert (low, high) == (0.7, 0.7)
    # AUROC is 1 whenever both patients are drawn (.9 > .8) and NaN (one class) when one patient is drawn twice.
    auc = bootstrap_ci(y, p, lambda y, p: binary_metrics(y, p, 0.5)["roc_auc"], groups=patients, n_boot=200)
    assert (auc.low, auc.high) == (1.0, 1.0)
    assert 50 < auc.n_dropped < 150  # each resample is one class with probability 1/2
    assert auc.n_boot == 200


def test_bootstrap_all_dropped_gives_nan() -> None:
    ci = bootstrap_ci([0, 1], [0.2, 0.8], lambda y, p: float("nan"), n_boot=10)
    assert math.isnan(ci.low) and math.isnan(ci.high)
    assert ci.n_dropped == 10


def test_bootstrap_respects_the_seed() -> None:
    y, p, patients = _synthetic(300, 30)
    first = bootstrap_ci(y, p, _accuracy, groups=patients, n_boot=200, seed=3)
    again = bootstrap_ci(y, p, _accuracy, groups=patients, n_boot=200, seed=3)
    other = bootstrap_ci(y, p, _accuracy, groups=patients, n_boot=200, seed=4)
    assert first == again
    assert isinstance(first, BootstrapCI)
    assert (first.low, first.high) != (other.low, other.high)


# --------------------------------------------------------------------------------------------- metrics_with_ci


def test_metrics_with_ci_keys_and_intervals_contain_the_estimates() -> None:
    y, p, patients = _synthetic(600, 40)
    m = metrics_with_ci(y, p, 0.5, 0.7, groups=patients, n_boot=300)
    expected = {
        "accuracy", "precision", "recall", "specificity", "f1", "f1_weighted", "roc_auc", "pr_auc",
        "confusion_matrix", "n_images", "n_patients", "threshold", "threshold_95_specificity",
        "sensitivity_at_95_specificity", "specificity_at_95_specificity_threshold",
        "sensitivity_at_95_specificity_test_oracle", "ci", "ci_level", "ci_method", "ci_dropped",
    }  # fmt: skip
    assert expected <= set(m)
    assert m["n_images"] == 600
    assert m["n_patients"] == len(np.unique(patients))
    assert m["ci_method"] == "percentile bootstrap, 300 resamples of patients"
    assert set(m["ci"]) == set(CI_METRICS) == set(m["ci_dropped"])
    for name in CI_METRICS:
        low, high = m["ci"][name]
        assert low <= m[name] <= high, name
        assert m["ci_dropped"][name] == 0
    # Recall and specificity at the .7 threshold, counted directly.
    assert m["sensitivity_at_95_specificity"] == pytest.approx(np.mean(p[y == 1] >= 0.7))
    assert m["specificity_at_95_specificity_threshold"] == pytest.approx(np.mean(p[y == 0] < 0.7))
    assert m["sensitivity_at_95_specificity_test_oracle"] == pytest.approx(sensitivity_at_specificity(y, p, 0.95))

    by_image = metrics_with_ci(y, p, 0.5, 0.7, n_boot=50)
    assert by_image["n_patients"] is None
    assert by_image["ci_method"] == "percentile bootstrap, 50 resamples of images"


def test_metrics_with_ci_matches_bootstrap_of_binary_metrics() -> None:
    # The vectorised intervals must equal sklearn's metrics on each materialised resample, NaN drops included.
    # Two leukemic and two normal patients, ties in p: about 1 resample in 8 draws patients of one class only.
    y = np.array([1, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.4, 0.8, 0.7, 0.4, 0.1])
    patients = np.array([1, 1, 1, 2, 2, 3, 3, 4, 4, 4])
    seen: list[dict] = []

    def every_metric(y_r: np.ndarray, p_r: np.ndarray) -> float:
        m = binary_metrics(y_r, p_r, 0.5)
        m["sensitivity_at_95_specificity"] = np.mean(p_r[y_r == 1] >= 0.75) if (y_r == 1).any() else np.nan
        spec = np.mean(p_r[y_r == 0] < 0.75) if (y_r == 0).any() else np.nan
        m["specificity_at_95_specificity_threshold"] = spec
        seen.append(m)
        return 0.0

    bootstrap_ci(y, p, every_metric, groups=patients, n_boot=60, seed=5)
    m = metrics_with_ci(y, p, 0.5, 0.75, groups=patients, n_boot=60, seed=5)
    for name in CI_METRICS:
        values = np.array([s[name] for s in seen], dtype=float)
        kept = values[~np.isnan(values)]
        assert m["ci_dropped"][name] == len(values) - len(kept), name
        np.testing.assert_allclose(m["ci"][name], np.percentile(kept, [2.5, 97.5]), err_msg=name)
    assert m["ci_dropped"]["roc_auc"] > 0  # the example does exercise the one-class resamples


# ---------------------------------------------------------------------------------------------------- patients


def _four_patients() -> pd.DataFrame:
    # Threshold .5.
    # P1: y 1 1 0, p .9 .6 .2 -> 3 images, 2 leukemic (2/3), mean p 1.7/3, calls .9 .6 -> 2/3, label 1.
    # P2: y 0 0,   p .1 .7    -> 2 images, 0 leukemic, mean p .4, calls .7 -> 1/2, label 0.
    # P3: y 1,     p .3       -> 1 image, 1 leukemic (1.0), mean p .3, no calls -> 0, label 1.
    # P4: y 0 0 0 0, p .1 .2 .3 .8 -> 4 images, 0 leukemic, mean p .35, calls .8 -> 1/4, label 0.
    y = [1, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.2, 0.1, 0.7, 0.3, 0.1, 0.2, 0.3, 0.8]
    patients = ["P1", "P1", "P1", "P2", "P2", "P3", "P4", "P4", "P4", "P4"]
    return patient_table(y, p, patients, 0.5)


def test_patient_table_by_hand() -> None:
    table = _four_patients()
    assert list(table.columns) == [
        "patient_id", "n_images", "n_leukemic_true", "true_fraction", "mean_probability", "predicted_fraction",
        "label",
    ]  # fmt: skip
    assert table["patient_id"].tolist() == ["P1", "P2", "P3", "P4"]
    assert table["n_images"].tolist() == [3, 2, 1, 4]
    assert table["n_leukemic_true"].tolist() == [2, 0, 1, 0]
    np.testing.assert_allclose(table["true_fraction"], [2 / 3, 0, 1, 0])
    np.testing.assert_allclose(table["mean_probability"], [1.7 / 3, 0.4, 0.3, 0.35])
    np.testing.assert_allclose(table["predicted_fraction"], [2 / 3, 0.5, 0.0, 0.25])
    assert table["label"].tolist() == [1, 0, 1, 0]


def test_patient_level_metrics_by_hand() -> None:
    table = _four_patients()
    m = patient_level_metrics(table, threshold_fraction=0.4)
    # Scores (predicted_fraction) 2/3 (label 1), .5 (0), 0 (1), .25 (0). Calls >= .4: P1 TP, P2 FP, P3 FN, P4 TN.
    assert m["available"] is True
    assert m["n_patients"] == 4
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    for key in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert m[key] == pytest.approx(0.5), key
    # AUROC: positive 2/3 beats .5 and .25 (2 pairs), positive 0 beats none: 2/4.
    assert m["roc_auc"] == pytest.approx(0.5)
    # MAE: |2/3 - 2/3| + |.5 - 0| + |0 - 1| + |.25 - 0| = 1.75, / 4 = .4375.
    assert m["fraction_mae"] == pytest.approx(0.4375)
    # Pearson r: predicted deviations from mean 17/48: 15/48, 7/48, -17/48, -5/48; true deviations from 5/12:
    # 1/4, -5/12, 7/12, -5/12. Cross sum -7/48, sums of squares 49/192 and 3/4: r = (-7/48) / (7/16) = -1/3.
    assert m["fraction_pearson_r"] == pytest.approx(-1 / 3)
    assert "n_images" not in m
    # No threshold: majority vote .5, which makes the same calls here.
    default = patient_level_metrics(table)
    assert default["threshold_fraction"] == 0.5
    assert default["confusion_matrix"] == [[1, 1], [1, 1]]


def test_patient_level_metrics_one_class_is_unavailable() -> None:
    table = patient_table([0, 0, 0], [0.2, 0.7, 0.1], ["a", "b", "b"], 0.5)
    m = patient_level_metrics(table, 0.3)
    assert m["available"] is False
    assert "both classes" in m["reason"]
    # The fraction agreement is still reported: a has true 0 vs predicted 0 (p .2 < .5), b has true 0 vs
    # predicted 1/2 (.7 >= .5, .1 < .5), so MAE = (0 + 0.5) / 2 = 0.25; r is undefined (true fractions constant).
    assert m["fraction_mae"] == pytest.approx(0.25)
    assert np.isnan(m["fraction_pearson_r"])


# ------------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: binary_metrics([0, 1], [0.1], 0.5), EvaluationError, "p has 1 values but y has 2"),
        (lambda: binary_metrics([0, 2], [0.1, 0.2], 0.5), EvaluationError, r"y must contain only 0 and 1.*\[2\]"),
        (lambda: binary_metrics([0, 1], [0.1, 1.5], 0.5), EvaluationError, r"p must be probabilities in \[0, 1\]"),
        (lambda: binary_metrics([0, 1], [0.1, np.nan], 0.5), EvaluationError, "p contains NaN"),
        (lambda: binary_metrics([], [], 0.5), EvaluationError, "y is empty"),
        (lambda: binary_metrics([0, 1], [0.1, 0.2], np.nan), EvaluationError, "threshold is NaN"),
        (lambda: binary_metrics([[0, 1]], [[0.1, 0.2]], 0.5), EvaluationError, "y must be 1-D"),
        (lambda: youden_threshold([1, 1], [0.1, 0.2]), EvaluationError, "needs both classes"),
        (lambda: threshold_for_specificity([1, 1], [0.1, 0.2]), EvaluationError, "no negatives"),
        (lambda: threshold_for_specificity([0, 1], [0.1, 0.2], 1.5), ConfigError, "target"),
        (lambda: bootstrap_ci([0, 1], [0.1, 0.2], _accuracy, groups=[1]), EvaluationError, "groups has 1 values"),
        (lambda: bootstrap_ci([0, 1], [0.1, 0.2], _accuracy, groups=["a", None]), EvaluationError, "missing"),
        (lambda: bootstrap_ci([0, 1], [0.1, 0.2], _accuracy, n_boot=0), ConfigError, "n_boot"),
        (lambda: bootstrap_ci([0, 1], [0.1, 0.2], _accuracy, level=1.5), ConfigError, "level"),
        (lambda: metrics_with_ci([0, 1], [0.1, 0.2], 0.5, None), EvaluationError, "threshold_95_specificity"),
        (lambda: expected_calibration_error([0, 1], [0.1, 0.2], n_bins=0), ConfigError, "n_bins"),
        (lambda: fit_temperature(np.zeros((3, 3)), [0, 1, 0]), EvaluationError, r"logits_val must have shape"),
        (lambda: fit_temperature(np.zeros(3), [0, 1]), EvaluationError, "logits_val has 3 rows"),
        (lambda: fit_temperature([0.0, np.inf], [0, 1]), EvaluationError, "infinite"),
        (lambda: apply_temperature([0.0, 1.0], 0.0), EvaluationError, "temperature must be a positive"),
        (lambda: patient_table([0, 1], [0.1, 0.2], ["a"], 0.5), EvaluationError, "patients has 1 values"),
        (lambda: patient_level_metrics(pd.DataFrame({"label": [0, 1]})), EvaluationError, "lacks columns"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match) -> None:
    with pytest.raises(error, match=match) as caught:
        call()
    assert isinstance(caught.value, BlastscanError)


def test_paired_bootstrap_difference_resamples_both_scores_together() -> None:
    from sklearn.metrics import roc_auc_score

    def auroc(y: np.ndarray, p: np.ndarray) -> float:
        return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p_a = np.clip(0.4 * y + 0.6 * rng.random(200), 0, 1)
    patients = np.array([f"P{i % 20}" for i in range(200)])
    same, ci = paired_bootstrap_ci(y, p_a, p_a, auroc, patients, n_boot=200)
    assert same == 0.0 and (ci.low, ci.high) == (0.0, 0.0)  # paired: identical models never differ
    assert ci.unit == "patients"
    p_b = np.clip(p_a + 0.2 * y, 0, 1)  # a better model
    delta, ci = paired_bootstrap_ci(y, p_a, p_b, auroc, patients, n_boot=200)
    assert delta == pytest.approx(auroc(y, p_b) - auroc(y, p_a))
    assert 0 < ci.low <= delta <= ci.high
