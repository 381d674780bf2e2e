"""`train`: one experiment from config to a self-describing run folder.

runs/<name>/
  config.yaml           the resolved config (what `--resume` reads back)
  manifest.csv, splits.csv, audit.json, stain.json (when stain normalisation is on)
  checkpoints/last.ckpt the latest epoch (Lightning writes it through a temp file, so a kill never leaves half a file)
  checkpoints/best.ckpt the best epoch by the monitored metric
  best.safetensors      the best model's weights alone, for evaluation and deployment
  model.json            how to rebuild the model and feed it (name, preprocessing, classes)
  metrics.csv           one row per epoch; logs/ (CSV logger) and tensorboard/
  training_curves.png, augmentations.png
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import save_file

from blastscan.data.manifest import write_manifest
from blastscan.data.splits import write_splits
from blastscan.data.transforms import save_augmentation_grid
from blastscan.errors import ConfigError, TrainingError
from blastscan.models import preprocessing_for, unfreeze
from blastscan.training.config import TrainConfig, apply_overrides, parse_config
from blastscan.training.data import CellDataModule
from blastscan.training.losses import balanced_sample_weights
from blastscan.training.module import CellClassifier
from blastscan.training.plots import save_training_curves
from blastscan.training.prepare import PreparedData, prepare_data


@dataclass
class TrainResult:
    """Where the run is and how it ended."""

    run_dir: Path
    epochs: int
    best_epoch: int | None
    best_score: float | None
    monitor: str
    stopped_early: bool
    world_size: int = 1


class StagedUnfreeze(Callback):
    """Thaws the backbone at the start of `epoch` (the head alone trains before it)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            unfreeze(pl_module.model)


def run_dir_for(config: TrainConfig) -> Path:
    """`<runs_dir>/<name>`."""
    return Path(config.runs_dir) / config.name


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The resolved config a run folder was started with (for `--resume`), with optional overrides."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml); start it with `blastscan train --config`")
    tree = yaml.safe_load(path.read_text())
    return parse_config(apply_overrides(tree, overrides or []), source=str(path))


