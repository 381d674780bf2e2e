"""`patients`: patient-level diagnosis (APL vs other AML on DeepAPL) by repeated cross-validation by patient.

Reads a manifest (or dataset folder) whose cells carry `patient_id`, `diagnosis`, `age`, `gender`, `cell_type`,
builds the patient bags, embeds every cell once with an ImageNet backbone (EfficientNet-Lite0 from the packaged
weights: it never saw these patients' labels, so it needs no retraining inside the folds; or a trained run whose
data holds none of these cells or patients), and scores the models of
`blastscan.patients` side by side: age alone, age and sex, the promyelocyte-share heuristic, mean-pooled image
embeddings alone and fused with age and sex (stacked, and in one model), and gated-attention MIL without and with
the covariates. Writes to `out`: `patients.csv` (the table, with calibration), `patients.md`, `scores.csv` (each
patient's mean out-of-fold probability per model), `patients.json`, `patients.png` (AUROC with CIs),
`calibration.png`, `galleries/` (per patient, the cells the attention model weighed most, from the fold model that
never saw the patient) and `model/` (the `final` model fitted on every patient, its threshold from inner
out-of-fold predictions: what `predict_patients` applies to a new cohort).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blastscan.data.images import load_rgb
from blastscan.data.manifest import Manifest
from blastscan.data.scan import load_or_scan
from blastscan.errors import ConfigError
from blastscan.evaluation.figures import image_gallery, plot_estimates_with_ci, plot_reliability_curves
from blastscan.evaluation.metrics import (
    auroc_or_nan,
    bootstrap_ci,
    paired_bootstrap_ci,
    reliability_curve,
    sensitivity_specificity,
    youden_threshold,
)
from blastscan.patients.attention import AttentionMILModel
from blastscan.patients.bags import PatientBags, patient_bags
from blastscan.patients.crossval import CrossvalResult, patient_crossval, rank01
from blastscan.patients.models import CellShareScore, ClinicalModel, LateFusion, MeanPooledModel, out_of_fold
from blastscan.patients.persist import model_from_state, model_state, needs_embeddings
from blastscan.runs import FOR_INFERENCE, PatientModelFolder, RunFolder, write_json
from blastscan.training.config import DataConfig

#: The backbone whose ImageNet features the image models pool by default, and the cell size it sees.
BACKBONE, IMAGE_SIZE = "tf_efficientnet_lite0", 96
IMAGENET_BACKBONE = {"name": BACKBONE, "image_size": IMAGE_SIZE, "weights": "ImageNet"}
#: The model saved for new cohorts when `final` is "auto": the simplest of the best in cross-validation (and the
#: clinical model when the image models are not run).
DEFAULT_FINAL, DEFAULT_FINAL_WITHOUT_IMAGES = "image, mean-pooled", "clinical (age, sex)"
#: The attention model whose weights the galleries show.
GALLERY_MODEL = "image, attention MIL"
#: Each model with age and sex -> the same model without them: what `covariate_gains` compares.
WITH_AND_WITHOUT_COVARIATES = {
    "fusion: image + clinical (stacked)": "image, mean-pooled",
    "fusion: image + clinical (one model)": "image, mean-pooled",
    "fusion: attention MIL with age, sex": "image, attention MIL",
}


@dataclass
class PatientsResult:
    """What `patients` wrote and the comparison table."""

    out: Path
    table: pd.DataFrame
    missing: dict[str, int]
    final_model: Path | None
    final_name: str | None


def cell_embeddings(bags: PatientBags, backbone: str | Path | None = None, batch_size: int = 128) -> np.ndarray:
    """(cells, D) pooled features of every manifest row: the ImageNet EfficientNet-Lite0 at 96 px, or the network
    of the trained run `backbone` with its own image size, stain normalisation and cell framing (one pass over the
    image cache)."""
    from blastscan.baselines.embeddings import embedding_predictor

    predictor = embedding_predictor(backbone, BACKBONE, "package", IMAGE_SIZE, batch_size, device="cpu")
    images = predictor.image_cache(bags.manifest).array()
    return np.concatenate(
        [
            predictor.embed_prepared(np.array(images[i : i + batch_size]))  # a writable copy of the memmap rows
            for i in range(0, len(images), batch_size)
        ]
    )


def backbone_description(backbone: str | Path | None) -> dict[str, Any]:
    """What produced the cell embeddings: the ImageNet Lite0, or a run (its path and weights' SHA-256)."""
    if backbone is None:
        return dict(IMAGENET_BACKBONE)
    folder = RunFolder.open(backbone, need=FOR_INFERENCE)
    card = folder.model_card()
    return {"name": card["name"], "image_size": card["image_size"], "weights": "run",
            "run": str(folder.path.resolve()), "weights_sha256": folder.weights_sha256()}  # fmt: skip


def check_backbone_never_saw(bags: PatientBags, backbone: str | Path) -> None:
    """ConfigError unless the run `backbone` was made without any image or patient of `bags` (its manifest holds
    everything its splits drew on, training and model selection alike), so that no test patient of the
    cross-validation reaches the image features through the backbone."""
    run_manifest = RunFolder.open(backbone, need=("manifest", *FOR_INFERENCE)).manifest()
    shared_images = {str(p.resolve()) for p in run_manifest.absolute_paths()} & {
        str(p.resolve()) for p in bags.manifest.absolute_paths()
    }
    shared_patients: set[tuple[str, str]] = set()
    if run_manifest.has_patients and bags.manifest.has_patients:

        def pairs(table: pd.DataFrame) -> set[tuple[str, str]]:
            return set(zip(table["dataset"].astype(str), table["patient_id"].astype(str), strict=True))

        shared_patients = pairs(run_manifest.table) & pairs(bags.manifest.table)
    if shared_images or shared_patients:
        raise ConfigError(
            f"--backbone {backbone}: that run's data holds {len(shared_images)} of these cells and "
            f"{len(shared_patients)} of these patients, so its features would leak test patients into the "
            "cross-validation; train the backbone on other data (or leave --backbone out for the ImageNet one)"
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
        models["fusion: image + clinical (stacked)"] = lambda: LateFusion(image)
        models["fusion: image + clinical (one model)"] = lambda: MeanPooledModel(embeddings, clinical=True)
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
    final: str | None = "auto",
    gallery_cells: int = 8,
    backbone: str | Path | None = None,
) -> PatientsResult:
    """Compare the patient-level models on `data` by repeated stratified cross-validation by patient, then fit
    `final` (a model name, "auto" for the default, None for none) on every patient and save it to `out/model`.
    `backbone`: a trained run whose network embeds the cells instead of the ImageNet Lite0 (refused when its data
    holds any of these cells or patients)."""
    say = progress or (lambda _: None)
    manifest = load_or_scan(DataConfig(root=str(data)).resolved_root())
    bags = patient_bags(manifest, positive)
    say(f"{len(bags)} patients ({int(bags.labels.sum())} {positive}), {len(manifest)} cells")
    if final == "auto":
        final = DEFAULT_FINAL if images else DEFAULT_FINAL_WITHOUT_IMAGES
    names = list(model_factories(np.empty((0, 0)) if images else None))  # checked before the slow embedding
    if final is not None and final not in names:
        raise ConfigError(f"--final {final!r}: choose one of {', '.join(repr(n) for n in names)}")
    embeddings, described = None, None
    if images:
        if backbone is not None:
            check_backbone_never_saw(bags, backbone)
        described = backbone_description(backbone)
        say(f"embedding every cell ({described['name']}, {described['weights']} weights, {described['image_size']} px)")
        embeddings = cell_embeddings(bags, backbone)
    factories = model_factories(embeddings, mil_epochs)
    say(f"cross-validating: {folds} folds x {repeats} repeats")
    result = patient_crossval(bags, factories, folds, repeats, seed, n_boot)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(out / "patients.csv", index=False)
    pd.DataFrame(
        {"patient": bags.patients, "label": bags.labels, **{m: s.mean(axis=0) for m, s in result.scores.items()}}
    ).to_csv(out / "scores.csv", index=False)
    _write_figures(result, bags, out)
    if GALLERY_MODEL in result.attention and gallery_cells > 0:
        say("drawing the attention galleries")
        write_galleries(bags, result, GALLERY_MODEL, out / "galleries", gallery_cells)
    final_model = None
    if final is not None:
        say(f"fitting the final model ({final}) on all {len(bags)} patients")
        cv_row = result.table.set_index("model").loc[final]
        final_model = save_final_model(
            bags, final, factories[final], out / "model", cv_row.to_dict(), seed, described or IMAGENET_BACKBONE
        )
    gains = covariate_gains(result, bags.labels, n_boot, seed)
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
            "backbone": described,
            "final_model": final,
            "models": result.table.to_dict(orient="records"),
            "what_age_and_sex_add": gains,
        },
    )
    (out / "patients.md").write_text(patients_markdown(result.table, folds, repeats, gains))
    return PatientsResult(out, result.table, bags.missing, final_model, final)


