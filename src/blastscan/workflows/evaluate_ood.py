"""`evaluate-ood`: how well a run's in-distribution score tells its own kind of cells from everything else, and how
much abstaining on uncertain cells helps.

In-domain: the run's test split (or every image of `--in DATA`). Out of distribution: every other labelled cell
dataset found under the data folder (or `--out DATA...`), SYNTHETIC cells drawn by `blastscan.data.synthetic`, and
non-cell photographs (crops of scikit-image's sample images). For each in-distribution method
(`blastscan.inference.ood.OOD_METHODS`) it reports the AUROC of in-domain vs each set with a bootstrap CI, and the
share of each set the run's stored flag marks. For every labelled set it draws selective-prediction curves
(accuracy vs coverage when abstaining on the cells whose probability is nearest the threshold) and reports the
accuracy gained by abstaining on the 10% least certain, with a CI. Everything goes to `RUN/eval/ood/`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage import data as skimage_data

from blastscan.data.manifest import LEUKEMIC, class_targets, patient_ids
from blastscan.data.registry import find_cell_datasets
from blastscan.data.scan import load_or_scan
from blastscan.data.synthetic import CELL_KINDS, draw_cell
from blastscan.errors import ConfigError
from blastscan.evaluation import figures
from blastscan.evaluation.metrics import abstention_gain_with_ci, score_auroc_with_ci, selective_accuracy
from blastscan.inference import Predictor, calibrated_threshold, probabilities
from blastscan.inference.core import join_stages
from blastscan.inference.ood import OOD_METHODS, OodProfile
from blastscan.runs import RunFolder, write_json
from blastscan.training.config import DataConfig
from blastscan.workflows.evaluate import dataset_name
from blastscan.workflows.in_distribution import ensure_ood_profile
from blastscan.workflows.thresholds import ensure_operating_points

#: scikit-image sample photographs (bundled with the package, no download) that the non-cell set is cut from.
PHOTOGRAPHS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "camera", "brick", "grass", "gravel", "moon", "coins", "horse", "text", "clock", "page",
)  # fmt: skip


@dataclass
class ImageSet:
    """One set of scored images: logits, features, and labels when known."""

    name: str
    logits: np.ndarray
    features: list[np.ndarray] | None
    targets: np.ndarray | None = None
    patients: np.ndarray | None = None
    kind: str = "dataset"  # "in-domain", "dataset", "synthetic" or "non-cell"


@dataclass
class OodEvaluation:
    """Where `evaluate_ood` wrote its findings, and the findings."""

    out_dir: Path
    report: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)


def photograph_crops(n: int, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """`n` random square RGB crops (a quarter to all of the short side) of scikit-image's sample photographs."""
    rng = np.random.default_rng(seed)
    photos: dict[str, np.ndarray] = {}
    crops = []
    for i in range(n):
        name = PHOTOGRAPHS[i % len(PHOTOGRAPHS)]
        if name not in photos:  # loaded once, and only those used
            image = np.asarray(getattr(skimage_data, name)())
            photos[name] = (np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]).astype(np.uint8)
        photo = photos[name]
        height, width = photo.shape[:2]
        side = int(rng.integers(min(height, width) // 4, min(height, width) + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crops.append(photo[top : top + side, left : left + side])
    return crops


def synthetic_cells(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """`n` SYNTHETIC single-cell images, the kinds the synthetic drawer knows in turn, and their labels (1: blast)."""
    rng = np.random.default_rng(seed)
    kinds = [list(CELL_KINDS)[i % len(CELL_KINDS)] for i in range(n)]
    return [draw_cell(kind, rng, size=128) for kind in kinds], np.array([CELL_KINDS[k] == LEUKEMIC for k in kinds], int)


def _arrays_set(predictor: Predictor, name: str, images: list[np.ndarray], kind: str) -> ImageSet:
    logits, features = [], []
    for _, prepared, _, _ in predictor.prepared_batches(images):
        batch_logits, batch_features = predictor.outputs_of_batch(prepared)
        logits.append(batch_logits)
        if batch_features is not None:
            features.append(batch_features)
    return ImageSet(name, np.concatenate(logits), join_stages(features), kind=kind)


def _dataset_set(
    predictor: Predictor, manifest: Any, rows: np.ndarray, name: str, positive: str, cache_dir: str | None, kind: str
) -> ImageSet:
    cache = predictor.image_cache(manifest, cache_dir)
    logits, features = predictor.outputs_of_rows(cache, rows)
    patients = patient_ids(manifest)
    return ImageSet(
        name,
        logits,
        features,
        class_targets(manifest, positive)[rows],
        patients[rows] if patients is not None else None,
        kind,
    )


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def other_datasets(run: RunFolder, data_dir: Path) -> list[Path]:
    """Every labelled cell dataset under `data_dir` except the run's own (or the ones it trained on)."""
    own_roots = [root.resolve() for root in run.config().data.resolved_sources()]
    found = [path for _, path in find_cell_datasets(data_dir)]
    return [p for p in found if not any(p == own or own in p.parents or p in own.parents for own in own_roots)]


def evaluate_ood(
    run_dir: str | Path,
    in_data: str | Path | None = None,
    out_data: Sequence[str | Path] | None = None,
    data_dir: str | Path | None = None,
    synthetic: int = 200,
    photographs: int = 200,
    max_images: int | None = 2000,
    coverage: float = 0.9,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> OodEvaluation:
    """Measure the run's in-distribution score and abstention (see the module docstring); write RUN/eval/ood/."""
    say = progress or (lambda _: None)
    run = RunFolder.open(run_dir)
    config = run.config()
    positive = config.data.positive_label
    predictor = Predictor.from_run(run, device=device, batch_size=batch_size)
    points = ensure_operating_points(run, predictor)
    profile, note = ensure_ood_profile(run, predictor)
    if profile is None:
        raise ConfigError(note)
    cache_dir = config.data.cache_dir

    say("scoring the in-domain images")
    if in_data is None:
        own = run.manifest()
        inliers = _dataset_set(
            predictor, own, run.rows("test", own), f"{dataset_name(own)} test", positive, cache_dir, "in-domain"
        )
    else:
        manifest = load_or_scan(DataConfig(root=str(in_data)).resolved_root())
        rows = _subsample(len(manifest), max_images, seed)
        inliers = _dataset_set(predictor, manifest, rows, dataset_name(manifest), positive, cache_dir, "in-domain")

    if out_data is None:
        root = Path(data_dir) if data_dir is not None else DataConfig(root="$BLASTSCAN_DATA").resolved_root()
        out_data = other_datasets(run, root) if root.is_dir() else []
    outliers: list[ImageSet] = []
    for path in out_data:
        manifest = load_or_scan(DataConfig(root=str(path)).resolved_root())
        say(f"scoring {dataset_name(manifest)} ({len(manifest)} images)")
        rows = _subsample(len(manifest), max_images, seed)
        outliers.append(_dataset_set(predictor, manifest, rows, dataset_name(manifest), positive, cache_dir, "dataset"))
    if synthetic:
        say(f"scoring {synthetic} synthetic cells")
        cells, labels = synthetic_cells(synthetic, seed)
        drawn = _arrays_set(predictor, "synthetic cells", cells, "synthetic")
        drawn.targets = labels if positive == LEUKEMIC else None
        outliers.append(drawn)
    if photographs:
        say(f"scoring {photographs} non-cell photographs")
        outliers.append(
            _arrays_set(predictor, "non-cell photographs", photograph_crops(photographs, seed=seed), "non-cell")
        )

    say("measuring")
    temperature = float(points.get("temperature", 1.0))
    threshold = float(points["threshold"])
    report = {
        "run": str(run.path),
        "in_domain": inliers.name,
        "flag": profile.summary(),
        "methods": list(OOD_METHODS),
        "detection": _detection(profile, inliers, outliers, n_boot, seed),
        "selective": {
            s.name: _selective(s, threshold, temperature, profile, coverage, n_boot, seed)
            for s in [inliers, *outliers]
            if s.targets is not None and len(np.unique(s.targets)) == 2
        },
        "threshold": calibrated_threshold(threshold, temperature),
        "temperature": temperature,
    }
    out_dir = run.eval_root / "ood"
    made = {
        "scores": figures.plot_ood_scores(
            {s.name: profile.scores(s.features, s.logits) for s in [inliers, *outliers]},
            out_dir / "ood_scores.png", profile.threshold, profile.method,
        ),
        "selective": figures.plot_selective_accuracy(
            {
                f"{name}, by {rule}": entry[rule]["curve"]
                for name, entry in report["selective"].items()
                for rule in ("certainty", "ood_score")
            },
            out_dir / "selective_prediction.png",
        ),
    }  # fmt: skip
    write_json(out_dir / "ood.json", report)
    (out_dir / "ood.md").write_text(ood_markdown(report))
    return OodEvaluation(out_dir, report, made)


def _detection(
    profile: OodProfile, inliers: ImageSet, outliers: list[ImageSet], n_boot: int, seed: int
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    in_scores = {m: profile.scores(inliers.features, inliers.logits, m) for m in OOD_METHODS}
    rows[inliers.name] = {
        "kind": inliers.kind,
        "n_images": len(inliers.logits),
        "flagged": float(np.mean(profile.flags(in_scores[profile.method]))),
    }
    for s in outliers:
        scores = {m: profile.scores(s.features, s.logits, m) for m in OOD_METHODS}
        rows[s.name] = {
            "kind": s.kind,
            "n_images": len(s.logits),
            "flagged": float(np.mean(profile.flags(scores[profile.method]))),
            "auroc": {m: score_auroc_with_ci(in_scores[m], scores[m], n_boot, seed) for m in OOD_METHODS},
        }
    return rows


def _selective(
    s: ImageSet, threshold: float, temperature: float, profile: OodProfile, coverage: float, n_boot: int, seed: int
) -> dict[str, Any]:
    """Accuracy vs coverage when abstaining on the least certain (nearest the threshold, in logit margin) or the
    least familiar (highest in-distribution score) cells."""
    p = probabilities(s.logits, temperature)
    t = calibrated_threshold(threshold, temperature)
    correct = (p >= t) == (s.targets == 1)
    margin = (s.logits[:, 1] - s.logits[:, 0]).astype(np.float64)
    cut = np.log(threshold) - np.log1p(-threshold) if 0 < threshold < 1 else 0.0
    # Uncertainty: nearness to the threshold (in logit margin), or unfamiliarity; sorted ascending, so the most
    # certain cells are answered first.
    rules = {"certainty": -np.abs(margin - cut), "ood_score": profile.scores(s.features, s.logits)}
    result: dict[str, Any] = {"n_images": len(p)}
    for rule, uncertainty in rules.items():
        result[rule] = {
            "curve": selective_accuracy(correct, uncertainty),
            "gain": abstention_gain_with_ci(correct, uncertainty, coverage, s.patients, n_boot, seed),
        }
    return result


def _ci(entry: dict[str, Any], key: str = "auroc") -> str:
    low, high = entry["ci95"]
    return f"{entry[key]:.3f} ({low:.3f}-{high:.3f})"


def ood_markdown(report: dict[str, Any]) -> str:
    """The detection and abstention tables of one `evaluate_ood` run, as markdown."""
    flag = report["flag"]
    methods = report["methods"]
    lines = [
        f"# Out-of-distribution flags: {Path(report['run']).name}",
        "",
        f"In-domain: {report['in_domain']}. Flag: {flag['method']} score above {flag['threshold']:.4g} (the "
        f"{flag['percentile']:g}th percentile of validation scores).",
        "",
        "| image set | images | flagged | " + " | ".join(f"AUROC {m} (95% CI)" for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for name, row in report["detection"].items():
        aurocs = [_ci(row["auroc"][m]) if "auroc" in row else "-" for m in methods]
        lines.append(f"| {name} | {row['n_images']} | {row['flagged']:.1%} | " + " | ".join(aurocs) + " |")
    lines += [
        "",
        "Abstention: accuracy on the cells still answered when the least certain are left to a person.",
        "",
        "| image set | rule | accuracy, all | accuracy at 90% coverage | gain (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["selective"].items():
        for rule in ("certainty", "ood_score"):
            curve = {round(r["coverage"], 2): r["accuracy"] for r in entry[rule]["curve"]}
            gain = entry[rule]["gain"]
            lines.append(
                f"| {name} | {rule} | {curve[1.0]:.3f} | {curve.get(round(gain['coverage'], 2), float('nan')):.3f} "
                f"| {_ci(gain, 'gain')} |"
            )
    return "\n".join(lines) + "\n"
