"""A run's decision thresholds, chosen on its validation split and kept in the run folder.

`evaluate` records the thresholds it chooses; `predict` reads them, and chooses them itself (scoring the run's
validation images) the first time a run without them is used. Thresholds never come from the data being scored.
"""

from __future__ import annotations

from typing import Any

from blastscan.errors import BlastscanError, ConfigError
from blastscan.evaluation.metrics import threshold_for_specificity, youden_threshold
from blastscan.inference import Predictor, probabilities
from blastscan.runs import RunFolder


def _key(tta: bool) -> str:
    return "tta" if tta else "plain"


def record_operating_points(run: RunFolder, tta: bool, youden: float, spec95: float, n_images: int) -> None:
    """Store the validation-chosen Youden and 95%-specificity thresholds of plain or TTA scores."""
    run.write_operating_points(
        {
            _key(tta): {
                "threshold": float(youden),
                "threshold_95_specificity": float(spec95),
                "chosen_on": f"validation split ({n_images} images), Youden's J",
            }
        }
    )


def ensure_operating_points(run: RunFolder, predictor: Predictor, tta: bool = False) -> dict[str, Any]:
    """The run's thresholds for plain (or TTA) scores; chosen on its validation images and stored when missing."""
    stored = (run.operating_points() or {}).get(_key(tta))
    if stored is not None:
        return stored
    try:
        config = run.config()
        manifest = run.manifest()
        rows = run.rows("val", manifest)
        targets = run.class_targets(manifest)[rows]
        cache = predictor.image_cache(manifest, config.data.cache_dir)
    except BlastscanError as exc:
        raise ConfigError(
            f"{run.path}: has no {RunFolder.OPERATING_POINTS} and its validation images cannot be read to choose a "
            f"threshold ({exc}); run `blastscan evaluate {run.path}` where the dataset is, then copy the run"
        ) from None
    p_val = probabilities(predictor.logits_of_rows(cache, rows, tta=tta))
    record_operating_points(
        run, tta, youden_threshold(targets, p_val), threshold_for_specificity(targets, p_val, 0.95), len(rows)
    )
    return run.operating_points()[_key(tta)]
