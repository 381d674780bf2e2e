"""Patient-level models on synthetic patients (known answers) and on the real DeepAPL cohort (tiny settings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blastscan.data.manifest import Manifest
from blastscan.errors import DatasetError
from blastscan.evaluation.metrics import auroc_or_nan
from blastscan.patients.attention import AttentionMILModel
from blastscan.patients.bags import ClinicalEncoder, patient_bags
from blastscan.patients.crossval import patient_crossval
from blastscan.patients.models import CellShareScore, ClinicalModel, LateFusion, MeanPooledModel
from patient_cohorts import synthetic_manifest


def test_bags_hold_each_patients_cells_and_covariates_with_missing_values_counted() -> None:
    bags = patient_bags(synthetic_manifest())
    assert len(bags) == 40 and bags.labels.sum() == 14 and bags.missing == {"age": 3, "female": 0}
    assert sum(len(c) for c in bags.cells) == len(bags.manifest)
    assert all(len(set(bags.manifest.table["patient_id"].iloc[c])) == 1 for c in bags.cells)
    encoded = ClinicalEncoder().fit(bags.clinical.iloc[10:]).transform(bags.clinical)
    assert np.isfinite(encoded).all() and encoded[:3, 2].tolist() == [1.0, 1.0, 1.0]  # imputed and flagged
    with pytest.raises(DatasetError, match="missing"):
        patient_bags(Manifest(bags.manifest.table.drop(columns=["age"]), root=Path("."), format="csv"))


def test_no_test_patient_is_ever_trained_on_and_known_signals_are_found() -> None:
    bags = patient_bags(synthetic_manifest())
    embeddings = np.random.default_rng(1).normal(size=(len(bags.manifest), 4))
    label_of_row = bags.manifest.table["diagnosis"].eq("APL").to_numpy()
    embeddings[label_of_row, 0] += 2.0
    image = lambda: MeanPooledModel(embeddings)  # noqa: E731
    models = {"age": lambda: ClinicalModel(("age",)), "share": CellShareScore, "image": image,
              "fusion": lambda: LateFusion(image)}  # fmt: skip
    result = patient_crossval(bags, models, folds=4, repeats=1, n_boot=100)
    for trained in result.trained_on.values():
        assert len(trained) == 4
    # Each fitted model trained on the patients outside its test fold: rebuild the folds and check disjointness.
    from sklearn.model_selection import StratifiedKFold

    splitters = [StratifiedKFold(4, shuffle=True, random_state=r) for r in range(1)]
    folds = [set(bags.patients[test]) for s in splitters for _, test in s.split(bags.patients, bags.labels)]
    for trained, tested in zip(result.trained_on["fusion"], folds, strict=True):
        assert not trained & tested and len(trained | tested) == len(bags)
    table = result.table.set_index("model")
    for model in ("age", "share", "image", "fusion"):
        assert table.loc[model, "auroc"] > 0.8, table
    assert ((table["auroc_ci"].str[0] <= table["auroc"]) & (table["auroc"] <= table["auroc_ci"].str[1])).all()


def test_attention_weights_favour_the_cells_that_carry_the_signal() -> None:
    bags = patient_bags(synthetic_manifest(n_patients=30, cells=8))
    kinds = bags.manifest.table["cell_type"].to_numpy()
    embeddings = np.random.default_rng(2).normal(size=(len(kinds), 4))
    embeddings[kinds == "Promyelocyte", 1] += 3.0  # only promyelocytes carry the signal
    model = AttentionMILModel(embeddings, epochs=20).fit(bags)
    assert auroc_or_nan(bags.labels, model.predict_proba(bags)) > 0.9
    with_age = AttentionMILModel(embeddings, clinical=True, epochs=10).fit(bags.subset(np.arange(20)))
    assert with_age.predict_proba(bags.subset(np.arange(20, 30))).shape == (10,)
    weights = model.attention(bags)
    assert all(abs(w.sum() - 1) < 1e-5 for w in weights)
    mixed = [i for i, rows in enumerate(bags.cells) if 0 < (kinds[rows] == "Promyelocyte").sum() < len(rows)]
    on_signal = [weights[i][kinds[bags.cells[i]] == "Promyelocyte"].mean() for i in mixed]
    off_signal = [weights[i][kinds[bags.cells[i]] != "Promyelocyte"].mean() for i in mixed]
    assert np.mean(on_signal) > np.mean(off_signal)
