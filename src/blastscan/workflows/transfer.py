"""`blastscan transfer`: the external-validation matrix - train on one lab's cells, test on every other lab's.

For every variant (stain handling, cell focus, stain augmentation, see `TRANSFER_VARIANTS`) it trains one model per
dataset and, with `leave_one_out`, one per dataset left out (trained on all the others together: multi-source, each
source split by its own patients and drawn equally often). Every model is scored on its own test split and on
every dataset it did not train on (all images, at the threshold chosen on its own validation split), audited for
shortcuts (`shortcut_audit`: cell removed, background removed, background-only probe) and checked for where its
Grad-CAM looks (share of CAM energy inside the segmented cell). Leave-one-dataset-out is the headline: it is what a
new laboratory gets.

Stain augmentation strength is not guessed: `strong-stain` variants use the StainJitter sigma that covers the stain
spread measured across the datasets (`blastscan.imaging.stain_spread`), recorded in stain_spread.md.

Finished runs and evaluations are reused when the command is run again, so an interrupted matrix resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blastscan.data.images import load_resized
from blastscan.data.manifest import Manifest
from blastscan.data.scan import load_or_scan
from blastscan.data.sources import source_names
from blastscan.errors import ConfigError
from blastscan.evaluation import figures
from blastscan.imaging.stain_spread import StainSpread, stain_spread
from blastscan.runs import RunFolder, write_json
from blastscan.training.config import DataConfig, TrainConfig
from blastscan.workflows.evaluate import dataset_name, evaluate_run
from blastscan.workflows.experiments import markdown_matrix, metrics_row, train_once, with_changes
from blastscan.workflows.shortcuts import shortcut_audit

#: Placeholder for the stain-jitter sigma measured across the datasets (`stain_spread`).
CALIBRATED = "calibrated"
#: The stain shift that goes with a calibrated (large) scale: shifts add colour where no stain is, so keep them mild.
CALIBRATED_SHIFT = 0.05

_PLAIN_STAIN = {"data.stain_normalization": "none", "augment.stain_jitter": 0.0}
#: What each variant changes in the experiment's config.
TRANSFER_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {**_PLAIN_STAIN, "data.cell_focus": "none"},
    "stain-jitter": {"data.stain_normalization": "none", "augment.stain_jitter": 0.1, "data.cell_focus": "none"},
    "reinhard": {"data.stain_normalization": "reinhard", "augment.stain_jitter": 0.0, "data.cell_focus": "none"},
    "crop": {**_PLAIN_STAIN, "data.cell_focus": "crop"},
    "mask": {**_PLAIN_STAIN, "data.cell_focus": "mask"},
    "strong-stain": {
        "data.stain_normalization": "none",
        "augment.stain_jitter": CALIBRATED,
        "augment.stain_shift": CALIBRATED_SHIFT,
        "data.cell_focus": "none",
    },
    "mask-reinhard-strong": {
        "data.stain_normalization": "reinhard",
        "augment.stain_jitter": CALIBRATED,
        "augment.stain_shift": CALIBRATED_SHIFT,
        "data.cell_focus": "mask",
    },
}
DEFAULT_VARIANTS = ("plain", "reinhard", "crop", "mask", "strong-stain", "mask-reinhard-strong")
#: Images per dataset measured for the stain spread.
SPREAD_IMAGES = 150


@dataclass
class TransferResult:
    """The matrix (`table`: one row per variant, scheme, training set and test set), the per-model checks
    (`models`: shortcut audit and CAM-in-cell share), the stain spread, and where it was all written."""

    out_dir: Path
    table: pd.DataFrame
    models: pd.DataFrame
    spread: StainSpread | None


@dataclass(frozen=True)
class _Dataset:
    name: str
    root: Path


def _datasets(roots: Sequence[str | Path]) -> list[_Dataset]:
    paths = [DataConfig(root=str(r)).resolved_root() for r in roots]
    if len(paths) < 2:
        found = ", ".join(map(str, paths)) or "none"
        raise ConfigError(f"transfer needs at least two labelled cell datasets (found or given: {found})")
    manifests = [load_or_scan(path) for path in paths]
    return [_Dataset(name, path) for name, path in zip(source_names(manifests), paths, strict=True)]


def measure_spread(datasets: Sequence[_Dataset], per_dataset: int = SPREAD_IMAGES, seed: int = 0) -> StainSpread:
    """The stain spread of an evenly spaced sample of `per_dataset` images of every dataset (at 128 px)."""
    images = {}
    for dataset in datasets:
        manifest: Manifest = load_or_scan(dataset.root)
        paths = manifest.absolute_paths()
        picks = np.random.default_rng(seed).permutation(len(paths))[:per_dataset]
        images[dataset.name] = [load_resized(paths[i], 128) for i in sorted(picks)]
    return stain_spread(images)


def _changes(variant: str, spread: StainSpread | None) -> dict[str, Any]:
    changes = dict(TRANSFER_VARIANTS[variant])
    for key, value in changes.items():
        if value == CALIBRATED:
            assert spread is not None
            changes[key] = spread.sigma
    return {key.replace(".", "__"): value for key, value in changes.items()}


def _cam_in_cell(metrics: dict[str, Any], method: str = "gradcam") -> float:
    """The image-weighted mean share of `method`'s CAM energy inside the cell over both classes (NaN if absent)."""
    rows = [r for r in metrics.get("localisation") or [] if r.get("method") == method and r.get("n")]
    if not rows:
        return float("nan")
    return float(sum(r["mean"] * r["n"] for r in rows) / sum(r["n"] for r in rows))