@rank_zero_only
def _write_run_inputs(run_dir: Path, config: TrainConfig, data: PreparedData, mean: Any, std: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    write_manifest(data.manifest, run_dir / "manifest.csv")
    write_splits(data.splits, run_dir / "splits.csv")
    (run_dir / "audit.json").write_text(data.audit.model_dump_json(indent=2))
    if data.stain_state is not None:
        (run_dir / "stain.json").write_text(json.dumps(data.stain_state, indent=2))
    model_card = {
        "name": config.model.name,
        "pretrained": config.model.pretrained,
        "options": config.model.options,
        "num_classes": 2,
        "classes": [f"not {config.data.positive_label}", config.data.positive_label],
        "image_size": config.data.image_size,
        "mean": list(mean),
        "std": list(std),
        "stain_normalization": config.data.stain_normalization,
        "class_counts": {split: data.class_counts(split) for split in ("train", "val", "test")},
    }
    (run_dir / "model.json").write_text(json.dumps(model_card, indent=2))


@rank_zero_only
def _write_run_outputs(run_dir: Path, module: CellClassifier, best_path: str, log_dir: Path) -> None:
    if best_path:
        # Our own checkpoint, but still loaded without unpickling code.
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    weights = {k: v.detach().contiguous().cpu() for k, v in module.model.state_dict().items()}
    save_file(weights, str(run_dir / "best.safetensors"))
    metrics_file = log_dir / "metrics.csv"
    if metrics_file.is_file():
        save_training_curves(metrics_file, run_dir / "metrics.csv", run_dir / "training_curves.png")


def train(
    config: TrainConfig,
    resume: bool = False,
    progress_bar: bool = True,
    extra_callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Train `config` into `runs_dir/name`; with `resume`, continue from that folder's last checkpoint."""
    run_dir = run_dir_for(config)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise ConfigError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt); start it without --resume")
    if not resume and last.exists():
        raise ConfigError(f"{run_dir}: a run of this name exists; resume it with --resume, or pick another name")
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = prepare_data(config)
    pre = preprocessing_for(config.model.name, config.model.pretrained)
    mean, std = pre["mean"], pre["std"]
    _write_run_inputs(run_dir, config, data, mean, std)

    counts = data.class_counts("train")
    train_targets = data.targets[data.split_rows["train"]]
    sample_weights = balanced_sample_weights(train_targets) if config.loss.sampler == "balanced" else None
    datamodule = CellDataModule(
        data.cache,
        data.split_rows,
        data.targets,
        batch_size=config.trainer.batch_size,
        num_workers=config.trainer.num_workers,
        seed=config.seed,
        sample_weights=sample_weights,
    )
    module = CellClassifier(config.model_dump(mode="json"), counts, mean, std)
    _save_augmentations(run_dir, data, module, config.seed)

    trainer_cfg = config.trainer
    mode = "max" if trainer_cfg.monitor == "val_auroc" else "min"
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=trainer_cfg.monitor,
        mode=mode,
        save_top_k=1,
        enable_version_counter=False,
    )
    # Lightning 2.6 refreshes `save_last` only on epochs that improve the monitor; resuming needs every epoch,
    # so a second, unmonitored checkpoint overwrites last.ckpt at each epoch end.
    latest = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
    )
    callbacks: list[Callback] = [
        checkpoint,
        latest,
        EarlyStopping(monitor=trainer_cfg.monitor, mode=mode, patience=trainer_cfg.patience),
    ]
    if config.model.freeze_backbone and config.model.unfreeze_epoch is not None:
        callbacks.append(StagedUnfreeze(config.model.unfreeze_epoch))
    if progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    callbacks.extend(extra_callbacks or [])
    csv_logger = CSVLogger(run_dir, name="logs", version="")
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=trainer_cfg.max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        gradient_clip_val=config.optim.grad_clip,
        limit_train_batches=trainer_cfg.limit_train_batches,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        callbacks=callbacks,
        logger=[csv_logger, TensorBoardLogger(run_dir, name="tensorboard", version="")],
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if resume:
        _check_checkpoint(last)
    with warnings.catch_warnings():
        # Both are deliberate here: augmentation lives in the module's on_after_batch_transfer (it runs on the
        # device), and small datasets have fewer batches per epoch than the logging interval.
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if resume else None, weights_only=True)
    _write_run_outputs(run_dir, module, checkpoint.best_model_path, Path(csv_logger.log_dir))
    stopper = next(c for c in callbacks if isinstance(c, EarlyStopping))
    best = checkpoint.best_model_score
    return TrainResult(
        run_dir=run_dir,
        epochs=trainer.current_epoch,
        best_epoch=_best_epoch(checkpoint.best_model_path),
        best_score=float(best) if best is not None else None,
        monitor=trainer_cfg.monitor,
        stopped_early=stopper.stopped_epoch > 0,
        world_size=trainer.world_size,
    )


def _check_checkpoint(path: Path) -> None:
    """Fail with a clear message on a damaged or foreign checkpoint, before Lightning tries to use it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / corrupt / pickled-code files
        raise TrainingError(
            f"{path}: the checkpoint cannot be read ({type(exc).__name__}: {str(exc)[:200]}); delete it to start "
            "the run over, or copy checkpoints/best.ckpt to last.ckpt to resume from the best epoch"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
        raise TrainingError(f"{path}: not a blastscan training checkpoint (no state_dict/epoch)")


def _best_epoch(best_path: str) -> int | None:
    if not best_path:
        return None
    return int(torch.load(best_path, map_location="cpu", weights_only=True)["epoch"])


@rank_zero_only
def _save_augmentations(run_dir: Path, data: PreparedData, module: CellClassifier, seed: int) -> None:
    rows = data.split_rows["train"][:4]
    images = torch.from_numpy(np.stack([np.asarray(data.cache[int(r)]) for r in rows])).permute(0, 3, 1, 2)
    save_augmentation_grid(run_dir / "augmentations.png", images, module.augment, seed=seed)
