"""DeepAPL discovery cohort (Sidhom et al., npj Precis. Oncol. 2021): CellaVision single-cell JPEGs.

Layout: `Data/All/Patient_NN[/<slide>]/Signed slides/<cell type>/*.jpg` plus `Data/master.csv` (per patient
`Diagnosis` AML/APL, `Cohort`, `Age at Diagnosis`, `Gender`). Every cell is labelled by its cell type through a
configurable mapping onto the binary task; the patient's diagnosis is kept in `diagnosis`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from blastscan.data.listing import list_folder, one_row_per_file, real_path, skipped_note
from blastscan.data.manifest import LEUKEMIC, NORMAL
from blastscan.data.registry import READERS, DatasetReader, ReaderOptions
from blastscan.errors import DatasetError

EXCLUDE = "exclude"

#: Default cell type -> task label. Blasts and (APL's abnormal) promyelocytes are leukemic; mature leukocytes
#: are normal. Precursors and ambiguous types (promonocytes count as blast equivalents in some criteria,
#: variant lymphocytes, erythroblasts, myelocytes, plasma cells) are left out unless a mapping includes them.
DEFAULT_CELL_TYPE_LABELS: dict[str, str] = {
    "Blast, no lineage spec": LEUKEMIC,
    "Promyelocyte": LEUKEMIC,
    "Lymphocyte": NORMAL,
    "Segmented neutrophils": NORMAL,
    "Band neutrophils": NORMAL,
    "Monocyte": NORMAL,
    "Eosinophils": NORMAL,
    "Basophil": NORMAL,
    "Lymphocyte, variant": EXCLUDE,
    "Erythroblast": EXCLUDE,
    "Myelocyte": EXCLUDE,
    "Metamyelocyte": EXCLUDE,
    "Promonocyte": EXCLUDE,
    "Plasma cells": EXCLUDE,
}
_ALLOWED = {LEUKEMIC, NORMAL, EXCLUDE}
_MASTER_COLUMNS = {
    "Patient_ID": "patient_id",
    "Diagnosis": "diagnosis",
    "Cohort": "cohort",
    "Age at Diagnosis": "age",
    "Gender": "gender",
}


@READERS.register("deepapl")
class DeepAplReader(DatasetReader):
    """DeepAPL: cells per patient and cell type, with the patient's AML/APL diagnosis.

    A cell-type folder that is a link is not followed (it would show one type's cells under another's label), files
    of other types are left out with a note, and one file reached under two labels is refused (`data/listing.py`).
    """

    name = "deepapl"
    single_cells = True
    description = "DeepAPL Data/master.csv + Data/All/Patient_NN/.../Signed slides/<cell type>/*.jpg"

    def locate(self, root: Path) -> Path | None:
        for candidate in (root, root / "Data"):
            if (candidate / "master.csv").is_file() and (candidate / "All").is_dir():
                return candidate
        return None

    def rows(self, located: Path, options: ReaderOptions, notes: list[str]) -> list[dict[str, Any]]:
        mapping = options.cell_type_labels or DEFAULT_CELL_TYPE_LABELS
        bad_values = {k: v for k, v in mapping.items() if v not in _ALLOWED}
        if bad_values:
            raise DatasetError(f"cell type mapping: values must be one of {sorted(_ALLOWED)}, got {bad_values}")
        patients = _read_master(located / "master.csv")
        rows: list[dict[str, Any]] = []
        excluded: dict[str, int] = {}
        skipped: list[tuple[Path, str]] = []
        dataset_folders = [real_path(located)]
        for patient_dir in sorted(p for p in (located / "All").iterdir() if p.is_dir()):
            patient = patients.get(patient_dir.name)
            if patient is None:
                raise DatasetError(
                    f"{patient_dir}: patient {patient_dir.name!r} is not in {located / 'master.csv'}; "
                    "add its row or move the folder out"
                )
            for signed in sorted(patient_dir.rglob("Signed slides")):
                slide = signed.parent.relative_to(patient_dir).as_posix()
                for cell_dir in sorted(p for p in signed.iterdir() if p.is_dir()):
                    if cell_dir.is_symlink():
                        # A linked cell-type folder could show one type's cells under another type's label.
                        skipped.append((cell_dir, f"a link to a folder ({os.readlink(cell_dir)}), not followed"))
                        continue
                    label = mapping.get(cell_dir.name)
                    listing = list_folder(cell_dir, dataset_folders)
                    images = listing.images
                    if label is None or label == EXCLUDE:
                        excluded[cell_dir.name] = excluded.get(cell_dir.name, 0) + len(images)
                        continue
                    skipped += listing.skipped
                    rows.extend(
                        {
                            "path": image.relative_to(located).as_posix(),
                            "label": label,
                            "patient_id": patient_dir.name,
                            "dataset": self.name,
                            "cell_type": cell_dir.name,
                            "slide": "" if slide == "." else slide,
                            **patient,
                        }
                        for image in images
                    )
        if excluded:
            listed = ", ".join(f"{k} ({v})" for k, v in sorted(excluded.items()))
            notes.append(f"left out {sum(excluded.values())} cells of unmapped or excluded types: {listed}")
        note = skipped_note(skipped, located)
        if note:
            notes.append(note)
        return one_row_per_file(rows, located, notes)


def _read_master(path: Path) -> dict[str, dict[str, Any]]:
    """master.csv as {patient folder name: {diagnosis, cohort, age, gender}}."""
    table = pd.read_csv(path, dtype=str)
    missing = [c for c in _MASTER_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(_MASTER_COLUMNS)}")
    table = table.rename(columns=_MASTER_COLUMNS)
    return {
        str(r["patient_id"]).strip(): {k: r[k] for k in ("diagnosis", "cohort", "age", "gender")}
        for r in table.to_dict("records")
    }
