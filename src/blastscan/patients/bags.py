"""Patient bags: every patient's cells, the patient's label and clinical covariates, from a manifest.

A manifest row is a cell; a bag is a patient. The label is the patient's `diagnosis` (positive: `positive`, APL by
default); the covariates are `age` (years) and `gender` (1 = female). A missing covariate is imputed with the
median (age) or the most common value (gender) *of the patients it is fitted on* (`ClinicalEncoder`, so a test
fold never informs its own imputation) and flagged in a `*_missing` column; `PatientBags.missing` counts them.
Every cell type the reader read is kept; `cell_type_shares` gives each patient's share of each type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from blastscan.data.manifest import Manifest
from blastscan.errors import DatasetError

#: The manifest columns a patient bag needs.
BAG_COLUMNS = ("patient_id", "diagnosis", "age", "gender", "cell_type")


@dataclass
class PatientBags:
    """One row per patient: `patients` (IDs), `labels` (1 = positive diagnosis, -1 unknown), `clinical` (age,
    gender as read), `cells` (each patient's manifest row indices) and the manifest they index."""

    patients: np.ndarray
    labels: np.ndarray
    clinical: pd.DataFrame
    cells: list[np.ndarray]
    manifest: Manifest
    positive: str

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def missing(self) -> dict[str, int]:
        """How many patients lack each covariate."""
        return {column: int(self.clinical[column].isna().sum()) for column in self.clinical.columns}

    def subset(self, rows: np.ndarray) -> PatientBags:
        """The bags of patients `rows` (positions), same manifest."""
        rows = np.asarray(rows)
        return PatientBags(
            self.patients[rows], self.labels[rows], self.clinical.iloc[rows].reset_index(drop=True),
            [self.cells[i] for i in rows], self.manifest, self.positive,
        )  # fmt: skip

    def cell_type_shares(self, types: list[str] | None = None) -> pd.DataFrame:
        """(patients, types) share of each cell type among each patient's cells."""
        table = self.manifest.table
        kinds = (table["cell_type"] if "cell_type" in table.columns else pd.Series("unknown", table.index)).astype(str)
        kinds = kinds.to_numpy()
        types = types if types is not None else sorted(set(kinds))
        shares = np.zeros((len(self), len(types)))
        for i, rows in enumerate(self.cells):
            counts = pd.Series(kinds[rows]).value_counts()
            shares[i] = [counts.get(t, 0) / max(len(rows), 1) for t in types]
        return pd.DataFrame(shares, columns=types)


def patient_bags(manifest: Manifest, positive: str = "APL", labelled: bool = True) -> PatientBags:
    """The patient bags of `manifest`; DatasetError naming what is missing when it cannot make them.

    `labelled=False` (scoring a new cohort) needs only `patient_id`: an absent covariate column counts as missing
    for every patient (imputed by the saved model), an absent or unknown diagnosis gives the label -1.
    """
    table = manifest.table
    required = BAG_COLUMNS if labelled else ("patient_id",)
    absent = [c for c in required if c not in table.columns]
    if absent:
        raise DatasetError(
            f"patient-level models need the manifest columns {', '.join(required)}; missing {', '.join(absent)} "
            "(DeepAPL's reader fills them from master.csv; a lab CSV can carry them as columns)"
        )
    table = table.assign(**{c: table[c] if c in table.columns else np.nan for c in BAG_COLUMNS})
    patients_col = table["patient_id"].astype(str)
    if (patients_col == "").any() or table["patient_id"].isna().any():
        raise DatasetError("some cells have no patient_id; every cell of a patient bag needs its patient")
    order = sorted(patients_col.unique())
    first = table.groupby(patients_col, sort=True)[["diagnosis", "age", "gender"]].first().loc[order]
    conflicting = table.groupby(patients_col)["diagnosis"].nunique()
    if (conflicting > 1).any():
        raise DatasetError(f"patients with more than one diagnosis: {conflicting[conflicting > 1].index[:5].tolist()}")
    diagnoses = first["diagnosis"]
    labels = np.where(diagnoses.isna(), -1, (diagnoses.astype(str) == positive).astype(int)).astype(int)
    if labelled and (labels.min() == labels.max() or labels.min() < 0):
        found = sorted(diagnoses.dropna().astype(str).unique())
        raise DatasetError(
            f"cross-validation needs both {positive!r} and other diagnoses, every patient labelled (found {found}, "
            f"{int((labels < 0).sum())} patients without a diagnosis); pass the positive diagnosis with --positive"
        )
    clinical = pd.DataFrame(
        {
            "age": pd.to_numeric(first["age"], errors="coerce").to_numpy(),
            "female": first["gender"]
            .astype(str)
            .str.lower()
            .map({"female": 1.0, "f": 1.0, "male": 0.0, "m": 0.0})
            .to_numpy(),
        }
    )
    groups = {p: np.flatnonzero(patients_col.to_numpy() == p) for p in order}
    return PatientBags(np.array(order), labels, clinical, [groups[p] for p in order], manifest, positive)


class ClinicalEncoder:
    """Age and sex as model inputs: imputation fitted on the patients given to `fit` (median age, most common
    sex), a missing-value flag per covariate, age standardised."""

    def fit(self, clinical: pd.DataFrame) -> ClinicalEncoder:
        self.age_median_ = float(np.nanmedian(clinical["age"])) if clinical["age"].notna().any() else 0.0
        female = clinical["female"].dropna()
        self.female_mode_ = float(female.mode().iloc[0]) if len(female) else 0.0
        ages = clinical["age"].fillna(self.age_median_)
        self.age_mean_, self.age_std_ = float(ages.mean()), float(ages.std(ddof=0) or 1.0)
        return self

    def state(self) -> dict[str, float]:
        """The fitted imputation and scaling values (JSON-ready)."""
        return {k: getattr(self, k) for k in ("age_median_", "female_mode_", "age_mean_", "age_std_")}

    @classmethod
    def from_state(cls, state: dict[str, float]) -> ClinicalEncoder:
        """The encoder back from `state()`."""
        encoder = cls()
        for key, value in state.items():
            setattr(encoder, key, float(value))
        return encoder

    def transform(self, clinical: pd.DataFrame) -> np.ndarray:
        """(patients, 4): standardised age, female, age missing, sex missing."""
        age = clinical["age"].fillna(self.age_median_).to_numpy(dtype=float)
        female = clinical["female"].fillna(self.female_mode_).to_numpy(dtype=float)
        return np.column_stack(
            [
                (age - self.age_mean_) / self.age_std_,
                female,
                clinical["age"].isna().to_numpy(dtype=float),
                clinical["female"].isna().to_numpy(dtype=float),
            ]
        )
