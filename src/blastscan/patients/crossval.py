"""Repeated stratified cross-validation by patient, with every decision threshold chosen inside the training folds.

Per repeat, the patients are split into `folds` stratified folds; for each test fold a fresh model is fitted on the
other folds, and its threshold is Youden's J on the training patients' *out-of-fold* probabilities (an inner
cross-validation), never on the test fold. Each patient is thus scored once per repeat by a model that never saw
any of their cells. Reported per model: AUROC of each patient's mean probability over the repeats with a patient
bootstrap CI, and sensitivity, specificity and balanced accuracy of the fold-threshold calls, as the mean over
repeats with a patient-bootstrap CI of the majority call; and the calibration of the probabilities (Brier score
and expected calibration error over every repeat's out-of-fold probabilities; not for scores that are not
probabilities, such as the promyelocyte share). For models with attention, each patient's attention weights come
from the first repeat's model that scored them (one that never saw the patient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedKFold

from blastscan.errors import ConfigError
from blastscan.evaluation.metrics import (
    auroc_or_nan,
    bootstrap_ci,
    expected_calibration_error,
    sensitivity_specificity,
    youden_threshold,
)
from blastscan.patients.bags import PatientBags
from blastscan.patients.models import out_of_fold

#: A model factory: a fresh, unfitted patient model per call.
ModelFactory = Callable[[], Any]


@dataclass
class CrossvalResult:
    """Per model: the per-patient scores (repeats x patients), calls, and the summary table."""

    scores: dict[str, np.ndarray]
    calls: dict[str, np.ndarray]
    table: pd.DataFrame
    #: (repeat, fold) -> the patients each fitted model trained on (what the leakage test reads).
    trained_on: dict[str, list[set[str]]] = field(default_factory=dict)
    #: Models with attention: patient -> attention weight per cell, from the first repeat's out-of-fold model.
    attention: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _rates(y: np.ndarray, called: np.ndarray) -> tuple[float, float, float]:
    sensitivity, specificity = sensitivity_specificity(y, called)
    return sensitivity, specificity, (sensitivity + specificity) / 2


def patient_crossval(
    bags: PatientBags,
    models: dict[str, ModelFactory],
    folds: int = 5,
    repeats: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
) -> CrossvalResult:
    """Score every model in `models` by repeated stratified K-fold cross-validation over `bags`' patients."""
    smallest = int(np.bincount(bags.labels).min())
    if folds < 2 or folds > smallest:
        raise ConfigError(f"--folds {folds}: choose 2 to {smallest} (the smaller class has {smallest} patients)")
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: choose a positive integer")
    y = bags.labels
    scores = {name: np.zeros((repeats, len(bags))) for name in models}
    calls = {name: np.zeros((repeats, len(bags)), dtype=bool) for name in models}
    trained_on: dict[str, list[set[str]]] = {name: [] for name in models}
    attention: dict[str, dict[str, np.ndarray]] = {}
    for r in range(repeats):
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed + r)
        for train, test in splitter.split(bags.patients, y):
            training, testing = bags.subset(train), bags.subset(test)
            for name, make in models.items():
                try:
                    model = make().fit(training)
                    threshold = youden_threshold(training.labels, out_of_fold(make, training, seed=seed + r))
                except ValueError as exc:
                    if "class" not in str(exc):
                        raise
                    raise ConfigError(
                        f"{name}: a training fold of {len(training)} patients ({int(training.labels.sum())} "
                        f"positive) is too small for the inner cross-validation ({exc}); use fewer --folds or "
                        "more patients"
                    ) from None
                p = model.predict_proba(testing)
                scores[name][r, test] = p
                calls[name][r, test] = p >= threshold
                trained_on[name].append(set(training.patients))
                if r == 0 and hasattr(model, "attention"):
                    weights = model.attention(testing)
                    attention.setdefault(name, {}).update(zip(testing.patients, weights, strict=True))
    rows = []
    for name in models:
        mean_score = scores[name].mean(axis=0)
        auroc_ci = bootstrap_ci(y, rank01(mean_score), auroc_or_nan, n_boot=n_boot, seed=seed)
        per_repeat = np.array([_rates(y, calls[name][r]) for r in range(repeats)])
        majority = calls[name].mean(axis=0) >= 0.5
        probabilistic = getattr(models[name](), "probabilistic", True)
        pooled_y, pooled_p = np.tile(y, repeats), scores[name].ravel()
        balanced_ci = bootstrap_ci(
            y, majority.astype(float), lambda a, b: _rates(a, b >= 0.5)[2], n_boot=n_boot, seed=seed
        )
        rows.append(
            {
                "model": name,
                "auroc": auroc_or_nan(y, mean_score),
                "auroc_ci": [auroc_ci.low, auroc_ci.high],
                "auroc_per_repeat_sd": float(np.std([auroc_or_nan(y, scores[name][r]) for r in range(repeats)])),
                "sensitivity": float(per_repeat[:, 0].mean()),
                "specificity": float(per_repeat[:, 1].mean()),
                "balanced_accuracy": float(per_repeat[:, 2].mean()),
                "balanced_accuracy_ci": [balanced_ci.low, balanced_ci.high],
                "brier": float(np.mean((pooled_p - pooled_y) ** 2)) if probabilistic else np.nan,
                "ece": expected_calibration_error(pooled_y, pooled_p, n_bins=10) if probabilistic else np.nan,
                "patients": len(bags),
                "positive_patients": int(y.sum()),
            }
        )
    return CrossvalResult(scores, calls, pd.DataFrame(rows), trained_on, attention)


def rank01(p: np.ndarray) -> np.ndarray:
    """Scores as ranks in [0, 1] (AUROC sees only the order; the bootstrap wants probabilities)."""
    return rankdata(p) / len(p)
