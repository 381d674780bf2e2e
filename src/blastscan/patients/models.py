"""Patient-level models, each `fit(bags)` then `predict_proba(bags)` -> (patients,) probability of the positive
diagnosis, so that cross-validation treats them alike (`crossval`).

- `ClinicalModel`: logistic regression on age and sex (`columns=("age",)` for age alone).
- `CellShareScore`: the clinical heuristic, the share of chosen cell types (promyelocytes, by default) among a
  patient's cells; nothing is fitted, the threshold is chosen in the training folds like every other model's.
- `MeanPooledModel`: image only - per-cell embeddings (one row per manifest row, from a backbone that never saw
  these patients' labels) averaged per patient, standardised, logistic regression.
- `LateFusion`: the image and clinical models' probabilities combined by a logistic regression fitted on their
  out-of-fold predictions inside the training patients (stacking), so the combiner never sees its own fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from blastscan.errors import ConfigError
from blastscan.patients.bags import ClinicalEncoder, PatientBags

#: The cell types the DeepAPL reader names for the heuristic.
PROMYELOCYTE = "Promyelocyte"


class ClinicalModel:
    """Logistic regression on the clinical covariates (`columns` of age, female)."""

    def __init__(self, columns: Sequence[str] = ("age", "female")) -> None:
        self.columns = tuple(columns)

    def _features(self, bags: PatientBags) -> np.ndarray:
        encoded = self.encoder_.transform(bags.clinical)
        keep = [i for i, name in enumerate(("age", "female")) if name in self.columns]
        return encoded[:, keep + [i + 2 for i in keep]]  # each covariate with its missing flag

    def fit(self, bags: PatientBags) -> ClinicalModel:
        self.encoder_ = ClinicalEncoder().fit(bags.clinical)
        self.model_ = LogisticRegression(max_iter=1000).fit(self._features(bags), bags.labels)
        return self

    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        return self.model_.predict_proba(self._features(bags))[:, 1]


class CellShareScore:
    """The share of `types` among each patient's cells (no fitting: a score to threshold)."""

    def __init__(self, types: Sequence[str] = (PROMYELOCYTE,)) -> None:
        self.types = tuple(types)

    def fit(self, bags: PatientBags) -> CellShareScore:
        return self

    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        shares = bags.cell_type_shares()
        present = [t for t in self.types if t in shares.columns]
        return shares[present].sum(axis=1).to_numpy() if present else np.zeros(len(bags))


def mean_pooled(bags: PatientBags, embeddings: np.ndarray) -> np.ndarray:
    """(patients, D) mean of each patient's cell embeddings (`embeddings` has one row per manifest row)."""
    if len(embeddings) != len(bags.manifest):
        raise ConfigError(f"{len(embeddings)} embeddings for a manifest of {len(bags.manifest)} cells")
    return np.stack([embeddings[rows].mean(axis=0) for rows in bags.cells])


class MeanPooledModel:
    """Image only: mean-pooled cell embeddings, standardised, L2-regularised logistic regression."""

    def __init__(self, embeddings: np.ndarray, c: float = 0.1) -> None:
        self.embeddings = embeddings
        self.c = c

    def fit(self, bags: PatientBags) -> MeanPooledModel:
        self.model_ = make_pipeline(StandardScaler(), LogisticRegression(C=self.c, max_iter=2000))
        self.model_.fit(mean_pooled(bags, self.embeddings), bags.labels)
        return self

    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        return self.model_.predict_proba(mean_pooled(bags, self.embeddings))[:, 1]


def out_of_fold(make: Callable[[], object], bags: PatientBags, folds: int = 3, seed: int = 0) -> np.ndarray:
    """Each training patient's probability from a model fitted on the other training patients (inner CV)."""
    folds = max(2, min(folds, int(np.bincount(bags.labels).min())))
    scores = np.zeros(len(bags))
    for inner_train, inner_test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
        bags.patients, bags.labels
    ):
        model = make().fit(bags.subset(inner_train))  # type: ignore[attr-defined]
        scores[inner_test] = model.predict_proba(bags.subset(inner_test))
    return scores


class LateFusion:
    """Stacking of the image and clinical models: a logistic regression on their logits, fitted on out-of-fold
    predictions within the training patients."""

    def __init__(self, image: Callable[[], object], clinical: Callable[[], object] = ClinicalModel) -> None:
        self.makers = (image, clinical)

    @staticmethod
    def _logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(p) - np.log1p(-p)

    def fit(self, bags: PatientBags) -> LateFusion:
        stacked = np.column_stack([self._logit(out_of_fold(make, bags)) for make in self.makers])
        self.combiner_ = LogisticRegression(max_iter=1000).fit(stacked, bags.labels)
        self.models_ = [make().fit(bags) for make in self.makers]  # type: ignore[attr-defined]
        return self

    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        stacked = np.column_stack([self._logit(m.predict_proba(bags)) for m in self.models_])
        return self.combiner_.predict_proba(stacked)[:, 1]