def transfer(
    config: TrainConfig,
    datasets: Sequence[str | Path],
    variants: Sequence[str] = DEFAULT_VARIANTS,
    leave_one_out: bool = True,
    audit: bool = True,
    n_boot: int = 1000,
    explain_images: int = 100,
    log: Callable[[str], None] = lambda _: None,
    device: str = "auto",
) -> TransferResult:
    """Train and cross-score every variant on every dataset (and every leave-one-dataset-out combination); write
    transfer.md, transfer.csv, models.csv, stain_spread.md/json and heatmaps to `<runs_dir>/<name>-transfer`."""
    unknown = sorted(set(variants) - set(TRANSFER_VARIANTS))
    if unknown:
        raise ConfigError(f"unknown transfer variant(s) {unknown}; choose from {', '.join(TRANSFER_VARIANTS)}")
    found = _datasets(datasets)
    out_dir = Path(config.runs_dir) / f"{config.name}-transfer"
    out_dir.mkdir(parents=True, exist_ok=True)
    spread = None
    if any(CALIBRATED in TRANSFER_VARIANTS[v].values() for v in variants):
        log("measuring the stain spread across " + ", ".join(d.name for d in found))
        spread = measure_spread(found)
        write_json(out_dir / "stain_spread.json", spread.to_dict())
        (out_dir / "stain_spread.md").write_text(spread.markdown())
        log(f"calibrated stain jitter sigma {spread.sigma}")

    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for variant in variants:
        changes = _changes(variant, spread)
        trained: dict[str, Path] = {}
        for dataset in found:
            run_config = with_changes(
                config, name=f"{dataset.name}-{variant}", runs_dir=str(out_dir), data__root=str(dataset.root),
                data__extra_sources=[], **changes,
            )  # fmt: skip
            trained[dataset.name] = train_once(run_config, log)
        schemes: list[tuple[str, str, Path, list[_Dataset]]] = [
            ("single", d.name, trained[d.name], [t for t in found if t != d]) for d in found
        ]
        if leave_one_out:
            for held in found:
                others = [d for d in found if d != held]
                if len(others) == 1:
                    run_dir = trained[others[0].name]  # all but one is one dataset: the single-source model
                else:
                    run_config = with_changes(
                        config, name=f"without-{held.name}-{variant}", runs_dir=str(out_dir),
                        data__root=str(others[0].root), data__extra_sources=[str(d.root) for d in others[1:]],
                        **changes,
                    )  # fmt: skip
                    run_dir = train_once(run_config, log)
                schemes.append(("leave-one-out", "+".join(d.name for d in others), run_dir, [held]))
        checked: dict[Path, dict[str, Any]] = {}
        scored: dict[tuple[Path, str], dict[str, Any]] = {}
        for scheme, trained_on, run_dir, external in schemes:
            if run_dir not in checked:
                checked[run_dir] = _check_model(run_dir, variant, trained_on, audit, n_boot, explain_images, device)
                models.append(checked[run_dir])
                own = checked[run_dir]["own_metrics"]
                rows.append(metrics_row(own, variant=variant, scheme=scheme, train=trained_on, test=trained_on,
                                        external=False))  # fmt: skip
            for dataset in external:
                key = (run_dir, dataset.name)  # a leave-one-out model may be a single-source one already scored
                if key not in scored:
                    scored[key] = (
                        _finished(RunFolder(run_dir).eval_dir(dataset.name, "all"))
                        or evaluate_run(run_dir, data=dataset.root, n_boot=n_boot, explain=False, device=device).metrics
                    )
                metrics = scored[key]
                rows.append(metrics_row(metrics, variant=variant, scheme=scheme, train=trained_on, test=dataset.name,
                                        external=True))  # fmt: skip
                log(f"{variant} ({scheme}) {trained_on} -> {dataset.name}: AUROC {metrics.get('roc_auc'):.3f}")
    table = pd.DataFrame(rows).drop_duplicates(subset=["variant", "scheme", "train", "test"])
    model_table = pd.DataFrame([{k: v for k, v in m.items() if k != "own_metrics"} for m in models])
    table.to_csv(out_dir / "transfer.csv", index=False)
    model_table.to_csv(out_dir / "models.csv", index=False)
    _write_figures(out_dir, table)
    (out_dir / "transfer.md").write_text(transfer_markdown(table, model_table, spread, found))
    return TransferResult(out_dir, table, model_table, spread)


