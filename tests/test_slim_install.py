"""`pip install "blastscan[serve]"` in a fresh venv: no torch, timm or Lightning, and it runs `predict`, `analyze`
and `serve` on an exported model (the deployment install; one pip install from the package registry, so slow)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from blastscan.data.synthetic import generate_fields

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", f"{REPO}[serve]"],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"pip install blastscan[serve] failed:\n{done.stderr[-3000:]}"
    return venv


@pytest.mark.slow
def test_the_slim_install_has_no_training_stack_and_runs_an_export(
    slim_venv: Path, stain_export: Path, allidb2_dir: Path, tmp_path: Path
) -> None:
    bin_ = slim_venv / "bin"
    listed = subprocess.run([str(bin_ / "pip"), "list", "--format=json"], capture_output=True, text=True, check=True)
    installed = {row["name"].lower() for row in json.loads(listed.stdout)}
    assert not installed & {"torch", "timm", "lightning", "torchvision", "grad-cam", "torchmetrics"}
    assert {"onnxruntime", "fastapi", "uvicorn", "blastscan"} <= installed

    cells = sorted((allidb2_dir / "img").glob("*.tif"))[:2]
    predicted = subprocess.run(
        [str(bin_ / "blastscan"), "predict", str(stain_export), *map(str, cells), "--out", str(tmp_path / "p.csv")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert "2 images" in " ".join(predicted.stdout.split())  # Rich wraps lines at the terminal width
    fields = generate_fields(tmp_path / "synthetic", n_fields=1, seed=5) / "fields"
    analysed = subprocess.run(
        [str(bin_ / "blastscan"), "analyze", str(stain_export), str(fields), "--out", str(tmp_path / "f")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert analysed.returncode == 0, analysed.stderr[-2000:]
    assert (tmp_path / "f" / "summary.csv").is_file()

    port = _free_port()
    server = subprocess.Popen(
        [str(bin_ / "blastscan"), "serve", str(stain_export), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=5) as answer:
                    card = json.loads(answer.read())
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the slim service did not start:\n{server.stdout.read() if server.stdout else ''}")
                time.sleep(0.5)
        assert card["backend"] == "onnx" and card["source"] == "export" and "Research use only" in card["disclaimer"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
