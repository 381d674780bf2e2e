"""The device-resident data path against the DataLoader path, the choice between them, and the throughput options.

On the CPU here: `data.device_cache: on` puts the split in a CPU tensor, which exercises the same gather as CUDA.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from blastscan.models import preprocessing_for
from blastscan.training import data as training_data
from blastscan.training.config import parse_config
from blastscan.training.data import CellDataModule, DeviceBatches, choose_data_path
from blastscan.training.losses import balanced_sample_weights
from blastscan.training.module import CellClassifier
from blastscan.training.prepare import PreparedData, prepare_data
from training.conftest import fast_config

EPOCHS = 3


def quiet_trainer(root: Path, **options: Any) -> L.Trainer:
    """A CPU Lightning trainer without logger, checkpoints, progress bar or summary."""
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, **options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def prepared(synthetic_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, PreparedData]:
    tree = fast_config(synthetic_csv, tmp_path_factory.mktemp("device_data"))
    return tree, prepare_data(parse_config(tree))


def _datamodule(data: PreparedData, mode: str, weights=None) -> CellDataModule:
    datamodule = CellDataModule(
        data.cache,
        data.split_rows,
        data.targets,
        batch_size=16,
        num_workers=0,
        seed=3,
        sample_weights=weights,
        eval_batch_size=40,
        device_cache=mode,
    )
    datamodule.setup("fit")
    return datamodule


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("balanced", [False, True], ids=["shuffled", "weighted"])
def test_device_batches_are_the_loader_batches_epoch_after_epoch(prepared, balanced: bool) -> None:
    _, data = prepared
    rows = data.split_rows["train"]
    weights = balanced_sample_weights(data.targets[rows]) if balanced else None
    loader = _datamodule(data, "off", weights).train_dataloader()
    device = _datamodule(data, "on", weights).train_dataloader()
    assert isinstance(loader, DataLoader) and isinstance(device, DeviceBatches)
    assert len(device) == len(loader)
    for epoch in range(EPOCHS):
        order = rows[device.sampler.order().numpy()] if epoch == 0 else None
        from_loader, from_device = _epoch(loader, epoch), _epoch(device, epoch)
        assert len(from_device) == len(from_loader)
        for (images, labels), (expected_images, expected_labels) in zip(from_device, from_loader, strict=True):
            assert images.shape == expected_images.shape and images.stride() == expected_images.stride()
            assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
        if order is not None:  # the rows, in the sampler's order: the indices gathered are the loader's
            gathered = torch.cat([images for images, _ in from_device]).permute(0, 2, 3, 1).numpy()
            np.testing.assert_array_equal(gathered, data.cache.array()[order])
    # Validation reads in order, in eval-sized batches, either way.
    val_loader, val_device = _datamodule(data, "off").val_dataloader(), _datamodule(data, "on").val_dataloader()
    for (images, labels), (expected_images, expected_labels) in zip(val_device, val_loader, strict=True):
        assert len(labels) <= 40 and torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_a_device_loader_started_at_epoch_k_replays_epoch_k(prepared) -> None:
    _, data = prepared
    running = _datamodule(data, "on").train_dataloader()
    epochs = [_epoch(running, epoch) for epoch in range(EPOCHS)]
    resumed = _datamodule(data, "on").train_dataloader()  # a fresh process resuming at the last epoch
    for (images, labels), (expected_images, expected_labels) in zip(
        _epoch(resumed, EPOCHS - 1), epochs[-1], strict=True
    ):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])  # and epochs do differ


def _fit(tree: dict, data: PreparedData, mode: str, epochs: int, root: Path, resume: Path | None = None):
    config = parse_config(tree)
    pre = preprocessing_for(config.model.name, config.model.pretrained)
    torch.manual_seed(0)  # the same initial weights every time
    module = CellClassifier(config.model_dump(mode="json"), data.class_counts("train"), pre["mean"], pre["std"])
    datamodule = CellDataModule(
        data.cache, data.split_rows, data.targets, 16, 0, config.seed, eval_batch_size=64, device_cache=mode
    )
    trainer = quiet_trainer(root, max_epochs=epochs, limit_train_batches=3, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*on_after_batch_transfer.*|.*logging interval.*|.*num_workers.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    return module.model.state_dict(), trainer, datamodule


def test_training_on_the_device_path_equals_the_loader_path_and_resumes_exactly(prepared, tmp_path: Path) -> None:
    tree, data = prepared
    by_loader, _, loader_dm = _fit(tree, data, "off", 2, tmp_path)
    _, first, device_dm = _fit(tree, data, "on", 1, tmp_path)
    first.save_checkpoint(tmp_path / "epoch0.ckpt")
    # Stopped after epoch 0 and resumed on the device path: the weights of the uninterrupted loader-path run.
    resumed, _, _ = _fit(tree, data, "on", 2, tmp_path, resume=tmp_path / "epoch0.ckpt")
    assert not loader_dm.data_path.device_resident and device_dm.data_path.device_resident
    for key, value in by_loader.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.parametrize(
    ("mode", "device", "free", "world_size", "resident", "said"),
    [
        ("auto", "cuda", 10_000, 1, True, "fits in 50% of"),
        ("auto", "cuda", 1_000, 1, False, "does not fit in 50% of"),
        ("auto", "cpu", 10_000, 1, False, "on CUDA only"),
        ("on", "cpu", 10_000, 1, True, "fits"),
        ("on", "cpu", 1_000, 1, False, "does not fit"),
        ("on", "cuda", 10_000, 2, False, "data-parallel over 2 processes"),
        ("on", "mps", None, 1, False, "free memory on mps is unknown"),
        ("off", "cuda", 10_000, 1, False, "device_cache is off"),
    ],
)
def test_the_data_path_choice(mode, device, free, world_size, resident, said) -> None:
    path = choose_data_path(3_000, torch.device(device), mode, 0.5, world_size, free)
    assert path.device_resident is resident and said in path.reason
    assert path.describe().startswith("training data: device-resident" if resident else "training data: DataLoader")


def test_setup_logs_its_choice_and_falls_back_to_the_loader_when_the_split_does_not_fit(
    prepared, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, data = prepared
    split_bytes = sum(len(data.split_rows[s]) for s in ("train", "val")) * data.cache.array()[0].nbytes
    caplog.set_level(logging.INFO, logger="blastscan.training")
    monkeypatch.setattr(training_data, "free_memory", lambda device: split_bytes)  # fits in 100%, not in 50%
    small = _datamodule(data, "on")
    assert isinstance(small.train_dataloader(), DataLoader) and isinstance(small.val_dataloader(), DataLoader)
    assert [r.getMessage() for r in caplog.records] == [small.data_path.describe()]
    assert "DataLoader; the split" in caplog.text and "does not fit in 50%" in caplog.text
    caplog.clear()
    monkeypatch.setattr(training_data, "free_memory", lambda device: 4 * split_bytes)
    large = _datamodule(data, "on")
    assert isinstance(large.train_dataloader(), DeviceBatches) and isinstance(large.val_dataloader(), DeviceBatches)
    assert len(caplog.records) == 1 and "device-resident" in caplog.text
    large.teardown("fit")
    assert isinstance(large.train_dataloader(), DataLoader)


def test_channels_last_reaches_the_weights_and_every_batch(prepared, tmp_path: Path) -> None:
    tree, data = prepared
    tree = {**tree, "trainer": {**tree["trainer"], "channels_last": True}}
    seen: list[bool] = []

    class Formats(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(batch[0].is_contiguous(memory_format=torch.channels_last))

    config = parse_config(tree)
    pre = preprocessing_for(config.model.name, config.model.pretrained)
    module = CellClassifier(config.model_dump(mode="json"), data.class_counts("train"), pre["mean"], pre["std"])
    convs = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    datamodule = CellDataModule(data.cache, data.split_rows, data.targets, 16, 0, 0, device_cache="on")
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[Formats()])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*on_after_batch_transfer.*|.*logging interval.*")
        trainer.fit(module, datamodule=datamodule)
    assert seen == [True, True]


def _module(tree: dict, data: PreparedData) -> CellClassifier:
    tree = {**tree, "trainer": {**tree["trainer"], "compile": True}}
    config = parse_config(tree)
    return CellClassifier(config.model_dump(mode="json"), data.class_counts("train"), [0.5] * 3, [0.25] * 3)


def test_a_compile_failure_at_set_up_warns_and_trains_eagerly(prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    tree, data = prepared

    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match=r"trainer\.compile: torch\.compile failed \(RuntimeError: no C\+\+"):
        module = _module(tree, data).eval()
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(module(images), module.model(images))


def test_a_compile_failure_at_the_first_batch_warns_once_and_falls_back(
    prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, data = prepared
    calls: list[int] = []

    def fails_when_called(function, *args, **kwargs):
        def compiled(images):
            calls.append(1)
            raise RuntimeError("BackendCompilerFailed: inductor raised")

        return compiled

    monkeypatch.setattr(torch, "compile", fails_when_called)
    module = _module(tree, data).eval()
    images = torch.rand(2, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="training continues in eager mode"):
        logits = module(images)
    torch.testing.assert_close(logits, module.model(images))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(images)  # eager from now on: no second attempt, no second warning
    assert calls == [1]
