"""The classical classifiers of the baselines, their small tuning grids, and grouped tuning on training data.

Every classifier is an sklearn Pipeline over a feature matrix (handcrafted features or CNN embeddings); put a
feature transformer in front of it and it classifies images. `positive_scores` gives the score in [0, 1] that the
shared metric code (`blastscan.evaluation.metrics`) takes.

Why the SVM has no Platt scaling: every metric of the comparison depends on a score only through its order (the
AUCs) or through thresholds chosen on validation on that same score (accuracy, precision, recall, F1, ...), so any
increasing map of the SVM's decision value gives identical numbers. `positive_scores` uses the logistic function
of the decision value; `SVC(probability=True)` would add an internal 5-fold cross-validation to every fit and
change none of the reported metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from blastscan.errors import ConfigError
from blastscan.registry import Registry

#: The classifiers, by name. Each builder below registers itself with `@CLASSIFIERS.register(name, label=...,
#: order=...)` and returns `(unfitted Pipeline, param_grid)` for a `random_state`; `label` is its name in tables,
#: `order` its place in them.
CLASSIFIERS: Registry[Callable[[int], tuple[Pipeline, dict[str, list[Any]]]]] = Registry("classifier")


@CLASSIFIERS.register("svm_rbf", label="SVM (RBF)", order=0)
def _svm_rbf(random_state: int) -> tuple[Pipeline, dict[str, list[Any]]]:
    svm = SVC(kernel="rbf", C=1.0, gamma="scale", class_weight="balanced", random_state=random_state)
    return Pipeline([("scale", StandardScaler()), ("svm", svm)]), {"svm__C": [1.0, 10.0]}


@CLASSIFIERS.register("random_forest", label="Random forest", order=1)
def _random_forest(random_state: int) -> tuple[Pipeline, dict[str, list[Any]]]:
    forest = RandomForestClassifier(
        n_estimators=200, class_weight="balanced_subsample", random_state=random_state, n_jobs=1
    )
    return Pipeline([("forest", forest)]), {"forest__min_samples_leaf": [1, 3]}


@CLASSIFIERS.register("knn", label="k-NN", order=2)
def _knn(random_state: int) -> tuple[Pipeline, dict[str, list[Any]]]:
    pipeline = Pipeline([("scale", StandardScaler()), ("knn", KNeighborsClassifier(weights="distance"))])
    return pipeline, {"knn__n_neighbors": [5, 15, 31]}


@CLASSIFIERS.register("logistic_regression", label="Logistic regression", order=3)
def _logistic_regression(random_state: int) -> tuple[Pipeline, dict[str, list[Any]]]:
    logreg = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)
    return Pipeline([("scale", StandardScaler()), ("logreg", logreg)]), {"logreg__C": [0.01, 0.1, 1.0]}


#: Display names of the classifiers, in the order tables list them.
CLASSIFIER_NAMES = {
    name: CLASSIFIERS.meta(name)["label"]
    for name in sorted(CLASSIFIERS.names(), key=lambda name: CLASSIFIERS.meta(name)["order"])
}


def make_classifiers(random_state: int = 0) -> dict[str, tuple[Pipeline, dict[str, list[Any]]]]:
    """{name: (unfitted Pipeline, param_grid)} for every classifier in CLASSIFIERS, in table order.

    Grids are small (2-4 candidates) so that tuning by 3-fold grouped CV on a few thousand images takes seconds
    to a minute per classifier on 2 cores. Classes are balanced by weights (SVM, random forest, logistic
    regression), k-NN by distance weighting; scale-sensitive models standardise their features first.
    """
    return {name: CLASSIFIERS.get(name)(random_state) for name in CLASSIFIER_NAMES}


def grouped_folds(
    y: ArrayLike, groups: ArrayLike, n_splits: int = 3, random_state: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) row indices of `StratifiedGroupKFold`: no group is ever on both sides of a fold.

    Uses at most as many folds as there are groups of the rarer class; folds whose held-out or training part
    lacks a class (AUROC is undefined there) are dropped. The list is empty when no usable fold exists.
    """
    y_arr, group_arr = np.asarray(y), np.asarray(groups)
    if len(y_arr) != len(group_arr):
        raise ConfigError(f"groups has {len(group_arr)} entries for {len(y_arr)} samples; give one per sample")
    classes = np.unique(y_arr)
    if len(classes) < 2:
        return []
    rarest = min(len(np.unique(group_arr[y_arr == c])) for c in classes)
    k = min(int(n_splits), rarest)
    if k < 2:
        return []
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=random_state)
    folds = []
    for fit_rows, held_out in splitter.split(np.zeros(len(y_arr)), y_arr, group_arr):
        if len(np.unique(y_arr[held_out])) == 2 and len(np.unique(y_arr[fit_rows])) == 2:
            folds.append((fit_rows, held_out))
    return folds if len(folds) >= 2 else []


def tune(
    pipeline: Pipeline,
    grid: dict[str, list[Any]],
    X_train: ArrayLike,
    y_train: ArrayLike,
    groups_train: ArrayLike,
    cv_folds: int = 3,
    n_jobs: int | None = None,
    random_state: int = 0,
) -> Pipeline:
    """The pipeline refitted on all of (X_train, y_train) with the grid point of best grouped-CV AUROC.

    Only the training data are seen: folds are `grouped_folds(y_train, groups_train, cv_folds)`, so a patient
    (or duplicate cluster) is never on both sides of a fold. When the data are too small for two usable folds,
    the first value of every grid entry is used without search. The chosen values are in `best_params(...)`.
    """
    X, y = np.asarray(X_train), np.asarray(y_train)
    if len(X) != len(y):
        raise ConfigError(f"X_train has {len(X)} rows but y_train has {len(y)}")
    folds = grouped_folds(y, groups_train, cv_folds, random_state)
    if not folds:
        default = {name: values[0] for name, values in grid.items()}
        return clone(pipeline).set_params(**default).fit(X, y)
    search = GridSearchCV(clone(pipeline), grid, scoring="roc_auc", cv=folds, n_jobs=n_jobs, refit=True)
    search.fit(X, y)
    return search.best_estimator_


def best_params(estimator: Pipeline, grid: dict[str, list[Any]]) -> dict[str, Any]:
    """The values `estimator` holds for the parameters tuned in `grid`."""
    params = estimator.get_params()
    return {name: params[name] for name in grid}


def positive_scores(estimator: Any, X: ArrayLike) -> np.ndarray:
    """Class-1 scores in [0, 1]: `predict_proba[:, 1]`, or the logistic function of `decision_function`."""
    if hasattr(estimator, "predict_proba"):
        return np.asarray(estimator.predict_proba(X), dtype=np.float64)[:, 1]
    decision = np.asarray(estimator.decision_function(X), dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -decision))  # sigmoid without overflow
