"""`blastscan demo`: the whole pipeline that exists so far, on generated SYNTHETIC cells or on real data.

Synthetic: draw a small smear-cell dataset, then train the custom CNN on it (scan -> patient-level split ->
audit -> image cache -> training with early stopping), evaluate it on the held-out test patients (metrics with
CIs, Grad-CAM, the HTML report), and analyse one SYNTHETIC whole smear field with it (`blastscan analyze`: find the
leukocytes, score them, count the blasts, write the overlay and the review page under `field/`), and export it for
deployment (`blastscan export --int8`: ONNX and INT8 models with their parity under `export/`).
Real (`data=PATH`): the same with EfficientNet-Lite0 from the packaged ImageNet weights, without the field.
The run folder describes itself; for synthetic data it says that none of it is real.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from blastscan.data.audit import report_summary
from blastscan.data.synthetic import SYNTHETIC_TAG, generate_dataset, generate_fields
from blastscan.errors import ConfigError
from blastscan.runs import RunFolder
from blastscan.training.config import parse_config
from blastscan.workflows.analyze import analyze
from blastscan.workflows.evaluate import evaluate_run
from blastscan.workflows.export import export_run
from blastscan.workflows.train import train

DEMO_MARKER = ".blastscan-demo"

#: Synthetic cells: a small custom CNN at 64 px trains in well under a minute on 2 CPU cores.
SYNTHETIC_TRAINING: dict[str, Any] = {
    "data": {"image_size": 64},
    "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [16, 32, 64, 128]}},
    "trainer": {"max_epochs": 12, "patience": 4, "batch_size": 16},
}
#: Real data: the default transfer-learning setup (configs/allidb2_efficientnet_lite0.yaml), shortened.
REAL_TRAINING: dict[str, Any] = {
    "data": {"image_size": 128},
    "model": {"name": "tf_efficientnet_lite0", "pretrained": "package"},
    "trainer": {"max_epochs": 6, "patience": 3, "batch_size": 32},
}


@dataclass
class DemoResult:
    """What the demo did and where it put it."""

    run_dir: Path
    synthetic: bool
    data_root: Path
    images: int
    class_counts: dict[str, int]
    split_level: str
    split_counts: dict[str, dict[str, int]]
    audit: dict[str, Any]
    model: str
    epochs: int
    best_val_auroc: float | None
    best_epoch: int | None
    test_roc_auc: float | None = None
    test_roc_auc_ci: list[float] | None = None
    report: Path | None = None
    field_analysis: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["run_dir"], data["data_root"], data["report"] = str(self.run_dir), str(self.data_root), str(self.report)
        if self.synthetic:
            data = {"WARNING": f"{SYNTHETIC_TAG} data: procedurally drawn cells, not patients", **data}
        return json.dumps(data, indent=2)


def _fresh_run_dir(run_dir: Path) -> None:
    """Empty a previous demo's folder; refuse to touch any other non-empty folder."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / DEMO_MARKER).is_file():
            raise ConfigError(f"{run_dir}: exists and is not a blastscan demo folder; pass another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DEMO_MARKER).write_text("made by `blastscan demo`; the demo empties this folder when re-run\n")


def _analyse_synthetic_field(run_dir: Path, seed: int) -> dict[str, Any]:
    """Draw one SYNTHETIC field with known leukocytes, analyse it with the demo run, and compare the count."""
    fields = generate_fields(run_dir / "field-data", n_fields=1, seed=seed, blast_fraction=1.0)
    truth = pd.read_csv(fields / "cells.csv")
    result = analyze(run_dir, [fields / "fields"], run_dir / "field", device="cpu")
    row = result.rows[0]
    return {
        "field": row["field"],
        "page": str(run_dir / "field" / row["page"]),
        "leukocytes_drawn": len(truth),
        "cells_found": row["cells_found"],
        "blasts_drawn": int((truth["kind"] == "blast").sum()),
        "blasts_called": row["blasts"],
        "blast_percentage": row["blast_percentage"],
        "smear_call": row["smear_call"],
    }


def _export(run_dir: Path) -> dict[str, Any]:
    """`blastscan export --int8` of the demo run into `export/`: the files' sizes and the parity checks."""
    exported = export_run(run_dir, run_dir / "export", int8=True, calibration=64)
    folder = exported.folder
    return {
        "folder": str(folder.path),
        "model_mb": round(folder.model_path.stat().st_size / 1e6, 2),
        "int8_mb": round(folder.int8_path.stat().st_size / 1e6, 2),
        "checks_passed": exported.passed,
        "int8_auroc_difference": exported.parity["checks"]["int8_auroc"]["auroc_difference"],
    }


def run_demo(
    out: str | Path,
    data: str | Path | None = None,
    seed: int = 0,
    epochs: int | None = None,
    stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Generate (or take) a dataset and train on it into the run folder `out`; returns the summary.

    `epochs` caps training (default: the preset's, with early stopping)."""
    run_dir = Path(out)
    _fresh_run_dir(run_dir)
    announce = stage or (lambda _: None)
    seconds: dict[str, float] = {}
    synthetic = data is None
    start = time.perf_counter()
    if synthetic:
        announce(f"drawing {SYNTHETIC_TAG} smear cells")
        data_root = generate_dataset(run_dir / "data", seed=seed)
        source = data_root / "labels.csv"
        seconds["generate"] = round(time.perf_counter() - start, 2)
    else:
        source = data_root = Path(data)  # type: ignore[arg-type]
    preset = SYNTHETIC_TRAINING if synthetic else REAL_TRAINING
    tree = {
        "name": run_dir.name,
        "runs_dir": str(run_dir.parent),
        "seed": seed,
        **preset,
        "data": {**preset["data"], "root": str(source.resolve()), "split": {"seed": seed}},
    }
    if epochs is not None:
        tree["trainer"] = {**preset["trainer"], "max_epochs": epochs}
    announce("scanning, splitting, auditing, caching and training (see the log below)")
    start = time.perf_counter()
    result = train(parse_config(tree, source="demo"), progress_bar=True)
    seconds["train"] = round(time.perf_counter() - start, 2)
    announce("evaluating on the held-out test patients, explaining, writing the report")
    start = time.perf_counter()
    evaluation = evaluate_run(run_dir, n_boot=200)
    seconds["evaluate"] = round(time.perf_counter() - start, 2)

    field_analysis = None
    if synthetic:
        announce(f"analysing one {SYNTHETIC_TAG} smear field with the trained model")
        start = time.perf_counter()
        field_analysis = _analyse_synthetic_field(run_dir, seed)
        seconds["field"] = round(time.perf_counter() - start, 2)

    export = None
    if synthetic:
        announce("exporting the model for deployment (ONNX and INT8, parity measured on the test split)")
        start = time.perf_counter()
        export = _export(run_dir)
        seconds["export"] = round(time.perf_counter() - start, 2)

    run = RunFolder(run_dir)
    report = run.audit()
    splits = run.splits().table
    counts = pd.crosstab(splits["split"], splits["label"])
    summary = DemoResult(
        run_dir=run_dir,
        synthetic=synthetic,
        data_root=data_root,
        images=report.manifest_rows,
        class_counts=report.class_counts,
        split_level=report.split_level or "unknown",
        split_counts={str(k): {str(c): int(v) for c, v in row.items()} for k, row in counts.iterrows()},
        audit=report_summary(report),
        model=tree["model"]["name"],
        epochs=result.epochs,
        best_val_auroc=result.best_score,
        best_epoch=result.best_epoch,
        test_roc_auc=evaluation.metrics.get("roc_auc"),
        test_roc_auc_ci=(evaluation.metrics.get("ci") or {}).get("roc_auc"),
        report=evaluation.out_dir / "report.html",
        field_analysis=field_analysis,
        export=export,
        seconds=seconds,
        notes=list(report.notes),
    )
    (run_dir / "summary.json").write_text(summary.to_json())
    return summary
