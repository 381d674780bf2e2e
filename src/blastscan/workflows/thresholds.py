"""A run's decision thresholds and calibration temperature, chosen on its validation split and kept in the run.

`evaluate` records the thresholds it chooses; `predict` reads them, and chooses them itself (scoring the run's
validation images) the first time a run without them is used. Thresholds never come from the data being scored.
Thresholds are stored on the network's raw probabilities; the temperature (fitted on the same validation logits)
rescales what a user reads without changing any call (`blastscan.inference.calibrated_threshold`). Temperature
scaling minimises the validation log-loss, which a few confidently wrong cells can dominate: when the fitted
temperature makes the validation expected calibration error worse, it is recorded but not applied (temperature 1).
"""

from __future__ import annotations

from typing import Any

from blastscan.errors import BlastscanError, ConfigError
from blastscan.evaluation.metrics import (
    expected_calibration_error,
    fit_temperature,
    threshold_for_specificity,
    youden_threshold,
)
from blastscan.inference import Predictor, probabilities
from blastscan.runs import RunFolder


def _key(tta: bool) -> str:
    return "tta" if tta else "plain"


def calibration_temperature(logits: Any, targets: Any) -> dict[str, float]:
    """The temperature to apply to a run's probabilities, from its validation logits: the NLL-fitted one when it
    lowers the validation ECE, else 1 (both ECEs recorded)."""
    fitted = fit_temperature(logits, targets)
    raw = expected_calibration_error(targets, probabilities(logits))
    scaled = expected_calibration_error(targets, probabilities(logits, fitted))
    return {
        "temperature": float(fitted) if scaled < raw else 1.0,
        "temperature_fitted": float(fitted),
        "validation_ece_raw": float(raw),
        "validation_ece_scaled": float(scaled),
    }


def record_operating_points(
    run: RunFolder,
    tta: bool,
    youden: float,
    spec95: float,
    n_images: int,
    calibration: dict[str, float] | None = None,
) -> None:
    """Store the validation-chosen Youden and 95%-specificity thresholds of plain or TTA scores, and the
    calibration temperature chosen on the same validation logits (`calibration_temperature`)."""
    point: dict[str, Any] = {
        "threshold": float(youden),
        "threshold_95_specificity": float(spec95),
        "chosen_on": f"validation split ({n_images} images), Youden's J",
        **(calibration or {}),
    }
    run.write_operating_points({_key(tta): point})


def ensure_operating_points(run: RunFolder, predictor: Predictor, tta: bool = False) -> dict[str, Any]:
    """The run's thresholds for plain (or TTA) scores; chosen on its validation images and stored when missing."""
    stored = (run.operating_points() or {}).get(_key(tta))
    if stored is not None and "temperature" in stored:
        return stored
    try:
        config = run.config()
        manifest = run.manifest()
        rows = run.rows("val", manifest)
        targets = run.class_targets(manifest)[rows]
        cache = predictor.image_cache(manifest, config.data.cache_dir)
    except BlastscanError as exc:
        if stored is not None:
            return stored  # thresholds from an older blastscan, no temperature: probabilities stay uncalibrated
        raise ConfigError(
            f"{run.path}: has no {RunFolder.OPERATING_POINTS} and its validation images cannot be read to choose a "
            f"threshold ({exc}); run `blastscan evaluate {run.path}` where the dataset is, then copy the run"
        ) from None
    logits = predictor.logits_of_rows(cache, rows, tta=tta)
    p_val = probabilities(logits)
    record_operating_points(
        run,
        tta,
        youden_threshold(targets, p_val),
        threshold_for_specificity(targets, p_val, 0.95),
        len(rows),
        calibration_temperature(logits, targets),
    )
    return run.operating_points()[_key(tta)]