def _check_model(
    run_dir: Path, variant: str, trained_on: str, audit: bool, n_boot: int, explain_images: int, device: str
) -> dict[str, Any]:
    """One model's own-test metrics (with the CAM-in-cell share) and its shortcut audit."""
    run = RunFolder(run_dir)
    own = _finished(run.eval_dir(dataset_name(run.manifest()), "test"), need_localisation=explain_images > 0)
    if own is None:
        own = evaluate_run(run_dir, n_boot=n_boot, explain=explain_images > 0, explain_images=explain_images,
                           device=device).metrics  # fmt: skip
    record: dict[str, Any] = {
        "variant": variant,
        "train": trained_on,
        "run": str(run_dir),
        "own_roc_auc": own.get("roc_auc"),
        "cam_in_cell": _cam_in_cell(own),
        "own_metrics": own,
    }
    if audit:
        found = _finished(run.shortcuts_dir("test"), "shortcuts.json")
        if found is None:
            report = shortcut_audit(run_dir, n_boot=n_boot, device=device)
            found = {"conditions": report.conditions, "n_unsegmented": report.n_unsegmented}
        for condition, metrics in found["conditions"].items():
            record[f"{condition}_roc_auc"] = metrics["roc_auc"]
            low, high = (metrics.get("ci") or {}).get("roc_auc") or (None, None)
            record[f"{condition}_roc_auc_ci"] = "" if low is None else f"{low:.3f}-{high:.3f}"
        record["unsegmented"] = found["n_unsegmented"]
    focus_notes = [n for n in run.audit().notes if n.startswith("cell focus")]
    record["cell_focus_note"] = focus_notes[0] if focus_notes else ""
    return record


def _finished(folder: Path, name: str = "metrics.json", need_localisation: bool = False) -> dict[str, Any] | None:
    """The results a finished evaluation or audit left in `folder` (newer than the run's weights, so they are this
    model's), or None: an interrupted matrix then redoes only what is missing."""
    path = folder / name
    weights = RunFolder(folder.parent.parent).weights_path
    if not path.is_file() or not weights.is_file() or path.stat().st_mtime < weights.stat().st_mtime:
        return None
    found = json.loads(path.read_text())
    return None if need_localisation and not found.get("localisation") else found


def _write_figures(out_dir: Path, table: pd.DataFrame) -> None:
    single = table[table["scheme"] == "single"]
    for variant, block in single.groupby("variant", sort=False):
        matrix = block.pivot(index="train", columns="test", values="roc_auc")
        figures.plot_transfer_heatmap(
            matrix, out_dir / f"transfer_{variant}_roc_auc.png", title=f"AUROC ({variant}): train -> test"
        )
    external = table[table["external"]]
    if len(external):
        summary = external.assign(pair=external["train"] + " -> " + external["test"]).pivot_table(
            index="variant", columns="pair", values="roc_auc", sort=False
        )
        figures.plot_transfer_heatmap(summary, out_dir / "transfer_external_roc_auc.png",
                                      title="External AUROC by variant")  # fmt: skip


