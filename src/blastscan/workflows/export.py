"""`blastscan export`: a trained run as a deployable ONNX model folder, with its parity proved on real images.

Writes `ExportFolder` (see `blastscan.runs`): model.onnx (float32, dynamic batch), with `int8` also
model.int8.onnx (ONNX Runtime static quantisation, QDQ, per-channel weights, calibrated on `calibration` images of
the run's TRAINING split - never validation or test images - by the recipe of `INT8_RECIPES` that keeps the
validation AUROC closest to float32's: the test split only reports), preprocessing.json (the input contract, the
classes, the validation-chosen thresholds, the stain normalisation and the cell framing `analyze` needs),
MODEL_CARD.md and parity.json. Parity is measured, not assumed: the ONNX logits against torch's on the run's test
images, and each model's AUROC on the test split with patient-bootstrap intervals, plus the paired INT8 - float32
difference.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from sklearn.metrics import roc_auc_score

from blastscan import DISCLAIMER, __version__
from blastscan.evaluation.metrics import (
    fit_temperature,
    metrics_with_ci,
    paired_bootstrap_ci,
    threshold_for_specificity,
    youden_threshold,
)
from blastscan.imaging.cell_focus import CellFocus
from blastscan.imaging.preprocess import normalize_array
from blastscan.inference import InputSpec, probabilities
from blastscan.inference.onnx_backend import INPUT_NAME, OUTPUT_NAME, OnnxPredictor
from blastscan.inference.onnx_export import INT8_RECIPES, OPSET, export_onnx, quantize_int8
from blastscan.inference.torch_backend import TorchPredictor
from blastscan.runs import FOR_EVALUATION, ExportFolder, RunFolder, file_sha256, jsonable, write_json
from blastscan.workflows.analyze import run_framing
from blastscan.workflows.in_distribution import ensure_ood_profile
from blastscan.workflows.thresholds import ensure_operating_points

#: Calibration images are scored in batches of this many.
CALIBRATION_BATCH = 16
#: What the INT8 model must keep: |AUROC(int8) - AUROC(fp32)| on the run's test split.
INT8_AUROC_TOLERANCE = 0.005
#: fp32 ONNX against torch: |delta logit| <= this x max(1, |logit|) (float32 rounding grows with the logit).
FP32_LOGIT_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """What `export_run` wrote and measured."""

    folder: ExportFolder
    parity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every parity check held."""
        return all(check["passed"] for check in self.parity.get("checks", {}).values())