def covariate_gains(result: CrossvalResult, y: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per model with age and sex: its AUROC minus that of the same model without them, on the same patients'
    mean out-of-fold probabilities, with a paired patient-bootstrap 95% CI."""
    gains = []
    for with_covariates, without in WITH_AND_WITHOUT_COVARIATES.items():
        if with_covariates in result.scores and without in result.scores:
            gain, ci = paired_bootstrap_ci(
                y, rank01(result.scores[without].mean(axis=0)), rank01(result.scores[with_covariates].mean(axis=0)),
                auroc_or_nan, n_boot=n_boot, seed=seed,
            )  # fmt: skip
            gains.append({"model": with_covariates, "compared_with": without, "auroc_gain": gain,
                          "auroc_gain_ci": [ci.low, ci.high]})  # fmt: skip
    return gains


def _write_figures(result: CrossvalResult, bags: PatientBags, out: Path) -> None:
    table = result.table
    plot_estimates_with_ci(
        table["model"].tolist(), table["auroc"].tolist(), table["auroc_ci"].tolist(), out / "patients.png",
        title=f"Patient-level AUROC, {len(bags)} patients (95% CI)", xlabel="AUROC", reference=0.5,
    )  # fmt: skip
    repeats = next(iter(result.scores.values())).shape[0]
    curves = {
        row.model: reliability_curve(np.tile(bags.labels, repeats), result.scores[row.model].ravel(), n_bins=5)
        for row in table.itertuples()
        if np.isfinite(row.ece)
    }
    plot_reliability_curves(curves, out / "calibration.png", "Calibration of the out-of-fold probabilities")


def _file_name(patient: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(patient)) or "patient"


def write_galleries(bags: PatientBags, result: CrossvalResult, model: str, out: Path, cells: int = 8) -> Path:
    """Per patient, `out/<patient>.png`: the `cells` cells `model`'s attention weighed most (from the first
    repeat's fold model that never saw the patient), with weight and cell type; `out/index.md` lists them."""
    out.mkdir(parents=True, exist_ok=True)
    paths = bags.manifest.absolute_paths()
    kinds = bags.manifest.table["cell_type"].astype(str).to_numpy()
    first_repeat = dict(zip(bags.patients, result.scores[model][0], strict=True))
    lines = [
        f"Cells the attention of `{model}` weighed most, per patient (out-of-fold: from the model that never saw",
        "the patient).",
        "",
        "| patient | diagnosis | probability | top cell types | gallery |",
        "|---|---|---|---|---|",
    ]
    for i, patient in enumerate(bags.patients):
        weights = result.attention[model][patient]
        top = np.argsort(weights)[::-1][:cells]
        rows = bags.cells[i][top]
        items = [
            {"image": load_rgb(paths[r]), "title": f"{weights[t]:.2f} {kinds[r]}"}
            for t, r in zip(top, rows, strict=True)
        ]
        name = _file_name(patient) + ".png"
        image_gallery(items, out / name, columns=min(cells, 4))
        diagnosis = bags.positive if bags.labels[i] == 1 else f"not {bags.positive}"
        common = pd.Series(kinds[rows]).value_counts().head(2)
        lines.append(
            f"| {patient} | {diagnosis} | {first_repeat[patient]:.3f} | "
            f"{', '.join(f'{k} {v}' for k, v in common.items())} | [{name}]({name}) |"
        )
    (out / "index.md").write_text("\n".join(lines) + "\n")
    return out


def save_final_model(
    bags: PatientBags,
    name: str,
    make: Callable[[], Any],
    out: Path,
    cross_validation: dict[str, Any],
    seed: int = 0,
    backbone: dict[str, Any] | None = None,
) -> Path:
    """`make()` fitted on every patient of `bags`, its threshold Youden's J on inner out-of-fold predictions (as in
    the cross-validation), saved to `out` as a `PatientModelFolder`."""
    model = make().fit(bags)
    threshold = youden_threshold(bags.labels, out_of_fold(make, bags, seed=seed))
    description, arrays = model_state(model)
    return PatientModelFolder(out).write(
        {
            "name": name,
            "model": description,
            "threshold": threshold,
            "positive": bags.positive,
            "backbone": backbone or IMAGENET_BACKBONE,
            "trained_on": {
                "patients": len(bags),
                "positive_patients": int(bags.labels.sum()),
                "cells": int(sum(len(c) for c in bags.cells)),
                "missing_covariates": bags.missing,
                "patient_ids": bags.patients.tolist(),  # so that scoring them again is reported as not a validation
            },
            "cross_validation": cross_validation,
        },
        arrays,
    )


@dataclass
class PatientPredictions:
    """What `predict_patients` wrote: per patient probability and call, and metrics when labels are known."""

    out: Path
    table: pd.DataFrame
    metrics: dict[str, Any] | None


def predict_patients(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    n_boot: int = 1000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> PatientPredictions:
    """Apply a saved patient model (`model/` of `patients`) to the cohort `data`: `predictions.csv` (patient,
    cells, probability, call at the saved threshold, label when known) and, when every patient's diagnosis is
    known and both kinds occur, `metrics.json` (AUROC with a patient-bootstrap CI, sensitivity, specificity)."""
    say = progress or (lambda _: None)
    description, arrays = PatientModelFolder(model_dir).read()
    manifest: Manifest = load_or_scan(DataConfig(root=str(data)).resolved_root())
    bags = patient_bags(manifest, description["positive"], labelled=False)
    say(f"{len(bags)} patients, {len(manifest)} cells; model {description['name']!r}")
    seen = sorted(set(bags.patients) & set(description["trained_on"].get("patient_ids", [])))
    if seen:
        say(f"warning: {len(seen)} of these patients trained the model (e.g. {seen[0]}): no validation")
    embeddings = None
    if needs_embeddings(description["model"]):
        run = saved_backbone(description["backbone"], model_dir)
        say(f"embedding every cell ({description['backbone']['name']}, {description['backbone']['image_size']} px)")
        embeddings = cell_embeddings(bags, run)
    model = model_from_state(description["model"], arrays, embeddings)
    probability = model.predict_proba(bags)
    threshold = float(description["threshold"])
    table = pd.DataFrame(
        {
            "patient": bags.patients,
            "cells": [len(c) for c in bags.cells],
            "probability": probability,
            "call": np.where(probability >= threshold, description["positive"], f"not {description['positive']}"),
            "label": bags.labels,
        }
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "predictions.csv", index=False)
    metrics = None
    y = bags.labels
    if (y >= 0).all() and 0 < y.sum() < len(y):
        sensitivity, specificity = sensitivity_specificity(y, probability >= threshold)
        ci = bootstrap_ci(y, probability, auroc_or_nan, n_boot=n_boot, seed=seed)
        metrics = {
            "model": description["name"], "patients": len(y), "positive_patients": int(y.sum()),
            "auroc": auroc_or_nan(y, probability), "auroc_ci": [ci.low, ci.high], "threshold": threshold,
            "sensitivity": sensitivity, "specificity": specificity,
            "balanced_accuracy": (sensitivity + specificity) / 2, "missing_covariates": bags.missing,
            "patients_the_model_trained_on": len(seen),
        }  # fmt: skip
        write_json(out / "metrics.json", metrics)
    return PatientPredictions(out, table, metrics)


def saved_backbone(backbone: dict[str, Any], model_dir: str | Path) -> str | None:
    """The run a saved model's embeddings came from (None: the ImageNet Lite0), checked to be the same network."""
    if backbone.get("weights") != "run":
        if (backbone["name"], backbone["image_size"]) != (BACKBONE, IMAGE_SIZE):
            raise ConfigError(
                f"{model_dir}: the model reads {backbone['name']} features at {backbone['image_size']} px; this "
                f"blastscan embeds with {BACKBONE} at {IMAGE_SIZE} px - refit it with `blastscan patients`"
            )
        return None
    run = backbone["run"]
    if not Path(run).is_dir() or RunFolder.open(run, need=FOR_INFERENCE).weights_sha256() != backbone["weights_sha256"]:
        raise ConfigError(
            f"{model_dir}: the model reads features of the run {run}, which is gone or holds other weights now; "
            "restore that run folder or refit the patient model"
        )
    return run


def patients_markdown(table: pd.DataFrame, folds: int, repeats: int, gains: list[dict[str, Any]] | None = None) -> str:
    """The comparison table, and what age and sex add to the image models, as markdown."""
    lines = [
        f"Patient-level cross-validation: {folds} folds x {repeats} repeats, thresholds chosen in the training folds.",
        "",
        "| model | AUROC (95% CI) | sensitivity | specificity | balanced accuracy (95% CI) | Brier | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        calibration = f"{row.brier:.3f} | {row.ece:.3f}" if np.isfinite(row.ece) else "- | -"
        lines.append(
            f"| {row.model} | {row.auroc:.3f} ({row.auroc_ci[0]:.3f}-{row.auroc_ci[1]:.3f}) | {row.sensitivity:.3f} "
            f"| {row.specificity:.3f} | {row.balanced_accuracy:.3f} ({row.balanced_accuracy_ci[0]:.3f}-"
            f"{row.balanced_accuracy_ci[1]:.3f}) | {calibration} |"
        )
    if gains:
        lines += ["", "What age and sex add (AUROC with them minus without, paired patient bootstrap 95% CI):", ""]
        lines += [
            f"- {g['model']} vs {g['compared_with']}: {g['auroc_gain']:+.3f} "
            f"({g['auroc_gain_ci'][0]:+.3f} to {g['auroc_gain_ci'][1]:+.3f})"
            for g in gains
        ]
    return "\n".join(lines) + "\n"
