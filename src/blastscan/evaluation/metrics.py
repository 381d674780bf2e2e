"""Binary evaluation metrics for leukemic (1) vs normal (0), with patient-level bootstrap intervals.

Conventions shared by every function here:

- `y` holds labels in {0, 1} (1 = leukemic), `p` the predicted probability of class 1, both 1-D and equally long.
- A prediction is positive when `p >= threshold`, the convention of `sklearn.metrics.roc_curve`.
- `groups` (or `patients`) holds one patient ID per image; None means each image is its own group. Intervals
  resample whole groups, so images of one patient never count as independent evidence.
- Undefined values (AUROC with one class, precision with no positive calls, ...) are NaN, never an exception, so
  a small or lopsided test set still yields a metrics file.

Thresholds (`youden_threshold`, `threshold_for_specificity`) and the temperature (`fit_temperature`) must be
fitted on validation data and then applied to test data; `sensitivity_at_specificity` is the test-oracle
counterpart, kept only to show how much an operating point chosen on validation loses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from blastscan.errors import BlastscanError, ConfigError


class EvaluationError(BlastscanError):
    """Labels, probabilities, logits or patient IDs given to an evaluation function cannot be used."""


#: The scalar metrics `metrics_with_ci` gives an interval for.
CI_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "f1_weighted",
    "roc_auc",
    "pr_auc",
    "sensitivity_at_95_specificity",
    "specificity_at_95_specificity_threshold",
)

PATIENT_TABLE_COLUMNS = (
    "patient_id",
    "n_images",
    "n_leukemic_true",
    "true_fraction",
    "mean_probability",
    "predicted_fraction",
    "label",
)

# Bounds of log T for the temperature search: T in [e^-5, e^5] ~ [0.0067, 148] covers every sane network.
_LOG_TEMPERATURE_BOUNDS = (-5.0, 5.0)
# Elements of one (resamples x images) weight block; bounds bootstrap memory at ~32 MB whatever the data size.
_BOOTSTRAP_BLOCK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------------------------------- validation


def _labels(y: ArrayLike, name: str = "y") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise EvaluationError(f"{name} must be 1-D, got shape {arr.shape}")
    if len(arr) == 0:
        raise EvaluationError(f"{name} is empty; there is nothing to evaluate")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise EvaluationError(f"{name} must hold numbers 0 and 1, got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        found = np.unique(arr[bad])[:5].tolist()
        raise EvaluationError(f"{name} must contain only 0 and 1 (1 = leukemic); found {found}")
    return arr.astype(np.int64)


def _probabilities(p: ArrayLike, n: int, name: str = "p") -> np.ndarray:
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must hold numbers (probabilities of class 1)") from None
    if arr.ndim != 1:
        raise EvaluationError(f"{name} must be 1-D, got shape {arr.shape}")
    if len(arr) != n:
        raise EvaluationError(f"{name} has {len(arr)} values but y has {n}; they must be equally long")
    if np.isnan(arr).any():
        raise EvaluationError(f"{name} contains NaN at positions {np.flatnonzero(np.isnan(arr))[:5].tolist()}")
    if (arr < 0).any() or (arr > 1).any():
        raise EvaluationError(f"{name} must be probabilities in [0, 1]; found range [{arr.min():g}, {arr.max():g}]")
    return arr


def _binary_inputs(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_arr = _labels(y)
    return y_arr, _probabilities(p, len(y_arr))


def _group_codes(groups: ArrayLike, n: int, name: str = "groups") -> tuple[np.ndarray, np.ndarray]:
    """(code per image in 0..G-1, the G distinct IDs) for a 1-D array of patient IDs."""
    arr = np.asarray(groups, dtype=object) if not isinstance(groups, np.ndarray) else groups
    if arr.ndim != 1:
        raise EvaluationError(f"{name} must be 1-D (one patient ID per image), got shape {arr.shape}")
    if len(arr) != n:
        raise EvaluationError(f"{name} has {len(arr)} values but y has {n}; give one patient ID per image")
    missing = pd.isna(arr)
    if missing.any():
        raise EvaluationError(
            f"{name} has missing patient IDs at positions {np.flatnonzero(missing)[:5].tolist()}; "
            "pass groups=None to treat every image as its own patient"
        )
    codes, uniques = pd.factorize(arr, sort=True)
    return codes.astype(np.int64), np.asarray(uniques)


def _threshold(value: float, name: str) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must be a number, got {value!r}") from None
    if np.isnan(t):
        raise EvaluationError(f"{name} is NaN; derive it from validation data with both classes")
    return t


def _fraction(value: float, name: str) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ConfigError(f"{name} must be in [0, 1], got {value}")
    return v


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den, NaN where den == 0 (an undefined rate), without warnings."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


# ---------------------------------------------------------------------------------------- operating points


def _above_max(p: np.ndarray) -> float:
    # A threshold no score reaches: the "call nothing positive" operating point, finite so it survives JSON.
    return float(np.nextafter(p.max(), np.inf))


def youden_threshold(y: ArrayLike, p: ArrayLike) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 on (y, p), meant for validation data.

    Candidates are the observed scores (predictions are `p >= threshold`). Ties go to the highest threshold, the
    one with fewest positive calls. The result is then moved down to the middle of the gap below it (halfway to
    the next lower observed score): identical calls on these data, but a margin on both sides for new data,
    instead of a cut exactly at one validation image's score. Raises EvaluationError unless both classes exist.
    """
    y, p = _binary_inputs(y, p)
    if len(np.unique(y)) < 2:
        raise EvaluationError(f"youden_threshold needs both classes in y; all {len(y)} labels are {y[0]}")
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))  # first maximum = highest threshold, since roc_curve lists them decreasing
    if not np.isfinite(thresholds[best]):
        return _above_max(p)
    threshold = float(thresholds[best])
    below = p[p < threshold]
    return (threshold + float(below.max())) / 2 if len(below) else threshold


