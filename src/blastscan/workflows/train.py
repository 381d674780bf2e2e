"""`train`: one experiment from config to a self-describing run folder (its layout: `blastscan.runs`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from blastscan.data.sources import source_balanced_weights
from blastscan.errors import ConfigError, TrainingError
from blastscan.imaging.augment import save_augmentation_grid
from blastscan.inference import Predictor
from blastscan.models import preprocessing_for, unfreeze
from blastscan.models.weights import refusal_reason
from blastscan.runs import RunFolder
from blastscan.training.config import TrainConfig
from blastscan.training.data import CellDataModule
from blastscan.training.losses import balanced_sample_weights
from blastscan.training.module import CellClassifier
from blastscan.training.plots import save_training_curves
from blastscan.training.prepare import PreparedData, prepare_data
from blastscan.workflows.in_distribution import fit_ood_profile

#: The file Lightning's CSVLogger writes in its log folder (run/logs/).
_LIGHTNING_METRICS = "metrics.csv"


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


def _sample_weights(config: TrainConfig, data: PreparedData) -> np.ndarray | torch.Tensor | None:
    """Training-row sampling weights: every source equally often when there are several (and every class within
    each with `loss.sampler: balanced`), every class equally often with one source and `balanced`, else None."""
    train_targets = data.targets[data.split_rows["train"]]
    by_class = config.loss.sampler == "balanced"
    if config.data.extra_sources:
        sources = data.manifest.table["dataset"].astype(str).to_numpy()[data.split_rows["train"]]
        return source_balanced_weights(sources, train_targets, by_class)
    return balanced_sample_weights(train_targets) if by_class else None


@rank_zero_only
def _write_run_inputs(run: RunFolder, config: TrainConfig, data: PreparedData, mean: Any, std: Any) -> None:
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
        "cell_focus": config.data.focus().to_dict(),
        "class_counts": {split: data.class_counts(split) for split in ("train", "val", "test")},
    }
    if config.data.extra_sources:
        rows = data.split_rows["train"]
        sources = data.manifest.table["dataset"].astype(str).to_numpy()[rows]
        model_card["sources"] = {str(k): int(v) for k, v in zip(*np.unique(sources, return_counts=True), strict=True)}
    run.write_inputs(config, data.manifest, data.splits, data.audit, model_card, data.stain_state)
    if data.crop_sources is not None:
        run.write_crop_sources(data.crop_sources)


@rank_zero_only
def _write_run_outputs(run: RunFolder, module: CellClassifier, best_path: str, log_dir: Path) -> None:
    if best_path:
        # Our own checkpoint, but still loaded without unpickling code.
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    run.write_weights(module.model)
    # The out-of-distribution flag of every later prediction: fitted now, on the weights just written.
    fit_ood_profile(run, Predictor.from_run(run, backend="torch", batch_size=128))
    metrics_file = log_dir / _LIGHTNING_METRICS
    if metrics_file.is_file():
        save_training_curves(metrics_file, run.metrics_path, run.curves_path)


def train(
    config: TrainConfig,
    resume: bool = False,
    progress_bar: bool = True,
    extra_callbacks: list[Callback] | None = None,
    run_dir: str | Path | None = None,
) -> TrainResult:
    """Train `config` into `run_dir` (default `runs_dir/name`); with `resume`, continue from that folder's last
    checkpoint. Resuming writes into that folder and nowhere else, and keeps the epochs logged before."""
    run = RunFolder(run_dir if run_dir is not None else run_dir_for(config))
    run_dir = run.path
    last = run.last_checkpoint
    if resume and not last.is_file():
        raise ConfigError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt); start it without --resume")
    if not resume and last.exists():
        raise ConfigError(f"{run_dir}: a run of this name exists; resume it with --resume, or pick another name")
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = prepare_data(config)
    pre = preprocessing_for(config.model.name, config.model.pretrained)
    mean, std = pre["mean"], pre["std"]
    _write_run_inputs(run, config, data, mean, std)

    counts = data.class_counts("train")
    sample_weights = _sample_weights(config, data)
    datamodule = CellDataModule(
        data.cache,
        data.split_rows,
        data.targets,
        batch_size=config.trainer.batch_size,
        num_workers=config.trainer.num_workers,
        seed=config.seed,
        sample_weights=sample_weights,
        eval_batch_size=config.trainer.evaluation_batch_size(),
        device_cache=config.data.device_cache,
        device_cache_share=config.data.device_cache_share,
    )
    module = CellClassifier(config.model_dump(mode="json"), counts, mean, std)
    _save_augmentations(run, data, module, config.seed)

    trainer_cfg = config.trainer
    mode = "max" if trainer_cfg.monitor == "val_auroc" else "min"
    checkpoint = ModelCheckpoint(
        dirpath=run.checkpoints_dir,
        filename="best",
        monitor=trainer_cfg.monitor,
        mode=mode,
        save_top_k=1,
        enable_version_counter=False,
    )
    # Lightning 2.6 refreshes `save_last` only on epochs that improve the monitor; resuming needs every epoch,
    # so a second, unmonitored checkpoint overwrites last.ckpt at each epoch end.
    latest = ModelCheckpoint(dirpath=run.checkpoints_dir, filename="last", save_top_k=1, enable_version_counter=False)
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
    csv_logger = CSVLogger(run_dir, name=RunFolder.LOGS, version="")
    # Lightning's CSVLogger deletes its metrics file when it starts; a resumed run keeps the epochs before it.
    earlier_log = _read_log(Path(csv_logger.log_dir)) if resume else None
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
        logger=[csv_logger, TensorBoardLogger(run_dir, name=RunFolder.TENSORBOARD, version="")],
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
    if earlier_log is not None:
        _merge_log(Path(csv_logger.log_dir), earlier_log)
    best_path = checkpoint.best_model_path
    if best_path and Path(best_path).parent.resolve() != run.checkpoints_dir.resolve():
        # A moved or copied run: the checkpoint remembers the folder it was first written in. Read this run's own.
        best_path = str(run.checkpoints_dir / Path(best_path).name)
    _write_run_outputs(run, module, best_path, Path(csv_logger.log_dir))
    stopper = next(c for c in callbacks if isinstance(c, EarlyStopping))
    best = checkpoint.best_model_score
    return TrainResult(
        run_dir=run_dir,
        epochs=trainer.current_epoch,
        best_epoch=_best_epoch(best_path),
        best_score=float(best) if best is not None else None,
        monitor=trainer_cfg.monitor,
        stopped_early=stopper.stopped_epoch > 0,
        world_size=trainer.world_size,
    )


def _read_log(log_dir: Path) -> pd.DataFrame | None:
    path = log_dir / _LIGHTNING_METRICS
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 0 else None


@rank_zero_only
def _merge_log(log_dir: Path, earlier: pd.DataFrame) -> None:
    """Put back the rows logged before a resume: those of epochs before the first epoch the resumed run logged
    (rows of an epoch cut short by the interruption are dropped; the resumed run repeats that epoch)."""
    path = log_dir / _LIGHTNING_METRICS
    later = _read_log(log_dir)
    if later is None or "epoch" not in later or "epoch" not in earlier:
        merged = earlier if later is None else later
    else:
        merged = pd.concat([earlier[earlier["epoch"] < later["epoch"].min()], later], ignore_index=True)
    merged.to_csv(path, index=False)


def _check_checkpoint(path: Path) -> None:
    """Fail with a clear message on a damaged or foreign checkpoint, before Lightning tries to use it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / corrupt / pickled-code files
        raise TrainingError(
            f"{path}: the checkpoint cannot be read ({type(exc).__name__}: {refusal_reason(exc)}); delete it to start "
            "the run over, or copy checkpoints/best.ckpt to last.ckpt to resume from the best epoch"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
        raise TrainingError(f"{path}: not a blastscan training checkpoint (no state_dict/epoch)")


def _best_epoch(best_path: str) -> int | None:
    if not best_path:
        return None
    return int(torch.load(best_path, map_location="cpu", weights_only=True)["epoch"])


@rank_zero_only
def _save_augmentations(run: RunFolder, data: PreparedData, module: CellClassifier, seed: int) -> None:
    rows = data.split_rows["train"][:4]
    images = torch.from_numpy(np.stack([np.asarray(data.cache[int(r)]) for r in rows])).permute(0, 3, 1, 2)
    save_augmentation_grid(run.augmentations_path, images, module.augment, seed=seed)
