"""The command line, end to end, through the installed `blastscan` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from blastscan.workflows.demo import DEMO_MARKER

BLASTSCAN = [sys.executable, "-m", "blastscan"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BLASTSCAN, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_scan_split_audit_on_allidb2(allidb2_dir: Path, tmp_path: Path) -> None:
    manifest, splits, audit_json = tmp_path / "m.csv", tmp_path / "s.csv", tmp_path / "a.json"
    scanned = run("data", "scan", str(allidb2_dir), "--out", str(manifest))
    assert scanned.returncode == 0, scanned.stderr
    assert "recognised as all-idb2" in scanned.stdout
    split = run("data", "split", str(manifest), "--out", str(splits), "--seed", "1")
    assert split.returncode == 0, split.stderr
    assert "image-level" in split.stderr  # the warning that ALL-IDB has no patients
    audited = run("data", "audit", str(manifest), "--splits", str(splits), "--json", str(audit_json))
    assert audited.returncode == 0, audited.stdout + audited.stderr
    cached = run("data", "cache", str(manifest), "--size", "32", "--cache-dir", str(tmp_path / "cache"))
    assert cached.returncode == 0 and "260 decoded" in cached.stdout, cached.stdout + cached.stderr
    report = json.loads(audit_json.read_text())
    assert any(d["first"] == "Im223_0.tif" and d["kind"] == "exact" for d in report["duplicates"])

    # Move an exact duplicate to the other side: the audit must fail the split.
    table = pd.read_csv(splits, skiprows=1)
    side = dict(zip(table["path"], table["split"], strict=True))
    table.loc[table["path"] == "Im257_0.tif", "split"] = "test" if side["Im223_0.tif"] != "test" else "train"
    leaky = tmp_path / "leaky.csv"
    table.to_csv(leaky, index=False)
    leaked = run("data", "audit", str(manifest), "--splits", str(leaky))
    assert leaked.returncode == 1
    assert "LEAK" in leaked.stderr


def test_bad_input_gets_one_line_error(tmp_path: Path) -> None:
    missing = run("data", "scan", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "no such file or folder" in missing.stderr and "Traceback" not in missing.stderr
    not_manifest = tmp_path / "x.csv"
    not_manifest.write_text("a,b\n1,2\n")
    split = run("data", "split", str(not_manifest))
    assert split.returncode == 2 and "not a blastscan manifest" in split.stderr


def test_demo_on_synthetic_data(tmp_path: Path) -> None:
    # The folder holds an earlier demo (its marker and an old file): the demo replaces it.
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / DEMO_MARKER).write_text("an earlier demo\n")
    (tmp_path / "demo" / "old.txt").write_text("from the earlier demo")
    result = run("demo", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "demo" / "old.txt").exists()
    assert "SYNTHETIC" in result.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert "SYNTHETIC" in summary["WARNING"]
    assert summary["split_level"] == "patient" and summary["audit"]["patients straddling splits"] == 0
    assert summary["epochs"] >= 1 and summary["best_val_auroc"] is not None
    for name in ("manifest.csv", "splits.csv", "audit.json", "data/README.txt", "best.safetensors", "metrics.csv"):
        assert (tmp_path / "demo" / name).is_file()
    assert summary["test_roc_auc"] is not None and Path(summary["report"]).is_file()
    assert "SYNTHETIC" in Path(summary["report"]).read_text()
    assert summary["export"]["checks_passed"] and (tmp_path / "demo" / "export" / "model.int8.onnx").is_file()
    assert "blastscan serve" in " ".join(result.stdout.split())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = run("demo", "--out", str(tmp_path / "mine"))
    assert refused.returncode == 2 and "not a blastscan demo folder" in refused.stderr


def test_demo_on_real_data(allidb2_dir: Path, tmp_path: Path) -> None:
    result = run("demo", "--out", str(tmp_path / "demo"), "--data", str(allidb2_dir), "--epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert not summary["synthetic"] and summary["images"] == 260 and summary["split_level"] == "image"
    assert summary["model"] == "tf_efficientnet_lite0"


def test_baselines_command(allidb2_dir: Path, tmp_path: Path) -> None:
    manifest, splits = tmp_path / "m.csv", tmp_path / "s.csv"
    assert run("data", "scan", str(allidb2_dir), "--out", str(manifest)).returncode == 0
    assert run("data", "split", str(manifest), "--out", str(splits)).returncode == 0
    result = run(
        "baselines", "--data", str(manifest), "--splits", str(splits), "--out", str(tmp_path / "bl"),
        "--image-size", "48", "--bootstrap", "50",
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "Random forest" in result.stdout or "random_forest" in result.stdout
    for name in ("baselines.md", "baselines.csv", "baselines_bar.png", "segmentation.png"):
        assert (tmp_path / "bl" / name).is_file(), name


def test_transfer_looks_for_datasets_and_says_when_there_are_too_few(allidb2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ALL_IDB2").symlink_to(allidb2_dir)
    config = Path(__file__).resolve().parent.parent / "configs" / "transfer_efficientnet_lite0.yaml"
    result = subprocess.run(
        [*BLASTSCAN, "transfer", "--config", str(config), "--set", f"runs_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "BLASTSCAN_DATA": str(tmp_path / "data")},
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    said = result.stdout + result.stderr
    assert "(all-idb2)" in said and "transfer needs at least two labelled cell datasets" in said
