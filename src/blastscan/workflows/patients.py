"""`patients`: patient-level diagnosis (APL vs other AML on DeepAPL) by repeated cross-validation by patient.

Reads a manifest (or dataset folder) whose cells carry `patient_id`, `diagnosis`, `age`, `gender`, `cell_type`,
builds the patient bags, embeds every cell once with an ImageNet backbone (EfficientNet-Lite0 from the packaged
weights: it never saw these patients' labels, so it needs no retraining inside the folds), and scores the models of
`blastscan.patients` side by side: age alone, age and sex, the promyelocyte-share heuristic, mean-pooled image
embeddings and their late fusion with age and sex, and gated-attention MIL without and with the covariates. Writes
`patients.csv` (the table), `patients.md`, `scores.csv` (each patient's mean out-of-fold probability per model)
and `patients.json` to `out`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blastscan.data.scan import load_or_scan
from blastscan.patients.attention import AttentionMILModel
from blastscan.patients.bags import PatientBags, patient_bags
from blastscan.patients.crossval import patient_crossval
from blastscan.patients.models import CellShareScore, ClinicalModel, LateFusion, MeanPooledModel
from blastscan.runs import write_json
from blastscan.training.config import DataConfig

#: The backbone whose ImageNet features the image models pool, and the cell size it sees.
BACKBONE, IMAGE_SIZE = "tf_efficientnet_lite0", 96


@dataclass
class PatientsResult:
    """What `patients` wrote and the comparison table."""

    out: Path
    table: pd.DataFrame
    missing: dict[str, int]


def cell_embeddings(bags: PatientBags, cache_dir: str | None = None, batch_size: int = 128) -> np.ndarray:
    """(cells, D) ImageNet EfficientNet-Lite0 pooled features of every manifest row (one pass, cached images)."""
    from blastscan.inference import InputSpec
    from blastscan.inference.torch_backend import TorchPredictor
    from blastscan.models import create, preprocessing_for

    pre = preprocessing_for(BACKBONE, "package")
    network = create(BACKBONE, pretrained="package", num_classes=0)
    predictor = TorchPredictor(network, InputSpec(IMAGE_SIZE, tuple(pre["mean"]), tuple(pre["std"])), device="cpu")
    images = predictor.image_cache(bags.manifest, cache_dir).array()
    return np.concatenate(
        [
            predictor.embed_prepared(np.ascontiguousarray(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
    )


def model_factories(embeddings: np.ndarray | None, mil_epochs: int = 30) -> dict[str, Callable[[], Any]]:
    """The models compared, by name (the image models only when there are embeddings)."""
    models: dict[str, Callable[[], Any]] = {
        "age alone": lambda: ClinicalModel(columns=("age",)),
        "clinical (age, sex)": ClinicalModel,
        "promyelocyte share": CellShareScore,
    }
    if embeddings is not None:
        image = lambda: MeanPooledModel(embeddings)  # noqa: E731 - a factory
        models["image, mean-pooled"] = image
        models["fusion: image + clinical"] = lambda: LateFusion(image)
        models["image, attention MIL"] = lambda: AttentionMILModel(embeddings, epochs=mil_epochs)
        models["fusion: attention MIL with age, sex"] = lambda: AttentionMILModel(
            embeddings, clinical=True, epochs=mil_epochs
        )
    return models


def patients(
    data: str | Path,
    out: str | Path,
    folds: int = 5,
    repeats: int = 5,
    positive: str = "APL",
    images: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    mil_epochs: int = 30,
) -> PatientsResult:
    """Compare the patient-level models on `data` by repeated stratified cross-validation by patient."""
    say = progress or (lambda _: None)
    manifest = load_or_scan(DataConfig(root=str(data)).resolved_root())
    bags = patient_bags(manifest, positive)
    say(f"{len(bags)} patients ({int(bags.labels.sum())} {positive}), {len(manifest)} cells")
    embeddings = None
    if images:
        say("embedding every cell (ImageNet EfficientNet-Lite0)")
        embeddings = cell_embeddings(bags)
    say(f"cross-validating: {folds} folds x {repeats} repeats")
    result = patient_crossval(bags, model_factories(embeddings, mil_epochs), folds, repeats, seed, n_boot)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(out / "patients.csv", index=False)
    pd.DataFrame(
        {"patient": bags.patients, "label": bags.labels, **{m: s.mean(axis=0) for m, s in result.scores.items()}}
    ).to_csv(out / "scores.csv", index=False)
    write_json(
        out / "patients.json",
        {
            "data": str(data),
            "positive": positive,
            "folds": folds,
            "repeats": repeats,
            "patients": len(bags),
            "missing_covariates": bags.missing,
            "cell_types": sorted(manifest.table["cell_type"].astype(str).unique()),
            "models": result.table.to_dict(orient="records"),
        },
    )
    (out / "patients.md").write_text(patients_markdown(result.table, folds, repeats))
    return PatientsResult(out, result.table, bags.missing)


def patients_markdown(table: pd.DataFrame, folds: int, repeats: int) -> str:
    """The comparison table as markdown."""
    lines = [
        f"Patient-level cross-validation: {folds} folds x {repeats} repeats, thresholds chosen in the training folds.",
        "",
        "| model | AUROC (95% CI) | sensitivity | specificity | balanced accuracy (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.model} | {row.auroc:.3f} ({row.auroc_ci[0]:.3f}-{row.auroc_ci[1]:.3f}) | {row.sensitivity:.3f} "
            f"| {row.specificity:.3f} | {row.balanced_accuracy:.3f} ({row.balanced_accuracy_ci[0]:.3f}-"
            f"{row.balanced_accuracy_ci[1]:.3f}) |"
        )
    return "\n".join(lines) + "\n"