def _specificity_operating_point(y: np.ndarray, p: np.ndarray, target: float) -> float:
    # By hand: sklearn has no "lowest threshold meeting a specificity" and roc_curve needs positives, which a
    # specificity constraint does not. Specificity at t is #(negatives with p < t) / #negatives, non-decreasing
    # in t, and any t behaves like the smallest observed score >= t, so scanning observed scores is exact.
    negatives = np.sort(p[y == 0])
    if len(negatives) == 0:
        raise EvaluationError("specificity is undefined: y has no negatives (0 labels)")
    candidates = np.append(np.unique(p), _above_max(p))
    true_negatives = np.searchsorted(negatives, candidates, side="left")  # negatives strictly below each t
    feasible = true_negatives >= target * len(negatives) - 1e-9  # tolerance: 0.95 * 20 must count as 19
    return float(candidates[np.argmax(feasible)])  # the last candidate is always feasible


def threshold_for_specificity(y: ArrayLike, p: ArrayLike, target: float = 0.95) -> float:
    """The lowest threshold whose specificity on (y, p) is >= target; meant for validation data.

    Predictions are `p >= threshold`; the lowest such threshold gives the highest sensitivity the target allows.
    The result is an observed score, or just above the largest score when only "call nothing" meets the target.
    Raises EvaluationError when y has no negatives.
    """
    y, p = _binary_inputs(y, p)
    return _specificity_operating_point(y, p, _fraction(target, "target"))


def sensitivity_at_specificity(y: ArrayLike, p: ArrayLike, target: float = 0.95) -> float:
    """The best sensitivity reachable with specificity >= target on this very data (a test oracle).

    Exactly the recall at `threshold_for_specificity(y, p, target)`: no interpolation between ROC points.
    NaN when y has no positives; raises EvaluationError when it has no negatives.
    """
    y, p = _binary_inputs(y, p)
    threshold = _specificity_operating_point(y, p, _fraction(target, "target"))
    positives = p[y == 1]
    return float(np.mean(positives >= threshold)) if len(positives) else float("nan")


# -------------------------------------------------------------------------------------------- point metrics


