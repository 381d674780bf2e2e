"""`evaluate`: score a trained run on its test split, or on another dataset (external validation).

Honest by construction: the decision threshold, the 95%-specificity operating point and the calibration
temperature are all fitted on the run's own validation split, never on the data being scored; intervals come
from a bootstrap over patients whenever patients are known.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blastscan import __version__
from blastscan.data.cache import ImageCache
from blastscan.data.images import load_rgb, resize_rgb
from blastscan.data.manifest import Manifest, class_targets, patient_ids
from blastscan.data.scan import load_or_scan
from blastscan.evaluation import figures
from blastscan.evaluation.metrics import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    metrics_with_ci,
    patient_level_metrics,
    patient_table,
    reliability_curve,
    threshold_for_specificity,
    youden_threshold,
)
from blastscan.evaluation.report import (
    Calibration,
    DataSummary,
    LeakageAudit,
    ModelCard,
    OperatingPoints,
    ReportContent,
    RunInfo,
    write_report,
)
from blastscan.inference import Predictor, probabilities
from blastscan.runs import RunFolder, write_json
from blastscan.training.config import DataConfig, TrainConfig
from blastscan.workflows.in_distribution import ensure_ood_profile
from blastscan.workflows.thresholds import calibration_temperature, record_operating_points


@dataclass
class Scored:
    """Predictions for one set of rows."""

    rows: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    patients: np.ndarray | None
    #: The in-distribution score of each row (NaN without a profile) and its flag.
    ood_score: np.ndarray | None = None
    out_of_distribution: np.ndarray | None = None

    @property
    def probability(self) -> np.ndarray:
        return probabilities(self.logits)


@dataclass
class EvaluationResult:
    """Where the evaluation went and its headline numbers."""

    out_dir: Path
    dataset: str
    split: str
    metrics: dict[str, Any]
    tta_metrics: dict[str, Any] | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    #: Wall-clock seconds per stage: scoring, metrics, figures, explanations, report.
    seconds: dict[str, float] = field(default_factory=dict)


class Stopwatch:
    """Seconds per named stage; `with clock("stage"):` adds the block's time (stages may repeat)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - began


def _score(
    predictor: Predictor, manifest: Manifest, cache: ImageCache, rows: np.ndarray, positive: str, tta: bool
) -> tuple[Scored, Scored | None]:
    """Plain scores of `rows`, and with `tta` the TTA scores too (one pass: the plain view is one of the 8)."""
    targets = class_targets(manifest, positive)[rows]
    patients = patient_ids(manifest)
    patients = patients[rows] if patients is not None else None
    logits, features = predictor.outputs_of_rows(cache, rows)
    scores, flags = predictor.ood_scores(logits, features)
    if not tta:
        return Scored(rows, targets, logits, patients, scores, flags), None
    plain, averaged = predictor.logits_of_rows_with_tta(cache, rows)
    return Scored(rows, targets, plain, patients, scores, flags), Scored(rows, targets, averaged, patients)


