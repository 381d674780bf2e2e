"""`calibrate`: refit a run's operating point on a small labelled sample from a new site, keep it as a site profile.

A model's threshold is chosen on its own validation split; on another laboratory's images the scores shift and the
threshold no longer gives the specificity it gave at home. A site that labels a few dozen of its own cells gets
a profile of its own: the threshold that reaches the target specificity on that sample, and a temperature fitted
on it (applied only when it lowers the sample's calibration error, as for the run's own). The run's own operating
points stay as they were; `predict`, `analyze` and `serve` take `--site NAME`.

How far the operating point moved is reported with bootstrap CIs over the sample. With `sample_size`, the sample
is drawn from a larger labelled set (stratified by class) and everything else - every cell not in the sample, and
no cell of a patient who has one in it - is the held-out set on which the profile is judged: sensitivity and
specificity at the run's own threshold and at the site's, with CIs. `repeats` draws the sample again with other
seeds and reports the spread of the held-out figures, since 30 cells are a small, noisy sample.

Threshold methods (`THRESHOLD_METHODS`): "empirical" takes the lowest threshold meeting the target on the sample
(with 15 negatives and a 0.95 target that is just above the highest negative); "gaussian" fits a normal to the
negatives' logit margins (z1 - z0) and cuts at its target quantile, a smoother estimate from few cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from blastscan.data.manifest import class_targets, patient_ids
from blastscan.data.scan import load_or_scan
from blastscan.errors import ConfigError, DatasetError
from blastscan.evaluation.metrics import (
    bootstrap_ci,
    sensitivity_at_specificity,
    sensitivity_specificity,
    threshold_for_specificity,
    youden_threshold,
)
from blastscan.inference import Predictor, probabilities
from blastscan.runs import RunFolder, check_site_name, write_json
from blastscan.training.config import DataConfig
from blastscan.workflows.evaluate import dataset_name
from blastscan.workflows.thresholds import calibration_temperature, ensure_operating_points

THRESHOLD_METHODS = ("empirical", "gaussian")
#: A sample must hold at least this many cells of each class to fit anything.
MIN_PER_CLASS = 5


@dataclass
class SiteCalibration:
    """What `calibrate_site` stored and measured."""

    site: str
    profile_path: Path
    report_path: Path
    markdown_path: Path
    report: dict[str, Any]


def margins(logits: np.ndarray) -> np.ndarray:
    """z1 - z0 per row: the logit of the raw class-1 probability."""
    z = np.asarray(logits, dtype=np.float64)
    return z[:, 1] - z[:, 0]


def site_threshold(y: np.ndarray, logits: np.ndarray, target: float, method: str) -> float:
    """The raw-probability threshold meeting specificity `target` on a labelled sample, by `method`."""
    if method == "empirical":
        return threshold_for_specificity(y, probabilities(logits), target)
    if method == "gaussian":
        negatives = margins(logits)[np.asarray(y) == 0]
        cut = negatives.mean() + norm.ppf(target) * negatives.std(ddof=1)
        return float(1.0 / (1.0 + np.exp(-cut)))
    raise ConfigError(f"threshold method {method!r}: choose one of {', '.join(THRESHOLD_METHODS)}")


def draw_sample(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Row indices of a class-stratified random sample of `size` rows (at least MIN_PER_CLASS of each class)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in (0, 1):
        members = np.flatnonzero(y == label)
        share = max(MIN_PER_CLASS, round(size * len(members) / len(y)))
        if len(members) < share:
            raise DatasetError(f"the data hold {len(members)} cells of class {label}; a sample needs {share}")
        rows.append(rng.choice(members, share, replace=False))
    return np.sort(np.concatenate(rows))


def held_out_rows(n: int, sample: np.ndarray, patients: np.ndarray | None) -> np.ndarray:
    """Rows not in `sample`, and (when patients are known) of no patient who has a cell in it."""
    keep = np.ones(n, dtype=bool)
    keep[sample] = False
    if patients is not None:
        keep &= ~np.isin(patients, np.unique(patients[sample]))
    return np.flatnonzero(keep)


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    return sensitivity_specificity(y, p >= threshold)


def _rates_with_ci(
    y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray | None, n_boot: int, seed: int
) -> dict[str, Any]:
    sensitivity, specificity = _rates(y, p, threshold)
    sens_ci = bootstrap_ci(y, p, lambda a, b: _rates(a, b, threshold)[0], groups, n_boot, seed=seed)
    spec_ci = bootstrap_ci(y, p, lambda a, b: _rates(a, b, threshold)[1], groups, n_boot, seed=seed)
    return {
        "sensitivity": sensitivity,
        "sensitivity_ci95": [sens_ci.low, sens_ci.high],
        "specificity": specificity,
        "specificity_ci95": [spec_ci.low, spec_ci.high],
        "n_images": len(y),
    }


def _in_domain(run: RunFolder, predictor: Predictor, target: float, n_boot: int) -> dict[str, Any] | None:
    """Sensitivity and specificity on the run's own test split at the target-specificity threshold its validation
    split chose: what the site calibration tries to get back to. None when the run's data are not reachable."""
    try:
        manifest = run.manifest()
        config = run.config()
        cache = predictor.image_cache(manifest, config.data.cache_dir)
        targets = run.class_targets(manifest)
        val, test = run.rows("val", manifest), run.rows("test", manifest)
        p_val = probabilities(predictor.logits_of_rows(cache, val))
        p_test = probabilities(predictor.logits_of_rows(cache, test))
    except (ConfigError, DatasetError):
        return None
    threshold = threshold_for_specificity(targets[val], p_val, target)
    patients = patient_ids(manifest)
    return _rates_with_ci(
        targets[test], p_test, threshold, patients[test] if patients is not None else None, n_boot, seed=0
    )