def binary_metrics(y: ArrayLike, p: ArrayLike, threshold: float) -> dict[str, Any]:
    """Metrics of the calls `p >= threshold` plus the threshold-free AUCs.

    Returns accuracy, precision, recall (sensitivity), specificity, f1 (of class 1), f1_weighted (F1 of both
    classes weighted by support), roc_auc, pr_auc (average precision), confusion_matrix ([[tn, fp], [fn, tp]] as
    lists of ints) and n_images. A value is NaN when undefined on this data: precision with no positive calls,
    recall and pr_auc with no positives, specificity with no negatives, roc_auc without both classes, f1 when
    there are neither positives nor positive calls. (f1 is 0, not NaN, when there are positives but no calls.)
    """
    y, p = _binary_inputs(y, p)
    threshold = _threshold(threshold, "threshold")
    called = (p >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = confusion_matrix(y, called, labels=[0, 1])
    n_pos, n_neg = tp + fn, tn + fp
    both_classes = n_pos > 0 and n_neg > 0
    return {
        "accuracy": float((tp + tn) / len(y)),
        "precision": float(_ratio(tp, tp + fp)),
        "recall": float(_ratio(tp, n_pos)),
        "specificity": float(_ratio(tn, n_neg)),
        "f1": float(f1_score(y, called, labels=[0, 1], zero_division=np.nan)),
        "f1_weighted": float(f1_score(y, called, labels=[0, 1], average="weighted", zero_division=np.nan)),
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if n_pos > 0 else float("nan"),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
        "n_images": len(y),
    }


# ---------------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval. Unpacks as `low, high = bootstrap_ci(...)`.

    `n_dropped` resamples gave NaN (e.g. one class only) and were left out; low and high are NaN when all were.
    `unit` says what was resampled: "patients" or "images".
    """

    low: float
    high: float
    level: float
    n_boot: int
    n_dropped: int
    unit: str

    def __iter__(self) -> Iterator[float]:
        return iter((self.low, self.high))


def _check_bootstrap_args(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer (typically 1000), got {n_boot!r}")
    if not 0.0 < float(level) < 1.0:
        raise ConfigError(f"level must be in (0, 1) (typically 0.95), got {level}")


def _resample_weights(codes: np.ndarray, n_groups: int, n_boot: int, seed: int | None) -> Iterator[np.ndarray]:
    """Blocks of (resamples, images) weights: how often each image appears in each cluster-bootstrap resample.

    By hand because sklearn.utils.resample draws rows, not clusters. Each resample draws n_groups groups with
    replacement; every image of a drawn group comes along as often as its group was drawn. Blocks keep memory
    bounded; the block size depends only on the data size, so a seed always gives the same resamples.
    """
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, _BOOTSTRAP_BLOCK_ELEMENTS // max(len(codes), n_groups)))
    for start in range(0, n_boot, block):
        rows = min(block, n_boot - start)
        draws = rng.integers(0, n_groups, size=(rows, n_groups))
        offsets = np.arange(rows)[:, None] * n_groups
        group_counts = np.bincount((draws + offsets).ravel(), minlength=rows * n_groups).reshape(rows, n_groups)
        yield group_counts[:, codes]


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    kept = values[~np.isnan(values)]
    if len(kept) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(kept, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _codes_or_images(groups: ArrayLike | None, n: int) -> tuple[np.ndarray, int, str]:
    if groups is None:
        return np.arange(n), n, "images"
    codes, uniques = _group_codes(groups, n)
    return codes, len(uniques), "patients"


def bootstrap_ci(
    y: ArrayLike,
    p: ArrayLike,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | None = 0,
) -> BootstrapCI:
    """Percentile bootstrap interval of `statistic(y, p) -> float`, resampling groups (patients) with replacement.

    All images of a drawn patient come along; with groups=None each image is its own group. Resamples where the
    statistic is NaN are dropped and counted in `n_dropped`; the statistic should return NaN rather than raise
    when it is undefined. The statistic is called n_boot times, so the run time is n_boot times its cost;
    `metrics_with_ci` gives the standard metrics' intervals in one vectorised pass instead.
    """
    y, p = _binary_inputs(y, p)
    _check_bootstrap_args(n_boot, level)
    codes, n_groups, unit = _codes_or_images(groups, len(y))
    index = np.arange(len(y))
    values = np.empty(n_boot)
    b = 0
    for weights in _resample_weights(codes, n_groups, n_boot, seed):
        for row in weights:
            rows = np.repeat(index, row)
            values[b] = float(statistic(y[rows], p[rows]))
            b += 1
    low, high = _percentile_interval(values, level)
    return BootstrapCI(low, high, float(level), n_boot, int(np.isnan(values).sum()), unit)


def paired_bootstrap_ci(
    y: ArrayLike,
    p_a: ArrayLike,
    p_b: ArrayLike,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, BootstrapCI]:
    """`statistic(y, p_b) - statistic(y, p_a)` and its percentile bootstrap interval, both scores of each resample
    taken on the same resampled images (a paired comparison of two models on one test set), resampling groups
    (patients) as `bootstrap_ci` does; resamples where the difference is NaN are dropped and counted."""
    y, p_a = _binary_inputs(y, p_a)
    p_b = _probabilities(p_b, len(y), "p_b")
    _check_bootstrap_args(n_boot, level)
    codes, n_groups, unit = _codes_or_images(groups, len(y))
    index = np.arange(len(y))
    values = np.empty(n_boot)
    b = 0
    for weights in _resample_weights(codes, n_groups, n_boot, seed):
        for row in weights:
            rows = np.repeat(index, row)
            values[b] = float(statistic(y[rows], p_b[rows])) - float(statistic(y[rows], p_a[rows]))
            b += 1
    low, high = _percentile_interval(values, level)
    point = float(statistic(y, p_b)) - float(statistic(y, p_a))
    return point, BootstrapCI(low, high, float(level), n_boot, int(np.isnan(values).sum()), unit)


def _weighted_metrics(
    y: np.ndarray, p: np.ndarray, weights: np.ndarray, threshold: float, threshold_95: float
) -> dict[str, np.ndarray]:
    """Every metric in CI_METRICS for each row of `weights` (image multiplicities), vectorised over rows.

    By hand because sklearn scores one sample set per call, and 1000 calls per metric are far too slow. Matches
    `binary_metrics` on the resample `np.repeat(images, row)`, NaN conventions included (see the tests).
    """
    order = np.argsort(p, kind="stable")
    p_sorted, positive = p[order], y[order] == 1
    w = weights[:, order].astype(np.float64)
    called, called_95 = p_sorted >= threshold, p_sorted >= threshold_95
    indicators = np.column_stack([positive & called, ~positive & called, positive & called_95, ~positive & called_95])
    tp, fp, tp_95, fp_95 = (w @ indicators.astype(np.float64)).T

    # Per distinct score (ascending): positive and negative weight, for the rank-based AUCs with ties.
    starts = np.flatnonzero(np.r_[True, np.diff(p_sorted) != 0])
    pos_w = np.add.reduceat(w * positive, starts, axis=1)
    neg_w = np.add.reduceat(w, starts, axis=1) - pos_w
    n_pos, n_neg = pos_w.sum(axis=1), neg_w.sum(axis=1)
    fn, tn = n_pos - tp, n_neg - fp

    # AUROC = P(score_pos > score_neg) + 0.5 P(tie) over weighted pairs (Mann-Whitney).
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    roc_auc = _ratio((pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1), n_pos * n_neg)
    # Average precision as sklearn: sum over decreasing distinct scores of (recall step) x precision there.
    tps, fps = np.cumsum(pos_w[:, ::-1], axis=1), np.cumsum(neg_w[:, ::-1], axis=1)
    precision_at = np.nan_to_num(_ratio(tps, tps + fps))  # 0/0 only where the recall step is 0 too
    pr_auc = _ratio((pos_w[:, ::-1] * precision_at).sum(axis=1), n_pos)

    f1_pos = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_neg = _ratio(2 * tn, 2 * tn + fn + fp)
    # sklearn's weighted F1: a class's undefined F1 only happens with zero support, so it weighs nothing.
    f1_weighted = (n_pos * np.nan_to_num(f1_pos) + n_neg * np.nan_to_num(f1_neg)) / (n_pos + n_neg)
    return {
        "accuracy": (tp + tn) / (n_pos + n_neg),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, n_pos),
        "specificity": _ratio(tn, n_neg),
        "f1": f1_pos,
        "f1_weighted": f1_weighted,
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "sensitivity_at_95_specificity": _ratio(tp_95, n_pos),
        "specificity_at_95_specificity_threshold": _ratio(n_neg - fp_95, n_neg),
    }


def metrics_with_ci(
    y: ArrayLike,
    p: ArrayLike,
    threshold: float,
    threshold_95_specificity: float,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int | None = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Test-set metrics at validation-derived thresholds, each scalar with a percentile bootstrap interval.

    Returns `binary_metrics(y, p, threshold)` plus: sensitivity_at_95_specificity and
    specificity_at_95_specificity_threshold (recall and specificity at the validation-derived
    `threshold_95_specificity`), sensitivity_at_95_specificity_test_oracle (`sensitivity_at_specificity` on
    this data, NaN without negatives), threshold, threshold_95_specificity, n_images, n_patients (None when
    groups is None), ci ({metric: [low, high]} for every name in CI_METRICS), ci_level, ci_method (e.g.
    "percentile bootstrap, 1000 resamples of patients") and ci_dropped ({metric: resamples left out as NaN}).
    Resamples are drawn as in `bootstrap_ci` with the same seed, so the intervals agree with it.
    """
    y, p = _binary_inputs(y, p)
    threshold = _threshold(threshold, "threshold")
    threshold_95 = _threshold(threshold_95_specificity, "threshold_95_specificity")
    _check_bootstrap_args(n_boot, level)
    codes, n_groups, unit = _codes_or_images(groups, len(y))

    result = binary_metrics(y, p, threshold)
    positives, negatives = p[y == 1], p[y == 0]
    result["sensitivity_at_95_specificity"] = float(np.mean(positives >= threshold_95)) if len(positives) else np.nan
    result["specificity_at_95_specificity_threshold"] = (
        float(np.mean(negatives < threshold_95)) if len(negatives) else np.nan
    )
    result["sensitivity_at_95_specificity_test_oracle"] = (
        sensitivity_at_specificity(y, p, 0.95) if len(negatives) else np.nan
    )
    result.update(
        threshold=threshold,
        threshold_95_specificity=threshold_95,
        n_images=len(y),
        n_patients=n_groups if unit == "patients" else None,
    )

    blocks = [
        _weighted_metrics(y, p, weights, threshold, threshold_95)
        for weights in _resample_weights(codes, n_groups, n_boot, seed)
    ]
    ci, dropped = {}, {}
    for name in CI_METRICS:
        values = np.concatenate([block[name] for block in blocks])
        ci[name] = list(_percentile_interval(values, level))
        dropped[name] = int(np.isnan(values).sum())
    result.update(
        ci=ci,
        ci_level=float(level),
        ci_method=f"percentile bootstrap, {n_boot} resamples of {unit}",
        ci_dropped=dropped,
    )
    return result


# ---------------------------------------------------------------------------------------------- calibration


def _bins(y: ArrayLike, p: ArrayLike, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, sum of p, sum of y) per equal-width bin [k/n, (k+1)/n) of p, the last bin closed at 1."""
    y, p = _binary_inputs(y, p)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    index = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    return counts, np.bincount(index, p, minlength=n_bins), np.bincount(index, y.astype(np.float64), n_bins)


def expected_calibration_error(y: ArrayLike, p: ArrayLike, n_bins: int = 15) -> float:
    """ECE of the class-1 probability: sum over equal-width bins of p of (n_bin / N) |mean p - share of 1s|.

    The standard binary definition (bins on p itself, not on the confidence of the predicted class); bins are
    [k/n_bins, (k+1)/n_bins), the last one closed at 1. By hand because scikit-learn has no ECE.
    """
    counts, sum_p, sum_y = _bins(y, p, n_bins)
    return float(np.abs(sum_p - sum_y).sum() / counts.sum())  # (n_b/N)|sum_p/n_b - sum_y/n_b| = |sum_p - sum_y|/N


def reliability_curve(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability diagram data on the same bins as `expected_calibration_error`.

    Returns bin_edges (n_bins + 1), and per bin mean_predicted, observed_frequency (share of 1s) and counts; the
    means are NaN for empty bins. By hand because sklearn's calibration_curve silently drops empty bins.
    """
    counts, sum_p, sum_y = _bins(y, p, n_bins)
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1),
        "mean_predicted": _ratio(sum_p, counts),
        "observed_frequency": _ratio(sum_y, counts),
        "counts": counts,
    }