def dataset_name(manifest: Manifest) -> str:
    """The name evaluation folders carry: the manifest's one dataset, or its format when it holds several."""
    names = manifest.table["dataset"].astype(str).unique()
    return str(names[0]) if len(names) == 1 else manifest.format


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    split: str = "test",
    tta: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    explain: bool = True,
    explain_images: int = 200,
    device: str = "auto",
    batch_size: int = 64,
) -> EvaluationResult:
    """Score `run_dir` on its own `split`, or on every image of `data` (a dataset folder, lab CSV or manifest).

    With `explain`, the report also gets Grad-CAM overlays of the most confident right and wrong calls and the
    share of CAM energy inside the cell on up to `explain_images` images (see `blastscan.explain`). `device`:
    auto (CUDA, then MPS, then CPU), cpu, cuda or mps."""
    clock = Stopwatch()
    run = RunFolder.open(run_dir)
    run_dir = run.path
    config = run.config()
    positive = config.data.positive_label
    predictor = Predictor.from_run(run, device=device, batch_size=batch_size)
    predictor.ood, ood_note = ensure_ood_profile(run, predictor)
    own = run.manifest()
    own_splits = run.split_names(own)
    cache_dir = config.data.cache_dir

    val_rows = np.flatnonzero(own_splits == "val")
    with clock("scoring"):
        own_cache = predictor.image_cache(own, cache_dir)
        validation, validation_tta = _score(predictor, own, own_cache, val_rows, positive, tta)

    if data is None:
        manifest, rows = own, run.rows(split, own)
        dataset, split_name = dataset_name(own), split
    else:
        manifest = load_or_scan(DataConfig(root=str(data)).resolved_root())
        rows = np.arange(len(manifest))
        dataset, split_name = dataset_name(manifest), "all"
    with clock("scoring"):
        cache = own_cache if manifest is own else predictor.image_cache(manifest, cache_dir)
        scored, scored_tta = _score(predictor, manifest, cache, rows, positive, tta)

    # Operating points and calibration come from validation only.
    p_val = validation.probability
    threshold = youden_threshold(validation.targets, p_val)
    threshold_95 = threshold_for_specificity(validation.targets, p_val, 0.95)
    temperature = fit_temperature(validation.logits, validation.targets)
    record_operating_points(
        run,
        False,
        threshold,
        threshold_95,
        len(val_rows),
        calibration_temperature(validation.logits, validation.targets),
    )

    out_dir = run.eval_dir(dataset, split_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with clock("metrics"):
        metrics = _metrics(scored, threshold, threshold_95, temperature, validation, n_boot, seed)
    metrics.update({"dataset": dataset, "split": split_name, "external": data is not None, "run": str(run_dir)})
    metrics["out_of_distribution"] = _ood_metrics(predictor, scored, threshold) if predictor.ood else {"note": ood_note}
    tta_metrics = None
    if validation_tta is not None and scored_tta is not None:
        # TTA scores have their own distribution: their operating points come from TTA scores on validation.
        p_val_tta = validation_tta.probability
        threshold_tta = youden_threshold(validation_tta.targets, p_val_tta)
        threshold_95_tta = threshold_for_specificity(validation_tta.targets, p_val_tta, 0.95)
        record_operating_points(
            run,
            True,
            threshold_tta,
            threshold_95_tta,
            len(val_rows),
            calibration_temperature(validation_tta.logits, validation_tta.targets),
        )
        with clock("metrics"):
            tta_metrics = metrics_with_ci(
                scored_tta.targets,
                scored_tta.probability,
                threshold_tta,
                threshold_95_tta,
                scored_tta.patients,
                n_boot,
                seed,
            )
        metrics["tta"] = tta_metrics
    with clock("figures"):
        _write_predictions(out_dir / "predictions.csv", manifest, scored, scored_tta)
        made = _figures(out_dir, run, scored, metrics, threshold_95)
        made["errors"] = _error_gallery(out_dir / "confident_errors.png", manifest, scored, metrics["threshold"])
    if explain:
        with clock("explanations"):
            made.update(_explanations(out_dir, run, predictor, manifest, scored, metrics, split_name, explain_images))
    with clock("report"):
        write_json(out_dir / "metrics.json", metrics)
        made["report"] = write_evaluation_report(out_dir, run, config, metrics, made, dataset, split_name)
    return EvaluationResult(out_dir, dataset, split_name, metrics, tta_metrics, made, clock.seconds)


def _explanations(
    out_dir: Path,
    run: RunFolder,
    predictor: Predictor,
    manifest: Manifest,
    scored: Scored,
    metrics: dict[str, Any],
    split_name: str,
    max_images: int,
) -> dict[str, Path]:
    # Imported here: explanations pull in pytorch-grad-cam (and OpenCV), which plain scoring does not need.
    from blastscan.explain.split_explanations import confident_cases_gallery, localisation_table, plot_localisation

    if predictor.backend != "torch":  # CAMs need the torch module; ONNX Runtime scored on the CPU, so stay there
        predictor = Predictor.from_run(run, device="cpu", backend="torch", batch_size=predictor.batch_size)
    made = {
        "cams": confident_cases_gallery(
            predictor, manifest, scored.rows, scored.targets, scored.probability, metrics["threshold"],
            out_dir / "gradcam_gallery.png",
        )
    }  # fmt: skip
    table = localisation_table(predictor, manifest, scored.rows, scored.targets, max_images=max_images)
    table.to_csv(out_dir / "localisation.csv", index=False)
    metrics["localisation"] = table.to_dict(orient="records")
    made["localisation"] = plot_localisation(table, out_dir / "localisation.png")
    shortcuts = run.shortcuts_dir(split_name) / "shortcuts.png"
    if shortcuts.is_file():
        made["shortcuts"] = shortcuts
    return made


def _error_gallery(out: Path, manifest: Manifest, scored: Scored, threshold: float, per_kind: int = 6) -> Path:
    """The false positives and false negatives the model was most sure of, with their probabilities."""
    p = scored.probability
    called = p >= threshold
    false_pos = np.flatnonzero(called & (scored.targets == 0))
    false_neg = np.flatnonzero(~called & (scored.targets == 1))
    chosen = [("false positive", i) for i in false_pos[np.argsort(-p[false_pos])][:per_kind]]
    chosen += [("false negative", i) for i in false_neg[np.argsort(p[false_neg])][:per_kind]]
    paths = manifest.absolute_paths()
    items = [
        {
            "image": resize_rgb(load_rgb(paths[scored.rows[i]], min_side=160), 160),
            "title": f"{kind}, p={p[i]:.2f}\n{Path(manifest.table['path'].iloc[scored.rows[i]]).name}",
        }
        for kind, i in chosen
    ]
    return figures.image_gallery(items, out)


def write_evaluation_report(
    out_dir: Path,
    run: RunFolder,
    config: TrainConfig,
    metrics: dict[str, Any],
    made: dict[str, Path],
    dataset: str,
    split_name: str,
) -> Path:
    """The self-contained report.html of one evaluation."""
    audit = run.audit()
    card = run.model_card()
    synthetic = "synthetic" in str(audit.dataset).lower() or "synthetic" in dataset.lower()
    calibration = metrics["calibration"]
    patient = metrics.get("patient_level")
    limitations = [
        "Scores come from one split of public research data; they do not establish clinical performance.",
        "Thresholds and the calibration temperature were fitted on the validation split of the training data.",
    ]
    if audit.split_level == "image":
        limitations.append("No patient IDs: the split is image-level (duplicates grouped), so scores are optimistic.")
    if metrics.get("external"):
        limitations.append(f"External validation on {dataset}: a different source; the threshold was not re-tuned.")
    content = ReportContent(
        run=RunInfo(
            run_name=run.name,
            dataset=dataset,
            split_level="patient" if audit.split_level == "patient" else "image",
            split_seed=config.data.split.seed,
            evaluated_on=split_name,
            synthetic=synthetic,
            code_version=__version__,
        ),
        data=DataSummary(
            split_counts=audit.split_counts or {},
            patients=audit.patients,
            audit=LeakageAudit.from_audit(audit),
        ),
        config=config.model_dump(mode="json"),
        metrics=metrics,
        operating_points=OperatingPoints(
            threshold=metrics["threshold_95_specificity"],
            sensitivity=metrics.get("sensitivity_at_95_specificity"),
            specificity=metrics.get("specificity_at_95_specificity_threshold"),
            sensitivity_ci=(metrics.get("ci") or {}).get("sensitivity_at_95_specificity"),
            specificity_ci=(metrics.get("ci") or {}).get("specificity_at_95_specificity_threshold"),
            oracle_sensitivity=metrics.get("sensitivity_at_95_specificity_test_oracle"),
        ),
        calibration=Calibration(
            ece_before=calibration["ece"],
            ece_after=calibration["ece_temperature_scaled"],
            temperature=calibration["temperature"],
            n_bins=15,
        ),
        patient_metrics={k: v for k, v in patient.items() if k != "patients"} if patient else None,
        patient_rule=(
            "A patient counts as positive when any of their cells is labelled leukemic; the patient score is the "
            "share of their cells called leukemic, cut at a threshold chosen on validation patients."
            if patient
            else None
        ),
        patient_table=patient.get("patients") if patient else None,
        tta_metrics=metrics.get("tta"),
        out_of_distribution=metrics.get("out_of_distribution"),
        figures=[(caption, made[key]) for key, caption in _FIGURE_CAPTIONS if key in made],
        error_gallery=made.get("errors"),
        model_card=ModelCard(
            training_data=f"{audit.dataset}: {audit.manifest_rows} images, classes {audit.class_counts}; "
            f"{card['name']} ({card.get('pretrained') or 'random init'}) at {card['image_size']} px.",
            evaluation_data=f"{dataset}, {split_name}: {metrics['n_images']} images"
            + (f", {metrics['n_patients']} patients" if metrics.get("n_patients") else ""),
            limitations=limitations,
        ),
    )
    title = f"blastscan evaluation: {run.name} on {dataset} ({split_name})"
    return write_report(out_dir / "report.html", title=title, sections=content)


_FIGURE_CAPTIONS = (
    ("training", "Training curves: loss and accuracy per epoch, train vs validation."),
    ("roc", "ROC curve with a 95% bootstrap band; the dot is the validation-chosen 95%-specificity threshold."),
    ("pr", "Precision-recall curve."),
    ("confusion", "Confusion matrix at the validation-chosen threshold."),
    ("reliability", "Reliability diagram (before temperature scaling) with the ECE before and after."),
    ("scores", "Predicted probability per true class, with the decision threshold."),
    ("baselines", "Classical ML vs CNN vs hybrid on the same test split (blastscan baselines), with 95% CIs."),
    ("cams", "Grad-CAM: the most confident true positives, true negatives, false positives and false negatives."),
    ("localisation", "Share of CAM energy inside the segmented cell, per method and class (up to 200 images)."),
    ("shortcuts", "Shortcut audit (blastscan audit-shortcuts): scores with the cell or the background removed."),
)


def _metrics(
    scored: Scored,
    threshold: float,
    threshold_95: float,
    temperature: float,
    validation: Scored,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    y, p = scored.targets, scored.probability
    metrics = metrics_with_ci(y, p, threshold, threshold_95, scored.patients, n_boot, seed)
    calibrated = apply_temperature(scored.logits, temperature)
    metrics["calibration"] = {
        "temperature": temperature,
        "fitted_on": "validation",
        "ece": expected_calibration_error(y, p),
        "ece_temperature_scaled": expected_calibration_error(y, calibrated),
        "reliability": reliability_curve(y, p),
        "reliability_temperature_scaled": reliability_curve(y, calibrated),
    }
    if scored.patients is not None:
        table = patient_table(y, p, scored.patients, threshold)
        # The patient-level cut on "share of cells called leukemic" is chosen on validation patients too; when
        # the validation data have no patients (external test of an ALL-IDB model) it is the 0.5 majority rule.
        fraction_threshold = None
        if validation.patients is not None:
            val_table = patient_table(validation.targets, validation.probability, validation.patients, threshold)
            if val_table["label"].nunique() == 2:
                fraction_threshold = youden_threshold(
                    val_table["label"].to_numpy(), val_table["predicted_fraction"].to_numpy()
                )
        metrics["patient_level"] = patient_level_metrics(table, fraction_threshold)
        metrics["patient_level"]["patients"] = table.to_dict(orient="records")
    return metrics


def _ood_metrics(predictor: Predictor, scored: Scored, threshold: float) -> dict[str, Any]:
    """How many scored images the out-of-distribution flag marks, and the accuracy with and without them."""
    assert predictor.ood is not None and scored.out_of_distribution is not None
    flagged = scored.out_of_distribution
    correct = (scored.probability >= threshold) == (scored.targets == 1)
    return {
        **predictor.ood.summary(),
        "n_images": len(flagged),
        "n_flagged": int(flagged.sum()),
        "flagged_share": float(flagged.mean()) if len(flagged) else float("nan"),
        "accuracy_flagged": float(correct[flagged].mean()) if flagged.any() else None,
        "accuracy_unflagged": float(correct[~flagged].mean()) if (~flagged).any() else None,
    }


def _write_predictions(path: Path, manifest: Manifest, scored: Scored, scored_tta: Scored | None) -> None:
    table = pd.DataFrame(
        {
            "path": manifest.table["path"].to_numpy()[scored.rows],
            "patient": scored.patients if scored.patients is not None else "",
            "label": scored.targets,
            "probability": scored.probability,
        }
    )
    if scored_tta is not None:
        table["probability_tta"] = scored_tta.probability
    if scored.ood_score is not None and scored.out_of_distribution is not None:
        table["ood_score"] = scored.ood_score
        table["out_of_distribution"] = scored.out_of_distribution.astype(int)
    table.to_csv(path, index=False)


def _figures(out_dir: Path, run: RunFolder, scored: Scored, metrics: dict[str, Any], threshold_95: float) -> dict:
    y, p = scored.targets, scored.probability
    specificity = metrics.get("specificity_at_95_specificity_threshold", np.nan)
    sensitivity = metrics.get("sensitivity_at_95_specificity", np.nan)
    point = (1 - specificity, sensitivity) if np.isfinite(specificity) and np.isfinite(sensitivity) else None
    reliability = metrics["calibration"]["reliability"]
    made = {
        "roc": figures.plot_roc(y, p, out_dir / "roc.png", operating_point=point, groups=scored.patients),
        "pr": figures.plot_precision_recall(y, p, out_dir / "pr.png"),
        "confusion": figures.plot_confusion_matrix(
            np.array(metrics["confusion_matrix"]), out_dir / "confusion_matrix.png", threshold=metrics["threshold"]
        ),
        "reliability": figures.plot_reliability(
            np.array(reliability["mean_predicted"]),
            np.array(reliability["observed_frequency"]),
            np.array(reliability["counts"]),
            out_dir / "reliability.png",
            ece=metrics["calibration"]["ece"],
            ece_calibrated=metrics["calibration"]["ece_temperature_scaled"],
        ),
        "scores": figures.plot_score_distribution(y, p, out_dir / "scores.png", threshold=metrics["threshold"]),
    }
    if run.metrics_path.is_file():
        made["training"] = figures.plot_training_curves(run.metrics_path, out_dir / "training_curves.png")
    # `blastscan baselines ... --cnn RUN --out RUN/baselines` puts the comparison where the report picks it up.
    baselines_chart = run.baselines_dir / "baselines_bar.png"
    if baselines_chart.is_file():
        made["baselines"] = baselines_chart
    return made