def _calibration_batches(
    cache_array: np.ndarray, rows: np.ndarray, spec: InputSpec, n: int, seed: int
) -> Iterator[np.ndarray]:
    """Normalised batches of a seeded sample of `n` training rows."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(rows, size=min(int(n), len(rows)), replace=False))
    for start in range(0, len(chosen), CALIBRATION_BATCH):
        images = np.ascontiguousarray(cache_array[chosen[start : start + CALIBRATION_BATCH]])
        yield normalize_array(images, spec.mean, spec.std)


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC, NaN when `y` holds one class (a bootstrap resample may)."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _auroc_with_ci(y: np.ndarray, p: np.ndarray, threshold: float, t95: float, groups: np.ndarray | None) -> dict:
    metrics = metrics_with_ci(y, p, threshold, t95, groups=groups)
    return {
        "auroc": metrics["roc_auc"],
        "auroc_ci95": metrics["ci"]["roc_auc"],
        "accuracy": metrics["accuracy"],
        "sensitivity": metrics["recall"],
        "specificity": metrics["specificity"],
    }


def _logit_parity(reference: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    difference = np.abs(logits - reference)
    relative = difference / np.maximum(1.0, np.abs(reference))
    return {
        "max_abs_logit_difference": float(difference.max()),
        "max_relative_logit_difference": float(relative.max()),
        "max_probability_difference": float(np.abs(probabilities(logits) - probabilities(reference)).max()),
        "largest_abs_logit": float(np.abs(reference).max()),
    }


def _model_card(context: dict[str, Any]) -> str:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("blastscan.workflows", "templates"),
        autoescape=False,  # Markdown, not HTML
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("model_card.md.j2").render(**context)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    int8: bool = False,
    calibration: int = 256,
    parity_images: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `run_dir` to `out` (see the module docstring) and measure its parity on the run's test split.

    `parity_images` caps the test images scored (default: all of them)."""
    started = time.perf_counter()
    say = progress or (lambda _: None)
    run = RunFolder.open(run_dir, need=FOR_EVALUATION)
    config = run.config()
    export = ExportFolder(out)
    export.path.mkdir(parents=True, exist_ok=True)
    torch_predictor = TorchPredictor.from_run(run, device="cpu", backend="torch", precision="fp32")
    assert isinstance(torch_predictor, TorchPredictor)
    spec = torch_predictor.spec
    say("thresholds chosen on the validation split")
    points = ensure_operating_points(run, torch_predictor)

    say("exporting model.onnx")
    export_onnx(torch_predictor.model, spec.image_size, export.model_path)
    fp32 = OnnxPredictor(export.model_path, spec, device="cpu")

    manifest = run.manifest()
    cache = torch_predictor.image_cache(manifest, config.data.cache_dir)
    test_rows = run.rows("test", manifest)
    if parity_images is not None:
        test_rows = np.sort(np.random.default_rng(seed).permutation(test_rows)[: int(parity_images)])
    y = run.class_targets(manifest)[test_rows]
    patients = run.patient_ids(manifest)
    groups = patients[test_rows] if patients is not None else None

    say(f"parity on {len(test_rows)} test images: torch")
    reference = torch_predictor.logits_of_rows(cache, test_rows)
    say("parity: ONNX Runtime float32")
    fp32_logits = fp32.logits_of_rows(cache, test_rows)
    threshold, t95 = float(points["threshold"]), float(points["threshold_95_specificity"])
    fp32_parity = _logit_parity(reference, fp32_logits)
    fp32_parity["tolerance"] = f"|delta logit| <= {FP32_LOGIT_TOLERANCE} x max(1, |logit|)"
    models = {
        "torch": _auroc_with_ci(y, probabilities(reference), threshold, t95, groups),
        "onnx_fp32": _auroc_with_ci(y, probabilities(fp32_logits), threshold, t95, groups),
    }
    checks = {
        "fp32_logits": {
            **fp32_parity,
            "passed": fp32_parity["max_relative_logit_difference"] <= FP32_LOGIT_TOLERANCE,
        }
    }
    files = {export.MODEL: export.model_path}
    say("in-distribution profile (the out-of-distribution flag)")
    ood, ood_note = ensure_ood_profile(run, torch_predictor)
    if ood is not None:
        files[export.OOD_PROFILE] = ood.save(export.ood_profile_path)
    recipes: dict[str, Any] = {}
    int8_points: dict[str, Any] | None = None
    if int8:
        train_rows = run.rows("train", manifest)
        val_rows = run.rows("val", manifest)
        y_val = run.class_targets(manifest)[val_rows]
        p_val_fp32 = probabilities(fp32.logits_of_rows(cache, val_rows))
        n_calibration = min(calibration, len(train_rows))
        chosen, best, p_val_int8 = "", np.inf, p_val_fp32
        for recipe in INT8_RECIPES:
            say(f"INT8 recipe {recipe}: calibrating on {n_calibration} training images, judged on validation")
            candidate = export.path / f".{recipe}.int8.onnx"
            batches = _calibration_batches(cache.array(), train_rows, spec, calibration, seed)
            quantize_int8(export.model_path, candidate, batches, recipe)
            p_val = probabilities(OnnxPredictor(candidate, spec, device="cpu").logits_of_rows(cache, val_rows))
            gap = abs(_auroc(y_val, p_val) - _auroc(y_val, p_val_fp32))
            recipes[recipe] = {
                "validation_auroc_difference": _auroc(y_val, p_val) - _auroc(y_val, p_val_fp32),
                "validation_call_agreement": float(np.mean((p_val >= threshold) == (p_val_fp32 >= threshold))),
            }
            if gap < best:
                chosen, best, p_val_int8 = recipe, gap, p_val
                candidate.replace(export.int8_path)
            else:
                candidate.unlink()
        files[export.MODEL_INT8] = export.int8_path
        # Quantisation shifts the scores a little: the INT8 model gets its own thresholds, chosen on validation too.
        int8_val_logits = OnnxPredictor(export.int8_path, spec, device="cpu").logits_of_rows(cache, val_rows)
        int8_points = {
            "threshold": youden_threshold(y_val, p_val_int8),
            "threshold_95_specificity": threshold_for_specificity(y_val, p_val_int8, 0.95),
            "temperature": fit_temperature(int8_val_logits, y_val),
            "chosen_on": f"validation split ({len(val_rows)} images), Youden's J, on the INT8 model's scores",
        }
        say(f"parity: ONNX Runtime INT8 ({chosen}, chosen on the validation split)")
        int8_logits = OnnxPredictor(export.int8_path, spec, device="cpu").logits_of_rows(cache, test_rows)
        p_fp32, p_int8 = probabilities(fp32_logits), probabilities(int8_logits)
        models["onnx_int8"] = _auroc_with_ci(
            y, p_int8, int8_points["threshold"], int8_points["threshold_95_specificity"], groups
        )
        delta, delta_ci = paired_bootstrap_ci(y, p_fp32, p_int8, _auroc, groups, seed=seed)
        agreement = float(np.mean((p_fp32 >= threshold) == (p_int8 >= threshold)))
        checks["int8_auroc"] = {
            "recipe": chosen,
            "calibration_images": n_calibration,
            "auroc_difference": delta,
            "auroc_difference_ci95": [delta_ci.low, delta_ci.high],
            "call_agreement_with_fp32": agreement,
            "tolerance": f"|AUROC(int8) - AUROC(fp32)| <= {INT8_AUROC_TOLERANCE}",
            "passed": abs(delta) <= INT8_AUROC_TOLERANCE,
        }

    say("framing of the training images (for whole fields)")
    framing = run_framing(run)
    card = run.model_card()
    classes = list(card.get("classes", ["not leukemic", "leukemic"]))
    preprocessing = {
        "format": ExportFolder.FORMAT,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "batch": "dynamic",
            "size": spec.image_size,
            "channel_order": "RGB",
            "resize": f"Resize the whole image to {spec.image_size} x {spec.image_size} px, Pillow's LANCZOS, no crop",
            "scale": "x / 255",
            "mean": list(spec.mean),
            "std": list(spec.std),
            "formula": "(x / 255 - mean) / std, per channel",
        },
        "stain_normalisation": spec.stain_state,
        "cell_focus": CellFocus.from_dict(spec.cell_focus).to_dict(),
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(classes)],
            "classes": classes,
            "positive_class": 1,
            "probability": "softmax(logits)[:, 1]",
        },
        "threshold": threshold,
        "threshold_95_specificity": t95,
        "threshold_chosen_on": points.get("chosen_on", "validation split"),
        "temperature": points.get("temperature", 1.0),
        "out_of_distribution": ood.summary() if ood is not None else {"note": ood_note},
        # Site profiles (`blastscan calibrate`) travel with the model; which cells each was fitted on stays home.
        "sites": {
            name: {k: v for k, v in profile.items() if k != "sample"} for name, profile in run.site_profiles().items()
        },
        "thresholds_tta": (run.operating_points() or {}).get("tta"),
        "thresholds_int8": int8_points,
        "framing": {
            "cell_fraction": framing.cell_fraction,
            "measured_on": framing.measured_on,
            "source": framing.source,
        },
        "model": {
            "name": card.get("name"),
            "run": run.name,
            "weights_sha256": run.weights_sha256(),
            "opset": OPSET,
            "blastscan_version": __version__,
            "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "class_counts": card.get("class_counts"),
        },
        "files": {name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)} for name, path in files.items()},
        "disclaimer": DISCLAIMER,
    }
    write_json(export.preprocessing_path, preprocessing)
    parity = {
        "test_images": len(test_rows),
        "split": "test",
        "unit": "patients" if groups is not None else "images",
        "threshold": threshold,
        "models": models,
        "checks": checks,
        "int8_recipes_on_validation": recipes,
    }
    write_json(export.parity_path, parity)
    parity = jsonable(parity)  # as the file holds it: NaN as None, numpy numbers as Python's
    export.model_card_path.write_text(
        _model_card(
            {
                "name": export.name,
                "pre": preprocessing,
                "parity": parity,
                "disclaimer": DISCLAIMER,
                "dataset": str(config.data.root),
            }
        ),
        encoding="utf-8",
    )
    return ExportResult(export, parity, time.perf_counter() - started)
