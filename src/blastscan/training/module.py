"""The model's maths for training: a classifier, its loss, its optimiser, its metrics (a LightningModule).

Throughput options from the trainer config: `channels_last` (weights and batches in that memory format) and
`compile` (the network's forward through `torch.compile`; a compilation failure, at set-up or at the first batch,
warns once and falls back to eager mode instead of stopping the run).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from blastscan.errors import TrainingError
from blastscan.imaging.augment import AugmentConfig, BatchAugment
from blastscan.models import create, freeze_backbone
from blastscan.training.config import TrainConfig
from blastscan.training.losses import make_loss
from blastscan.training.schedulers import SCHEDULERS


class CellClassifier(L.LightningModule):
    """A two-class cell classifier (class 1 = the config's positive label) trained with Adam."""

    def __init__(
        self,
        config: dict[str, Any],
        class_counts: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = TrainConfig.model_validate(config)
        model_cfg = self.config.model
        self.model = create(
            model_cfg.name,
            pretrained=model_cfg.pretrained,
            num_classes=2,
            drop_rate=model_cfg.drop_rate,
            **model_cfg.options,
        )
        if model_cfg.freeze_backbone:
            freeze_backbone(self.model)
        self.channels_last = self.config.trainer.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # A compiled *function*, not a module attribute: the state dict's keys stay the eager model's.
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        if self.config.trainer.compile:
            try:
                self._compiled = torch.compile(self.model.forward)
            except Exception as exc:  # torch.compile raises many types (missing compiler, unsupported platform)
                self._compile_failed(exc)
        self.loss = make_loss(self.config.loss.name, list(class_counts), **self.config.loss.params)
        self.augment = BatchAugment(AugmentConfig.model_validate(self.config.augment.model_dump()), mean, std)
        self.val_auroc = BinaryAUROC()
        self.val_accuracy = BinaryAccuracy()
        self.train_accuracy = BinaryAccuracy()
        self._epoch_start = 0.0
        self._epoch_images = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for normalised float images."""
        if self._compiled is not None:
            try:
                return self._compiled(images)
            except Exception as exc:  # compilation happens at the first call; a genuine error re-raises in eager
                self._compile_failed(exc)
        return self.model(images)

    def _compile_failed(self, exc: Exception) -> None:
        self._compiled = None
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        warnings.warn(
            f"trainer.compile: torch.compile failed ({type(exc).__name__}: {first_line}); training continues in "
            "eager mode (set trainer.compile: false to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        generator = None
        if training:
            # Seeded by (seed, global step, rank): a resumed run draws exactly the augmentations it would have.
            seed = self.config.seed * 1_000_003 + self.global_step * 101 + self.global_rank
            # A CPU generator: the same draws on any device, and no device-side generator per step.
            generator = torch.Generator().manual_seed(seed)
        return self.prepare_batch(images, generator, train=training), labels

    def prepare_batch(
        self, images: torch.Tensor, generator: torch.Generator | None = None, train: bool = True
    ) -> torch.Tensor:
        """A uint8 (B, 3, H, W) batch on the device -> the network's input: augmented (when `train`), normalised,
        in channels-last memory format when the config asks for it."""
        images = self.augment(images, generator=generator, train=train)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout draws from the global generator, which other code (loader iterators) also touches in an order
        # that differs after a resume: reseed it per step so a resumed run replays exactly the same dropout.
        torch.manual_seed(self.config.seed * 7919 + self.global_step * 31 + self.global_rank)

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_images = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.loss(logits, labels)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower optim.lr or set optim.grad_clip, and check the images"
            )
        self.train_accuracy(logits.argmax(dim=1), labels)
        self._epoch_images += len(labels)
        elapsed = time.perf_counter() - self._epoch_start
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True
        )
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        # Shown live in the progress bar; the epoch's figure goes to the logs in `on_train_epoch_end`.
        self.log("img/s", self._epoch_images / max(elapsed, 1e-9), on_step=True, prog_bar=True, logger=False)
        return loss

    def on_train_epoch_end(self) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        # Per process (averaged over processes when data-parallel).
        self.log("images_per_s", self._epoch_images / max(elapsed, 1e-9), on_epoch=True, sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        probability = logits.softmax(dim=1)[:, 1]
        # update(), not forward(): a per-batch AUROC is meaningless (and warns) when a batch holds one class.
        self.val_auroc.update(probability, labels)
        self.val_accuracy.update(probability, labels)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True)
        self.log("val_auroc", self.val_auroc, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("val_acc", self.val_accuracy, on_epoch=True, batch_size=len(labels))

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch
        return self(images).softmax(dim=1)[:, 1]

    def configure_optimizers(self) -> Any:
        optim = self.config.optim
        lr = self.config.learning_rate(self.trainer.world_size)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=optim.weight_decay)
        trainer = self.config.trainer
        return SCHEDULERS.get(optim.scheduler)(optimizer, max_epochs=trainer.max_epochs, monitor=trainer.monitor)
