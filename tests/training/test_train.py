"""Training end to end on SYNTHETIC cells: run folder, resume after a kill, bad input, 2-process DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from blastscan.cli import app
from blastscan.data.scan import scan
from blastscan.errors import ConfigError, TrainingError
from blastscan.models import create
from blastscan.training.config import parse_config
from blastscan.workflows.train import train
from training.conftest import fast_config

RUN_FILES = (
    "config.yaml",
    "manifest.csv",
    "splits.csv",
    "audit.json",
    "model.json",
    "best.safetensors",
    "checkpoints/last.ckpt",
    "checkpoints/best.ckpt",
    "metrics.csv",
    "training_curves.png",
    "augmentations.png",
)


def test_training_leaves_a_complete_run_folder(synthetic_csv: Path, tmp_path: Path) -> None:
    config = parse_config(fast_config(synthetic_csv, tmp_path))
    result = train(config, progress_bar=False)
    run = result.run_dir
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch") and len(metrics) == 1 + 3
    assert "val_auroc" in metrics[0] and "images_per_s" in metrics[0]
    card = json.loads((run / "model.json").read_text())
    model = create(card["name"], num_classes=2, **card["options"])
    model.load_state_dict(load_file(run / "best.safetensors"))
    with pytest.raises(ConfigError, match="exists"):
        train(config, progress_bar=False)


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from blastscan.training.config import parse_config
    from blastscan.workflows.train import train

    class KillAt(Callback):
        def __init__(self, step):
            self.step = step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= self.step:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a power cut

    tree = json.loads(sys.argv[1])
    train(parse_config(tree), progress_bar=False, extra_callbacks=[KillAt(int(sys.argv[2]))])
    """
)