def calibrate_site(
    run_dir: str | Path,
    data: str | Path,
    site: str,
    target_specificity: float = 0.95,
    sample_size: int | None = None,
    method: str = "gaussian",
    repeats: int = 1,
    seed: int = 0,
    n_boot: int = 1000,
    device: str = "auto",
    batch_size: int = 64,
) -> SiteCalibration:
    """Fit the site profile `site` of `run_dir` on the labelled cells of `data` (or a `sample_size` sample of
    them), store it in the run, and report how far the operating point moved and, on held-out cells, what it does.
    """
    check_site_name(site)
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(THRESHOLD_METHODS)}")
    if not 0.5 <= float(target_specificity) < 1.0:
        raise ConfigError(f"--target-specificity {target_specificity}: choose a value in [0.5, 1), e.g. 0.95")
    if int(repeats) < 1:
        raise ConfigError(f"--repeats {repeats}: choose a positive integer")
    run = RunFolder.open(run_dir)
    predictor = Predictor.from_run(run, device=device, batch_size=batch_size)
    own = ensure_operating_points(run, predictor)
    manifest = load_or_scan(DataConfig(root=str(data)).resolved_root())
    y = class_targets(manifest, run.config().data.positive_label)
    patients = patient_ids(manifest)
    if min(np.count_nonzero(y == 0), np.count_nonzero(y == 1)) < MIN_PER_CLASS:
        raise DatasetError(
            f"{data}: a site sample needs at least {MIN_PER_CLASS} labelled cells of each class; it has "
            f"{np.count_nonzero(y == 1)} positive and {np.count_nonzero(y == 0)} negative"
        )
    cache = predictor.image_cache(manifest, run.config().data.cache_dir)
    logits = predictor.logits_of_rows(cache, np.arange(len(manifest)))
    p_raw = probabilities(logits)
    own_threshold = float(own["threshold_95_specificity"]) if target_specificity == 0.95 else None
    if own_threshold is None:
        own_threshold = _own_threshold_at(run, predictor, target_specificity)

    draws = []
    for r in range(int(repeats)):
        sample = np.arange(len(y)) if sample_size is None else draw_sample(y, int(sample_size), seed + r)
        fitted = site_threshold(y[sample], logits[sample], target_specificity, method)
        held = held_out_rows(len(y), sample, patients) if sample_size is not None else np.zeros(0, dtype=int)
        draws.append((sample, fitted, held))

    sample, fitted, held = draws[0]
    calibration = calibration_temperature(logits[sample], y[sample])
    temperature = calibration["temperature"]
    boot = bootstrap_ci(
        y[sample], p_raw[sample], lambda a, b: _threshold_of_probabilities(a, b, target_specificity, method),
        n_boot=n_boot, seed=seed,
    )  # fmt: skip
    paths = manifest.table["path"].astype(str).to_numpy()
    profile = {
        "site": site,
        "threshold": fitted,
        "threshold_95_specificity": fitted if target_specificity == 0.95 else None,
        "target_specificity": float(target_specificity),
        **calibration,
        "method": method,
        "youden_threshold": youden_threshold(y[sample], p_raw[sample]),
        "chosen_on": f"site sample of {len(sample)} labelled cells from {data} ({method} threshold at "
        f"{target_specificity:.0%} specificity)",
        "sample": {"data": str(data), "n_images": len(sample), "paths": paths[sample].tolist()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    profile_path = run.write_site_profile(site, profile)

    report: dict[str, Any] = {
        "run": str(run.path),
        "site": site,
        "data": str(data),
        "dataset": dataset_name(manifest),
        "target_specificity": float(target_specificity),
        "method": method,
        "sample_size": len(sample),
        "operating_point": {
            "own_threshold": own_threshold,
            "site_threshold": fitted,
            "site_threshold_ci95": [boot.low, boot.high],
            "moved_by": fitted - own_threshold,
            "own_temperature": float(own.get("temperature", 1.0)),
            "site_temperature": temperature,
            "note": "thresholds on the network's raw class-1 probability",
        },
        "in_domain": _in_domain(run, predictor, target_specificity, n_boot),
    }
    if len(held):
        report["held_out"] = _held_out(y, p_raw, patients, own_threshold, draws, target_specificity, n_boot, seed)
    out_dir = run.eval_root / f"site-{site}"
    report_path = write_json(out_dir / "calibration.json", report)
    markdown_path = out_dir / "calibration.md"
    markdown_path.write_text(calibration_markdown(report))
    return SiteCalibration(site, profile_path, report_path, markdown_path, report)


def _threshold_of_probabilities(y: np.ndarray, p: np.ndarray, target: float, method: str) -> float:
    """`site_threshold` from raw probabilities (the bootstrap resamples (y, p) pairs)."""
    if not np.any(y == 0) or (method == "gaussian" and np.count_nonzero(y == 0) < 2):
        return float("nan")
    p = np.clip(p, 1e-12, 1 - 1e-12)
    margin = np.log(p) - np.log1p(-p)
    return site_threshold(y, np.stack([np.zeros_like(margin), margin], axis=1), target, method)


def _own_threshold_at(run: RunFolder, predictor: Predictor, target: float) -> float:
    manifest = run.manifest()
    cache = predictor.image_cache(manifest, run.config().data.cache_dir)
    val = run.rows("val", manifest)
    return threshold_for_specificity(
        run.class_targets(manifest)[val], probabilities(predictor.logits_of_rows(cache, val)), target
    )


def _held_out(
    y: np.ndarray,
    p: np.ndarray,
    patients: np.ndarray | None,
    own_threshold: float,
    draws: list[tuple[np.ndarray, float, np.ndarray]],
    target: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Held-out figures of the first draw with CIs, and the spread of the site-threshold figures over all draws."""
    _, fitted, held = draws[0]
    groups = patients[held] if patients is not None else None
    result: dict[str, Any] = {
        "n_images": len(held),
        "own_threshold": _rates_with_ci(y[held], p[held], own_threshold, groups, n_boot, seed),
        "site_threshold": _rates_with_ci(y[held], p[held], fitted, groups, n_boot, seed),
        # The best sensitivity the held-out cells allow at the target: a ceiling chosen on them, not a result.
        "oracle_sensitivity": sensitivity_at_specificity(y[held], p[held], target),
    }
    if len(draws) > 1:
        rates = np.array([_rates(y[h], p[h], t) for _, t, h in draws])
        result["repeats"] = {
            "n": len(draws),
            "sensitivity_mean": float(rates[:, 0].mean()),
            "sensitivity_range95": np.percentile(rates[:, 0], [2.5, 97.5]).tolist(),
            "specificity_mean": float(rates[:, 1].mean()),
            "specificity_range95": np.percentile(rates[:, 1], [2.5, 97.5]).tolist(),
        }
    return result


def _cell(rates: dict[str, Any] | None, key: str) -> str:
    if not rates:
        return "-"
    low, high = rates[f"{key}_ci95"]
    return f"{rates[key]:.3f} ({low:.3f}-{high:.3f})"


def calibration_markdown(report: dict[str, Any]) -> str:
    """The before/after table of a site calibration, as markdown."""
    point = report["operating_point"]
    target = report["target_specificity"]
    low, high = point["site_threshold_ci95"]
    lines = [
        f"# Site calibration: {report['site']} ({report['dataset']})",
        "",
        f"Sample: {report['sample_size']} labelled cells; target specificity {target:.0%}; {report['method']} "
        "threshold.",
        f"Threshold (raw probability): run's own {point['own_threshold']:.4f} -> site {point['site_threshold']:.4f} "
        f"(95% CI {low:.4f}-{high:.4f}); temperature {point['own_temperature']:.3f} -> "
        f"{point['site_temperature']:.3f}.",
        "",
        "| | cells | sensitivity (95% CI) | specificity (95% CI) |",
        "|---|---|---|---|",
    ]
    domain = report.get("in_domain")
    if domain:
        lines.append(
            f"| in-domain test, run's own threshold | {domain['n_images']} | {_cell(domain, 'sensitivity')} | "
            f"{_cell(domain, 'specificity')} |"
        )
    held = report.get("held_out")
    if held:
        for key, label in (
            ("own_threshold", "before: run's own threshold"),
            ("site_threshold", "after: site threshold"),
        ):
            lines.append(
                f"| {report['dataset']} held out, {label} | {held['n_images']} | {_cell(held[key], 'sensitivity')} | "
                f"{_cell(held[key], 'specificity')} |"
            )
        lines.append("")
        lines.append(
            f"Best sensitivity the held-out cells allow at {target:.0%} specificity (an oracle, chosen on them): "
            f"{held['oracle_sensitivity']:.3f}."
        )
        if "repeats" in held:
            r = held["repeats"]
            lines.append(
                f"Over {r['n']} samples drawn with different seeds, the site threshold gives held-out sensitivity "
                f"{r['sensitivity_mean']:.3f} (95% of draws {r['sensitivity_range95'][0]:.3f}-"
                f"{r['sensitivity_range95'][1]:.3f}) and specificity {r['specificity_mean']:.3f} "
                f"({r['specificity_range95'][0]:.3f}-{r['specificity_range95'][1]:.3f})."
            )
    else:
        lines.append("")
        lines.append("Every cell of the data was in the sample: no held-out evaluation (use --sample-size).")
    return "\n".join(lines) + "\n"
