"""Experiments made of several runs: K-fold cross-validation and run comparison (`transfer` has its own module),
and the helpers they share.

Each trains through `workflows.train.train` and scores through `evaluate_run`, so every number comes from the same
code as a single run; finished folds and pairs are reused when a command is re-run, so an interrupted
experiment picks up where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blastscan.data.scan import load_or_scan
from blastscan.data.splits import SplitResult, make_split, write_splits
from blastscan.errors import ConfigError
from blastscan.evaluation import figures
from blastscan.runs import RunFolder
from blastscan.training.config import TrainConfig
from blastscan.workflows.evaluate import evaluate_run
from blastscan.workflows.train import train

#: The metrics the experiment tables carry (all from metrics.json).
KEY_METRICS = (
    "roc_auc",
    "pr_auc",
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "sensitivity_at_95_specificity",
)


def with_changes(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of `config` with dotted keys changed (e.g. data__splits=...)."""
    tree = config.model_dump(mode="json")
    for dotted, value in changes.items():
        node = tree
        *parents, leaf = dotted.replace("__", ".").split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return TrainConfig.model_validate(tree)


def train_once(config: TrainConfig, log: Callable[[str], None]) -> Path:
    """Train `config`'s run unless its weights exist (then reuse it); resume from its last checkpoint if any."""
    run = RunFolder(Path(config.runs_dir) / config.name)
    run_dir = run.path
    if run.weights_path.is_file():
        log(f"{run_dir}: already trained, reused")
        return run_dir
    resume = run.last_checkpoint.is_file()
    log(f"{run_dir}: {'resuming' if resume else 'training'}")
    train(config, resume=resume, progress_bar=False)
    return run_dir


def metrics_row(metrics: dict[str, Any], **labels: Any) -> dict[str, Any]:
    """`labels` and the KEY_METRICS of a metrics.json, each with its CI as text."""
    row: dict[str, Any] = dict(labels)
    for key in KEY_METRICS:
        value = metrics.get(key)
        row[key] = np.nan if value is None else value
        low, high = (metrics.get("ci") or {}).get(key) or (None, None)
        row[f"{key}_ci"] = "" if low is None else f"{low:.3f}-{high:.3f}"
    return row


@dataclass
class CrossvalResult:
    out_dir: Path
    folds: pd.DataFrame
    summary: pd.DataFrame


def crossval(
    config: TrainConfig,
    folds: int = 5,
    n_boot: int = 1000,
    log: Callable[[str], None] = lambda _: None,
    device: str = "auto",
) -> CrossvalResult:
    """K-fold grouped cross-validation: fold k is the test set, fold k+1 the validation set, the rest trains."""
    manifest = load_or_scan(config.data.resolved_root(), config.data.format)
    assignment = make_split(manifest, folds=folds, seed=config.data.split.seed)
    fold_of_row = assignment.table["split"].astype(int).to_numpy()
    out_dir = Path(config.runs_dir) / f"{config.name}-crossval{folds}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(folds):
        split = np.where(fold_of_row == k, "test", np.where(fold_of_row == (k + 1) % folds, "val", "train"))
        table = assignment.table.assign(split=split)
        metadata = {**assignment.metadata, "crossval_fold": k, "folds": folds}
        splits_path = write_splits(SplitResult(table, metadata, assignment.warnings), out_dir / f"splits-fold{k}.csv")
        fold_config = with_changes(config, name=f"fold{k}", runs_dir=str(out_dir), data__splits=str(splits_path))
        run_dir = train_once(fold_config, log)
        metrics = evaluate_run(run_dir, split="test", n_boot=n_boot, device=device).metrics
        rows.append(
            metrics_row(metrics, fold=k, n_images=metrics.get("n_images"), n_patients=metrics.get("n_patients"))
        )
        log(f"fold {k}: AUROC {metrics.get('roc_auc')}")
    table = pd.DataFrame(rows)
    summary = pd.DataFrame(
        {
            "metric": list(KEY_METRICS),
            "mean": [table[m].mean() for m in KEY_METRICS],
            "sd": [table[m].std(ddof=1) for m in KEY_METRICS],
        }
    )
    table.to_csv(out_dir / "crossval_folds.csv", index=False)
    summary.to_csv(out_dir / "crossval_summary.csv", index=False)
    level = assignment.level
    header = f"{folds}-fold grouped cross-validation of `{config.name}` ({level}-level groups)\n\n"
    lines = ["| metric | mean | sd |", "|---|---|---|"]
    lines += [f"| {m} | {mean:.3f} | {sd:.3f} |" for m, mean, sd in summary.itertuples(index=False)]
    (out_dir / "crossval.md").write_text(header + "\n".join(lines) + "\n")
    figures.plot_metric_boxplot(table, out_dir / "crossval_boxplot.png")
    return CrossvalResult(out_dir, table, summary)


def compare(run_dirs: Sequence[str | Path], evaluation: str | None = None) -> pd.DataFrame:
    """One row per run and evaluation folder (`eval/<dataset>-<split>`) with the key metrics and their CIs."""
    rows = []
    for run_dir in map(Path, run_dirs):
        found = [folder / "metrics.json" for folder in RunFolder(run_dir).evaluations()]
        if evaluation is not None:
            found = [p for p in found if p.parent.name == evaluation]
        if not found:
            raise ConfigError(f"{run_dir}: no evaluation found; run `blastscan evaluate {run_dir}` first")
        for path in found:
            metrics = json.loads(path.read_text())
            rows.append(metrics_row(metrics, run=run_dir.name, evaluation=path.parent.name))
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison as a markdown table, each metric with its 95% CI."""
    shown = ("roc_auc", "accuracy", "recall", "specificity", "f1", "sensitivity_at_95_specificity")
    lines = ["| run | evaluation | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    for record in table.to_dict(orient="records"):
        cells = [f"{record[m]:.3f} ({record[m + '_ci']})" if record[m + "_ci"] else f"{record[m]:.3f}" for m in shown]
        lines.append(f"| {record['run']} | {record['evaluation']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_matrix(matrix: pd.DataFrame) -> str:
    """A train x test matrix as a markdown table (3 decimals, blanks for missing pairs)."""
    lines = ["| | " + " | ".join(map(str, matrix.columns)) + " |", "|---|" + "---|" * len(matrix.columns)]
    for name, row in matrix.iterrows():
        lines.append(f"| {name} | " + " | ".join("" if pd.isna(v) else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)