def _class1_logit(logits: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 2:
        # softmax([a, b] / T)[1] = sigmoid((b - a) / T): the two-class case reduces to the logit margin.
        arr = arr[:, 1] - arr[:, 0]
    elif arr.ndim != 1:
        raise EvaluationError(f"{name} must have shape (N,) or (N, 2), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise EvaluationError(f"{name} contains NaN or infinite values")
    return arr


def fit_temperature(logits_val: ArrayLike, y_val: ArrayLike) -> float:
    """The temperature T > 0 minimising the validation NLL of sigmoid(z / T) (Guo et al. 2017).

    `logits_val` is (N, 2) raw two-class logits (z = logit_1 - logit_0) or (N,) class-1 logits z. T is searched
    on log T within [e^-5, e^5]; T > 1 means the network was over-confident.
    """
    z = _class1_logit(logits_val, "logits_val")
    y = _labels(y_val, "y_val")
    if len(y) != len(z):
        raise EvaluationError(f"logits_val has {len(z)} rows but y_val has {len(y)}; they must be equally long")

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))  # stable -log sigmoid / -log(1 - sigmoid)

    found = minimize_scalar(nll, bounds=_LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def apply_temperature(logits: ArrayLike, temperature: float) -> np.ndarray:
    """Calibrated class-1 probabilities sigmoid(z / temperature) for (N, 2) or (N,) logits, as in fit_temperature."""
    z = _class1_logit(logits, "logits")
    t = float(temperature)
    if not (np.isfinite(t) and t > 0):
        raise EvaluationError(f"temperature must be a positive number, got {temperature}")
    scaled = z / t
    return np.exp(-np.logaddexp(0.0, -scaled))  # sigmoid without overflow


# ---------------------------------------------------------------------------------------------- patients


def patient_table(y: ArrayLike, p: ArrayLike, patients: ArrayLike, threshold: float) -> pd.DataFrame:
    """One row per patient (sorted by ID): patient_id, n_images, n_leukemic_true, true_fraction,
    mean_probability, predicted_fraction (share of images with p >= threshold) and label (1 if any image is 1).
    """
    y, p = _binary_inputs(y, p)
    threshold = _threshold(threshold, "threshold")
    codes, ids = _group_codes(patients, len(y), "patients")
    n_images = np.bincount(codes, minlength=len(ids))
    n_leukemic = np.bincount(codes, y.astype(np.float64), len(ids)).astype(np.int64)
    return pd.DataFrame(
        {
            "patient_id": ids,
            "n_images": n_images,
            "n_leukemic_true": n_leukemic,
            "true_fraction": n_leukemic / n_images,
            "mean_probability": np.bincount(codes, p, len(ids)) / n_images,
            "predicted_fraction": np.bincount(codes, (p >= threshold).astype(np.float64), len(ids)) / n_images,
            "label": (n_leukemic > 0).astype(np.int64),
        }
    )


def patient_level_metrics(table: pd.DataFrame, threshold_fraction: float | None = None) -> dict[str, Any]:
    """Patient-level metrics from a `patient_table`: the score is predicted_fraction, the truth is label.

    `threshold_fraction` must come from validation patients, e.g. `youden_threshold(val_table["label"],
    val_table["predicted_fraction"])`; None means a majority vote (0.5). Returns {"available": True,
    "threshold_fraction", "n_patients", the binary_metrics keys (less n_images), "fraction_mae" (mean
    |predicted_fraction - true_fraction|), "fraction_pearson_r" (NaN when either fraction is constant)}, or
    {"available": False, "reason", "n_patients", "fraction_mae", "fraction_pearson_r"} when the patients are not
    of both classes (the fraction agreement still means something then).
    """
    missing = [c for c in PATIENT_TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise EvaluationError(f"table lacks columns {missing}; build it with patient_table()")
    n = len(table)
    labels = table["label"].to_numpy()
    if n == 0:
        return {"available": False, "reason": "the table has no patients", "n_patients": 0}
    predicted = _probabilities(table["predicted_fraction"].to_numpy(), n, "predicted_fraction")
    true = _probabilities(table["true_fraction"].to_numpy(), n, "true_fraction")
    # Pearson r is undefined (scipy warns, numpy divides by 0) when either side is constant.
    constant = np.ptp(predicted) == 0 or np.ptp(true) == 0
    # How well each patient's share of leukemic cells is estimated: meaningful even when every patient is ill.
    agreement = {
        "fraction_mae": float(np.mean(np.abs(predicted - true))),
        "fraction_pearson_r": float("nan") if constant else float(np.corrcoef(predicted, true)[0, 1]),
    }
    if len(np.unique(labels)) < 2:
        reason = f"all {n} patients have label {labels[0]}; patient-level classification needs both classes"
        return {"available": False, "reason": reason, "n_patients": n, **agreement}
    threshold = 0.5 if threshold_fraction is None else _threshold(threshold_fraction, "threshold_fraction")
    metrics = binary_metrics(labels, predicted, threshold)
    del metrics["n_images"]
    return {"available": True, "threshold_fraction": threshold, "n_patients": n, **metrics, **agreement}


# -------------------------------------------------------------------------------------- flags and abstention


def score_auroc_with_ci(
    inlier_scores: ArrayLike, outlier_scores: ArrayLike, n_boot: int = 1000, seed: int | None = 0
) -> dict[str, Any]:
    """AUROC of a score separating outliers (label 1) from inliers (label 0), higher = more outlying, with a
    percentile bootstrap CI over images. Scores are ranked first (AUROC only sees the order), so any real-valued
    score works; NaN scores are an error."""
    inliers = np.asarray(inlier_scores, dtype=np.float64)
    outliers = np.asarray(outlier_scores, dtype=np.float64)
    scores = np.concatenate([inliers, outliers])
    if len(inliers) == 0 or len(outliers) == 0 or np.isnan(scores).any():
        return {
            "auroc": float("nan"),
            "ci95": [float("nan"), float("nan")],
            "n_in": len(inliers),
            "n_out": len(outliers),
        }
    y = np.concatenate([np.zeros(len(inliers)), np.ones(len(outliers))])
    ranks = rankdata(scores) / len(scores)
    ci = bootstrap_ci(y, ranks, auroc_or_nan, n_boot=n_boot, seed=seed)
    return {
        "auroc": float(roc_auc_score(y, ranks)),
        "ci95": [ci.low, ci.high],
        "n_in": len(inliers),
        "n_out": len(outliers),
    }


def sensitivity_specificity(y: ArrayLike, called: ArrayLike) -> tuple[float, float]:
    """(sensitivity, specificity) of boolean calls against 0/1 labels; NaN for a class that is absent."""
    y, called = np.asarray(y), np.asarray(called, dtype=bool)
    sensitivity = float(called[y == 1].mean()) if (y == 1).any() else float("nan")
    specificity = float((~called[y == 0]).mean()) if (y == 0).any() else float("nan")
    return sensitivity, specificity


def auroc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC of scores `p` for 0/1 labels `y` (ties count half); NaN unless both classes are present."""
    # By hand (the Mann-Whitney U form, ties counted half, as roc_auc_score does): sklearn's input validation costs
    # ~8 ms a call, which a 1000-resample bootstrap of several image sets multiplies into minutes.
    positives = y == 1
    n_pos = int(positives.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((rankdata(p)[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


#: The coverages selective-prediction curves are read at: the share of images the model still answers.
COVERAGES = tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))


def selective_accuracy(
    correct: ArrayLike, uncertainty: ArrayLike, coverages: Sequence[float] = COVERAGES
) -> list[dict[str, float]]:
    """Accuracy on the most certain images at each coverage: abstain on the (1 - coverage) share with the highest
    `uncertainty` (ties broken by position, so the result is deterministic)."""
    right = np.asarray(correct, dtype=bool)
    order = np.argsort(np.asarray(uncertainty, dtype=np.float64), kind="stable")
    rows = []
    for coverage in coverages:
        kept = max(1, round(float(coverage) * len(right))) if len(right) else 0
        accuracy = float(right[order[:kept]].mean()) if kept else float("nan")
        rows.append({"coverage": float(coverage), "accuracy": accuracy, "n_answered": kept})
    return rows


def abstention_gain_with_ci(
    correct: ArrayLike,
    uncertainty: ArrayLike,
    coverage: float = 0.9,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int | None = 0,
) -> dict[str, Any]:
    """Accuracy at `coverage` minus accuracy at full coverage, with a percentile bootstrap CI (over patients when
    `groups` are given): how much abstaining on the least certain images helps on the rest."""
    right = np.asarray(correct, dtype=bool)
    uncertain = np.asarray(uncertainty, dtype=np.float64)

    def gain(rows: np.ndarray) -> float:
        curve = selective_accuracy(right[rows], uncertain[rows], (1.0, coverage))
        return curve[1]["accuracy"] - curve[0]["accuracy"]

    codes, n_groups, unit = _codes_or_images(groups, len(right))
    index = np.arange(len(right))
    values = np.array(
        [
            gain(np.repeat(index, weights))
            for block in _resample_weights(codes, n_groups, n_boot, seed)
            for weights in block
        ]
    )
    low, high = _percentile_interval(values, 0.95)
    return {"coverage": float(coverage), "gain": gain(index), "ci95": [low, high], "unit": unit}