def test_a_killed_run_resumes_to_the_same_end(synthetic_csv: Path, tmp_path: Path) -> None:
    whole = parse_config(fast_config(synthetic_csv, tmp_path / "whole"))
    train(whole, progress_bar=False)

    tree = fast_config(synthetic_csv, tmp_path / "killed")
    steps_per_epoch = (
        torch.load(tmp_path / "whole" / "tiny" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] // 3
    )
    kill_step = steps_per_epoch + steps_per_epoch // 2  # halfway through the second epoch
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(tree), str(kill_step)], capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    last = tmp_path / "killed" / "tiny" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # only the first epoch was saved
    train(parse_config(tree), resume=True, progress_bar=False)

    expected = load_file(tmp_path / "whole" / "tiny" / "best.safetensors")
    resumed = load_file(tmp_path / "killed" / "tiny" / "best.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)
    ends = [
        torch.load(p / "tiny" / "checkpoints" / "last.ckpt", weights_only=True)
        for p in (tmp_path / "whole", tmp_path / "killed")
    ]
    assert ends[0]["global_step"] == ends[1]["global_step"]
    for key, value in ends[0]["state_dict"].items():
        torch.testing.assert_close(ends[1]["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    # The record of how the weights were reached survives the resume: every epoch, as in the uninterrupted run.
    histories = [pd.read_csv(p / "tiny" / "metrics.csv") for p in (tmp_path / "whole", tmp_path / "killed")]
    assert histories[1]["epoch"].tolist() == histories[0]["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_series_equal(histories[1]["val_auroc"], histories[0]["val_auroc"], atol=1e-6)
    logged = pd.read_csv(tmp_path / "killed" / "tiny" / "logs" / "metrics.csv")
    assert sorted(logged["epoch"].dropna().unique().astype(int).tolist()) == [0, 1, 2]


def test_resume_writes_into_the_folder_it_is_given_and_nowhere_else(synthetic_csv: Path, tmp_path: Path) -> None:
    config = parse_config(fast_config(synthetic_csv, tmp_path / "runs", trainer__max_epochs=1))
    original = train(config, progress_bar=False).run_dir
    copy = tmp_path / "elsewhere" / "tiny_copy"
    shutil.copytree(original, copy)
    (original / "checkpoints" / "best.ckpt").unlink()  # the copy must not need anything from the original
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()}
    cli = CliRunner().invoke(
        app, ["train", "--resume", str(copy), "--set", "trainer.max_epochs=2", "--no-progress"]
    )  # run from a folder that holds a run of the same name (the config's runs_dir/name)
    assert cli.exit_code == 0, cli.output
    # The one line that says which data path ran, and why.
    assert "training data: DataLoader; data.device_cache: auto keeps the split on CUDA only" in cli.output
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before  # the original is untouched
    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert pd.read_csv(copy / "metrics.csv")["epoch"].tolist() == [0, 1]


def test_a_damaged_checkpoint_is_refused_clearly(synthetic_csv: Path, tmp_path: Path) -> None:
    config = parse_config(fast_config(synthetic_csv, tmp_path, trainer__max_epochs=1))
    train(config, progress_bar=False)
    last = tmp_path / "tiny" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(TrainingError, match="cannot be read"):
        train(config, resume=True, progress_bar=False)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "epoch": 0, "payload": _Payload(marker)}, last)
    with pytest.raises(TrainingError, match="cannot be read") as caught:
        train(config, resume=True, progress_bar=False)
    assert not marker.exists() and "weights_only" not in str(caught.value) and "GLOBAL" in str(caught.value)


class _Payload:
    """Pickles as a call that would create `marker`: proof of whether a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_nan_loss_stops_the_run(synthetic_csv: Path, tmp_path: Path) -> None:
    config = parse_config(fast_config(synthetic_csv, tmp_path, optim__lr=1e30))
    with pytest.raises(TrainingError, match="loss became"):
        train(config, progress_bar=False)


def test_an_empty_class_in_training_stops_the_run(synthetic_csv: Path, tmp_path: Path) -> None:
    import pandas as pd

    # The same cells without patient IDs, and a split that sends every normal cell to val/test.
    table = pd.read_csv(synthetic_csv).drop(columns=["patient_id"])
    lab_csv = synthetic_csv.parent / "labels_without_patients.csv"
    table.to_csv(lab_csv, index=False)
    manifest = scan(lab_csv, verify=False).manifest
    split = [
        "train" if label == "leukemic" and i % 3 else ("val" if i % 2 else "test")
        for i, label in enumerate(manifest.table["label"])
    ]
    splits = tmp_path / "splits.csv"
    pd.DataFrame({"path": manifest.table["path"], "split": split}).to_csv(splits, index=False)
    config = parse_config(fast_config(lab_csv, tmp_path, data__splits=str(splits)))
    with pytest.raises(TrainingError, match="train split has no images of class 0"):
        train(config, progress_bar=False)


@pytest.mark.skipif(sys.platform != "linux", reason="the DDP test uses gloo on Linux")
def test_two_process_ddp_on_cpu(synthetic_csv: Path, tmp_path: Path) -> None:
    import yaml

    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(fast_config(synthetic_csv, tmp_path, trainer__max_epochs=1)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blastscan",
            "train",
            "--config",
            str(config_path),
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--no-progress",
            "--set",
            "trainer.accelerator=cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "on 2 process(es)" in output
    assert output.count("training data: DataLoader; data-parallel over 2 processes") == 1  # rank 0 says it, once
    assert (tmp_path / "tiny" / "best.safetensors").is_file()


def test_frozen_backbone_then_staged_unfreezing(synthetic_csv: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import Callback

    class RecordWeights(Callback):
        def __init__(self) -> None:
            self.stem: list[torch.Tensor] = []
            self.head: list[torch.Tensor] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            convs = [m for m in pl_module.model.features.modules() if isinstance(m, torch.nn.Conv2d)]
            linears = [m for m in pl_module.model.get_classifier().modules() if isinstance(m, torch.nn.Linear)]
            self.stem.append(convs[0].weight.detach().clone())
            self.head.append(linears[-1].weight.detach().clone())

    recorder = RecordWeights()
    config = parse_config(fast_config(synthetic_csv, tmp_path, model__freeze_backbone=True, model__unfreeze_epoch=2))
    train(config, progress_bar=False, extra_callbacks=[recorder])
    assert torch.equal(recorder.stem[0], recorder.stem[1])  # frozen in epochs 0 and 1
    assert not torch.equal(recorder.head[0], recorder.head[1])  # the head trains
    assert not torch.equal(recorder.stem[1], recorder.stem[2])  # thawed at epoch 2
