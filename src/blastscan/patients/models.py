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
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from blastscan.errors import ConfigError
from blastscan.patients.bags import ClinicalEncoder, PatientBags

#: The cell types the DeepAPL reader names for the heuristic.
PROMYELOCYTE = "Promyelocyte"

#: (settings, arrays): a fitted model as JSON-ready settings and named arrays (saved as safetensors, never pickled).
State = tuple[dict[str, Any], dict[str, np.ndarray]]


def logistic_arrays(model: LogisticRegression, prefix: str = "") -> dict[str, np.ndarray]:
    """A fitted logistic regression's parameters as named arrays."""
    return {f"{prefix}coef": model.coef_, f"{prefix}intercept": model.intercept_, f"{prefix}classes": model.classes_}


def logistic_from_arrays(arrays: dict[str, np.ndarray], prefix: str = "") -> LogisticRegression:
    """A logistic regression that predicts exactly as the one `logistic_arrays` saved (its fitted attributes set;
    scikit-learn has no other pickle-free way back)."""
    model = LogisticRegression()
    model.coef_, model.intercept_ = arrays[f"{prefix}coef"], arrays[f"{prefix}intercept"]
    model.classes_, model.n_features_in_ = arrays[f"{prefix}classes"], arrays[f"{prefix}coef"].shape[1]
    return model


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

    def state(self) -> State:
        """The fitted model as (settings, arrays)."""
        return {"columns": list(self.columns), "encoder": self.encoder_.state()}, logistic_arrays(self.model_)

    @classmethod
    def from_state(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> ClinicalModel:
        """The fitted model back from `state()`."""
        model = cls(settings["columns"])
        model.encoder_ = ClinicalEncoder.from_state(settings["encoder"])
        model.model_ = logistic_from_arrays(arrays)
        return model


class CellShareScore:
    """The share of `types` among each patient's cells (no fitting: a score to threshold)."""

    #: A share, not a probability: calibration does not apply.
    probabilistic = False

    def __init__(self, types: Sequence[str] = (PROMYELOCYTE,)) -> None:
        self.types = tuple(types)

    def fit(self, bags: PatientBags) -> CellShareScore:
        return self

    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        shares = bags.cell_type_shares()
        present = [t for t in self.types if t in shares.columns]
        return shares[present].sum(axis=1).to_numpy() if present else np.zeros(len(bags))

    def state(self) -> State:
        """The heuristic's settings (nothing is fitted)."""
        return {"types": list(self.types)}, {}

    @classmethod
    def from_state(cls, settings: dict[str, Any], arrays: dict[str, np.ndarray]) -> CellShareScore:
        """The heuristic back from `state()`."""
        return cls(settings["types"])


def mean_pooled(bags: PatientBags, embeddings: np.ndarray) -> np.ndarray:
    """(patients, D) mean of each patient's cell embeddings (`embeddings` has one row per manifest row)."""
    if len(embeddings) != len(bags.manifest):
        raise ConfigError(f"{len(embeddings)} embeddings for a manifest of {len(bags.manifest)} cells")
    return np.stack([embeddings[rows].mean(axis=0) for rows in bags.cells])


class MeanPooledModel:
    """Mean-pooled cell embeddings, standardised, L2-regularised logistic regression: image only, or with
    `clinical` the encoded age and sex appended to the pooled features (early fusion, one model)."""

    def __init__(self, embeddings: np.ndarray, c: float = 0.1, clinical: bool = False) -> None:
        self.embeddings = embeddings
        self.c = c
        self.clinical = clinical

    def _features(self, bags: PatientBags) -> np.ndarray:
        pooled = mean_pooled(bags, self.embeddings)
        return np.hstack([pooled, self.encoder_.transform(bags.clinical)]) if self.clinical else pooled

    def fit(self, bags: PatientBags) -> MeanPooledModel:
        self.encoder_ = ClinicalEncoder().fit(bags.clinical)
        self.model_ = make_pipeline(StandardScaler(), LogisticRegression(C=self.c, max_iter=2000))
        self.model_.fit(self._features(bags), bags.labels)
        return self

    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        return self.model_.predict_proba(self._features(bags))[:, 1]

    def state(self) -> State:
        """The fitted model as (settings, arrays)."""
        scaler, logistic = self.model_[0], self.model_[-1]
        arrays = {"scaler.mean": scaler.mean_, "scaler.scale": scaler.scale_} | logistic_arrays(logistic, "logistic.")
        return {"c": self.c, "clinical": self.clinical, "encoder": self.encoder_.state()}, arrays

    @classmethod
    def from_state(
        cls, settings: dict[str, Any], arrays: dict[str, np.ndarray], embeddings: np.ndarray
    ) -> MeanPooledModel:
        """The fitted model back from `state()`, applied to `embeddings` (one row per manifest row of a cohort)."""
        model = cls(embeddings, settings["c"], settings["clinical"])
        model.encoder_ = ClinicalEncoder.from_state(settings["encoder"])
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = arrays["scaler.mean"], arrays["scaler.scale"]
        scaler.var_, scaler.n_features_in_ = scaler.scale_**2, len(scaler.mean_)
        model.model_ = make_pipeline(scaler, logistic_from_arrays(arrays, "logistic."))
        return model


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

    @classmethod
    def fitted(cls, models: Sequence[Any], combiner: LogisticRegression) -> LateFusion:
        """A fusion of already-fitted `models` (image, clinical) by `combiner` (how a saved one comes back)."""
        fusion = cls(image=lambda: models[0], clinical=lambda: models[1])
        fusion.models_, fusion.combiner_ = list(models), combiner
        return fusion

    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        stacked = np.column_stack([self._logit(m.predict_proba(bags)) for m in self.models_])
        return self.combiner_.predict_proba(stacked)[:, 1]
