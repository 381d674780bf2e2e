"""The deployment path imports no torch: `predict`, `analyze` and the service run an exported model with torch,
timm and Lightning made unimportable in the process (the slim `blastscan[serve]` install; the fresh-venv check of
that install is tests/test_slim_install.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from blastscan.data.synthetic import generate_fields

#: Run before anything else in the child: any import of these raises, as it would where they are not installed.
BLOCK_TRAINING_STACK = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"torch", "torchvision", "timm", "lightning", "pytorch_lightning", "torchmetrics", "pytorch_grad_cam"}
    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
    sys.meta_path.insert(0, _Blocked())
    """
)


def _run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TRAINING_STACK + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=cwd, timeout=300, check=False,
    )  # fmt: skip


def test_predict_analyze_and_serve_run_an_export_without_torch(
    stain_export: Path, allidb2_dir: Path, tmp_path: Path
) -> None:
    cells = sorted((allidb2_dir / "img").glob("*.tif"))[:3]
    fields = generate_fields(tmp_path / "synthetic", n_fields=1, seed=3) / "fields"
    code = f"""
        import json, sys
        from typer.testing import CliRunner
        from blastscan.cli import app
        runner = CliRunner()
        results = [
            runner.invoke(app, ["predict", {str(stain_export)!r}, *{[str(c) for c in cells]!r},
                                "--out", {str(tmp_path / "p.csv")!r}]),
            runner.invoke(app, ["predict", {str(stain_export / "model.int8.onnx")!r}, {str(cells[0])!r},
                                "--out", {str(tmp_path / "p8.csv")!r}]),
            runner.invoke(app, ["analyze", {str(stain_export)!r}, {str(fields)!r}, "--out", {str(tmp_path / "f")!r}]),
        ]
        from fastapi.testclient import TestClient
        from blastscan.workflows.serve import build_app
        client = TestClient(build_app({str(stain_export)!r}))
        health = client.get("/healthz").status_code
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "lightning"))
        print(json.dumps({{"codes": [r.exit_code for r in results], "outputs": [r.output for r in results],
                           "health": health, "loaded": loaded}}))
    """
    done = _run_blocked(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0], report["outputs"]
    assert report["health"] == 200
    assert report["loaded"] == []
    assert (tmp_path / "p.csv").read_text().count("\n") == 2 + len(cells)  # header lines + one row per cell
    assert (tmp_path / "f" / "summary.csv").is_file()


def test_a_run_without_a_cached_export_says_how_to_get_one_when_torch_is_missing(
    stain_run: Path, tmp_path: Path
) -> None:
    code = f"""
        from blastscan.errors import ConfigError
        from blastscan.runs import RunFolder
        from blastscan.inference.onnx_backend import run_onnx_file
        run = RunFolder({str(stain_run)!r})
        run.ONNX_CACHE = "no-such-cache"
        try:
            run_onnx_file(run)
        except ConfigError as exc:
            print(exc)
    """
    done = _run_blocked(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PyTorch is not installed" in done.stdout and "blastscan export" in done.stdout