def _cell(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    ci = record.get(f"{key}_ci")
    return f"{value:.3f} ({ci})" if ci else f"{value:.3f}"


def summary_markdown(table: pd.DataFrame, models: pd.DataFrame) -> str:
    """One row per variant: each single-source model's AUROC on its own test split and on every other dataset,
    its AUROC with the cell removed and its Grad-CAM energy in the cell."""
    single = table[table["scheme"] == "single"]
    names = list(dict.fromkeys(single["train"]))
    pairs = [(a, b) for a in names for b in names if a != b]
    header = (
        [f"{n} own test" for n in names]
        + [f"{a} -> {b}" for a, b in pairs]
        + [f"{n}: cell removed" for n in names]
        + [f"{n}: CAM in cell" for n in names]
    )
    lines = ["| variant | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for variant, block in single.groupby("variant", sort=False):
        by = {(r["train"], r["test"]): r for r in block.to_dict(orient="records")}
        checks = {r["train"]: r for r in models[models["variant"] == variant].to_dict(orient="records")}
        cells = [f"{by[(n, n)]['roc_auc']:.3f}" if (n, n) in by else "" for n in names]
        cells += [_cell(by[p], "roc_auc") if p in by else "" for p in pairs]
        cells += [_cell(checks.get(n, {}), "cell_removed_roc_auc").split(" (")[0] for n in names]
        cam = [checks.get(n, {}).get("cam_in_cell") for n in names]
        cells += ["" if c is None or np.isnan(c) else f"{c:.0%}" for c in cam]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer_markdown(
    table: pd.DataFrame, models: pd.DataFrame, spread: StainSpread | None, datasets: Sequence[_Dataset]
) -> str:
    """transfer.md: the leave-one-dataset-out headline, the full matrix, the per-model checks, the stain spread."""
    lines = [
        "# External validation: " + ", ".join(f"{d.name} (`{d.root.name}`)" for d in datasets),
        "",
        "Thresholds come from each model's own validation split; intervals are 95% bootstraps over patients where "
        "the test set names them, else over images.",
        "",
    ]
    lines += ["## Summary (AUROC; external pairs with 95% CI)", "", summary_markdown(table, models), ""]
    loo = table[(table["scheme"] == "leave-one-out") & table["external"]]
    columns = ("roc_auc", "recall", "specificity", "sensitivity_at_95_specificity")
    header = "| variant | trained on | tested on (left out) | AUROC | sensitivity | specificity | sens. at 95% spec. |"
    if len(loo):
        lines += ["## Leave one dataset out (the headline)", "", header, "|---|---|---|---|---|---|---|"]
        for record in loo.to_dict(orient="records"):
            cells = " | ".join(_cell(record, c) for c in columns)
            lines.append(f"| {record['variant']} | {record['train']} | {record['test']} | {cells} |")
        lines.append("")
    lines += ["## Every model on every dataset", "", header.replace("(left out)", ""), "|---|---|---|---|---|---|---|"]
    for record in table[table["scheme"] == "single"].to_dict(orient="records"):
        test = record["test"] + ("" if record["external"] else " (own test split)")
        cells = " | ".join(_cell(record, c) for c in columns)
        lines.append(f"| {record['variant']} | {record['train']} | {test} | {cells} |")
    lines.append("")
    lines += ["### AUROC matrices (rows: trained on; columns: tested on)", ""]
    for variant, block in table[table["scheme"] == "single"].groupby("variant", sort=False):
        lines += [f"**{variant}**", "", markdown_matrix(block.pivot(index="train", columns="test", values="roc_auc")),
                  ""]  # fmt: skip
    if len(models):
        lines += [
            "## Does each model look at the cell? (own test split)",
            "",
            "| variant | trained on | AUROC | cell removed | background removed | background-only probe | "
            "Grad-CAM energy in cell |",
            "|---|---|---|---|---|---|---|",
        ]
        for record in models.to_dict(orient="records"):
            cam = record.get("cam_in_cell")
            cam_text = "" if cam is None or np.isnan(cam) else f"{cam:.0%}"
            lines.append(
                f"| {record['variant']} | {record['train']} | {_cell(record, 'original_roc_auc')} | "
                f"{_cell(record, 'cell_removed_roc_auc')} | {_cell(record, 'background_removed_roc_auc')} | "
                f"{_cell(record, 'background_probe_roc_auc')} | {cam_text} |"
            )
        notes = [f"- {r['variant']}, {r['train']}: {r['cell_focus_note']}" for r in models.to_dict(orient="records")
                 if r.get("cell_focus_note")]  # fmt: skip
        if notes:
            lines += ["", "Cell focus:", *notes]
        lines.append("")
    if spread is not None:
        lines += ["## Stain spread across the datasets", "", spread.markdown()]
    return "\n".join(lines) + "\n"
