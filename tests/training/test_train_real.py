"""The shipped default config on the real ALL-IDB2 data, shortened to seconds, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from blastscan.models import create

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_default_config_trains_on_allidb2_with_pretrained_weights(allidb2_dir: Path, tmp_path: Path) -> None:
    overrides = [
        f"runs_dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.image_size=64",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.batch_size=16",
    ]
    command = [
        sys.executable,
        "-m",
        "blastscan",
        "train",
        "--config",
        str(REPO_ROOT / "configs" / "allidb2_efficientnet_lite0.yaml"),
        "--no-progress",
    ]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "BLASTSCAN_DATA": str(allidb2_dir.parents[1])},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run = tmp_path / "allidb2_efficientnet_lite0"
    assert "best val_auroc" in result.stdout
    card = json.loads((run / "model.json").read_text())
    assert card["pretrained"] == "package" and card["mean"] == [0.5, 0.5, 0.5]
    assert json.loads((run / "audit.json").read_text())["split_level"] == "image"

    # The trained weights started from ImageNet: the stem is close to the packaged one, not to a random init.
    trained = load_file(run / "best.safetensors")
    imagenet = create("tf_efficientnet_lite0", pretrained="package", num_classes=2).state_dict()
    stem = "conv_stem.weight"
    assert (trained[stem] - imagenet[stem]).abs().mean() < 0.1 * imagenet[stem].abs().mean()
    assert not torch.equal(trained["classifier.weight"], imagenet["classifier.weight"])
