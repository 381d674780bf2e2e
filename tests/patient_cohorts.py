"""Synthetic patient cohorts with known answers, shared by the patient-level tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from blastscan.data.manifest import Manifest


def synthetic_manifest(n_patients: int = 40, cells: int = 6, seed: int = 0, missing_age: int = 3) -> Manifest:
    """Patients whose diagnosis shows in age, in their promyelocyte share and in a 4-D cell embedding."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        apl = i % 3 == 0
        age = float(rng.normal(35 if apl else 60, 8))
        for c in range(cells):
            kind = "Promyelocyte" if rng.random() < (0.6 if apl else 0.1) else "Lymphocyte"
            rows.append(
                {
                    "path": f"p{i:02d}/c{c}.jpg", "label": "normal", "patient_id": f"P{i:02d}", "group_id": f"P{i:02d}",
                    "dataset": "synthetic-patients", "cell_type": kind, "diagnosis": "APL" if apl else "AML",
                    "age": np.nan if i < missing_age else age, "gender": "Female" if rng.random() < 0.5 else "Male",
                }
            )  # fmt: skip
    return Manifest(pd.DataFrame(rows), root=Path("."), format="csv")
