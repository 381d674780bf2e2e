"""Learning-rate schedulers, by the name `optim.scheduler` gives.

Each entry takes the optimiser, `max_epochs` and the monitored metric (`trainer.max_epochs`, `trainer.monitor`) and
returns what Lightning's `configure_optimizers` returns: the optimiser alone ("none") or a dict with the optimiser
and its `lr_scheduler`. A new scheduler is one
function here decorated with `@SCHEDULERS.register(name)`; the config accepts `SCHEDULERS.names()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from blastscan.registry import Registry

#: The schedulers, by name: `build(optimizer, max_epochs=..., monitor=...)` -> configure_optimizers' return value.
SCHEDULERS: Registry[Callable[..., Any]] = Registry("scheduler")


@SCHEDULERS.register("none")
def _constant(optimizer: Optimizer, max_epochs: int, monitor: str) -> Any:
    """A constant learning rate."""
    return optimizer


@SCHEDULERS.register("cosine")
def _cosine(optimizer: Optimizer, max_epochs: int, monitor: str) -> Any:
    """Cosine annealing to 0 over `max_epochs`."""
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}


@SCHEDULERS.register("plateau")
def _plateau(optimizer: Optimizer, max_epochs: int, monitor: str) -> Any:
    """Halve the learning rate after 2 epochs without improvement of `monitor` (val_auroc: higher is better)."""
    mode = "max" if monitor == "val_auroc" else "min"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=2)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor}}
