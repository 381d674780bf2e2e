"""A run's in-distribution profile: fitted on its training split when it is trained, kept in the run folder.

`ensure_ood_profile` is what `train` calls at the end, and what `predict`, `analyze`, `serve` and `evaluate` call
for runs trained before the profile existed: it fits the profile (training features, validation thresholds) when
the run has none and its dataset is reachable, and otherwise says why there is no flag.
"""

from __future__ import annotations

import numpy as np

from blastscan.errors import BlastscanError, ConfigError
from blastscan.inference import Predictor
from blastscan.inference.ood import DEFAULT_OOD_METHOD, DEFAULT_PERCENTILE, OodProfile
from blastscan.runs import RunFolder

#: At most this many training images are embedded to fit the profile (a seeded random subset beyond it): the
#: class means and a shrunk covariance are stable long before, and fitting stays seconds on a CPU.
MAX_FIT_IMAGES = 4000


def fit_ood_profile(
    run: RunFolder,
    predictor: Predictor,
    method: str = DEFAULT_OOD_METHOD,
    percentile: float = DEFAULT_PERCENTILE,
    seed: int = 0,
) -> OodProfile:
    """Fit the run's profile on its training split's features (flag thresholds on its validation split), store it
    as ood.safetensors and return it."""
    config = run.config()
    manifest = run.manifest()
    train_rows, val_rows = run.rows("train", manifest), run.rows("val", manifest)
    if len(train_rows) > MAX_FIT_IMAGES:
        train_rows = np.sort(np.random.default_rng(seed).choice(train_rows, MAX_FIT_IMAGES, replace=False))
    targets = run.class_targets(manifest)
    cache = predictor.image_cache(manifest, config.data.cache_dir)
    _, train_features = predictor.outputs_of_rows(cache, train_rows)
    val_logits, val_features = predictor.outputs_of_rows(cache, val_rows)
    if train_features is None:
        raise ConfigError(
            f"{run.path}: the {predictor.backend} model gives no pooled features, so no in-distribution profile "
            "can be fitted; use backend='torch'"
        )
    profile = OodProfile(method=method, percentile=percentile).fit(
        train_features, targets[train_rows], val_features, val_logits
    )
    profile.save(run.ood_profile_path)
    return profile


def ensure_ood_profile(run: RunFolder, predictor: Predictor) -> tuple[OodProfile | None, str]:
    """(the run's profile, "") - fitted and stored first when missing - or (None, why there is none)."""
    if run.ood_profile_path.is_file():
        try:
            return OodProfile.load(run.ood_profile_path), ""
        except ConfigError as exc:
            return None, str(exc)
    try:
        return fit_ood_profile(run, predictor), ""
    except BlastscanError as exc:
        return None, (
            f"{run.path}: no in-distribution profile, and it cannot be fitted here ({exc}); run "
            f"`blastscan evaluate {run.path}` where the dataset is, then copy the run"
        )
