"""Run every command that scores a trained model on one tiny SYNTHETIC run and collect the numbers it wrote.

`reference.json` beside this file was written by this script on the code before the inference engine and the
package reshaping (git e0063be): `python tests/golden/make_reference.py tests/golden/reference.json`.
`tests/test_outputs_unchanged.py` runs the same commands on today's code and compares, to 1e-6.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from blastscan.data.synthetic import generate_dataset


def _blastscan(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "blastscan", *args], check=True, capture_output=True, text=True)


def _numbers(value: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON tree, keyed by its dotted path."""
    found: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found.update(_numbers(item, f"{prefix}{key}."))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.update(_numbers(item, f"{prefix}{index}."))
    elif isinstance(value, bool | int | float):
        found[prefix[:-1]] = float(value)
    return found


def collect(work: Path) -> dict[str, Any]:
    """Train the tiny run in `work`, score it every way the CLI can, and return the numbers."""
    data = work / "data"
    generate_dataset(data, n_patients=8, cells_per_patient=12, size=48, seed=0)
    config = {
        "name": "tiny",
        "seed": 0,
        "runs_dir": str(work / "runs"),
        "data": {"root": str(data / "labels.csv"), "image_size": 32, "cache_dir": str(work / "cache")},
        "model": {"name": "blastscan_cnn", "pretrained": None, "options": {"widths": [8, 16, 16, 32]}},
        "loss": {"name": "weighted_ce"},
        "trainer": {"max_epochs": 3, "patience": 10, "batch_size": 16, "log_every_n_steps": 1},
    }
    config_path = work / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run = work / "runs" / "tiny"
    _blastscan("train", "--config", str(config_path), "--no-progress")
    _blastscan("evaluate", str(run), "--tta", "--bootstrap", "50")
    _blastscan("audit-shortcuts", str(run), "--bootstrap", "50")
    images = sorted((data / "images").rglob("*.png"))[:3]
    _blastscan("explain", str(run), *map(str, images), "--out", str(work / "explain"))
    _blastscan(
        "baselines", "--data", str(run / "manifest.csv"), "--splits", str(run / "splits.csv"), "--cnn", str(run),
        "--out", str(work / "baselines"), "--image-size", "32", "--bootstrap", "50",
    )  # fmt: skip

    evaluation = next((run / "eval").glob("*-test"))
    predictions = pd.read_csv(evaluation / "predictions.csv")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    metrics.pop("run", None)
    shortcuts = json.loads(next((run / "eval").glob("shortcuts-*/shortcuts.json")).read_text())
    explanations = pd.read_csv(work / "explain" / "explanations.csv")
    baselines = pd.read_csv(work / "baselines" / "baselines.csv")
    return {
        "metrics": _numbers(metrics),
        "predictions": predictions[["probability", "probability_tta"]].to_numpy().round(9).tolist(),
        "shortcuts": _numbers(shortcuts),
        "explain": explanations["probability"].round(9).tolist(),
        "baselines": _numbers(baselines.select_dtypes("number").to_dict(orient="list")),
    }


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = collect(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True))
