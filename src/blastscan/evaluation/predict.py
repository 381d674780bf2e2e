"""Running a trained run's model over images: logits for rows of an image cache, with optional TTA."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from blastscan.data.cache import ImageCache
from blastscan.data.manifest import Manifest
from blastscan.data.stain import stain_method_from_dict
from blastscan.data.transforms import AugmentConfig, BatchAugment
from blastscan.errors import ConfigError
from blastscan.models import create


@dataclass
class RunModel:
    """A trained run's network in eval mode, with what its inputs must look like."""

    run_dir: Path
    model: nn.Module
    card: dict[str, Any]
    normalize: BatchAugment
    stain_state: dict[str, Any] | None

    @property
    def image_size(self) -> int:
        return int(self.card["image_size"])


def load_run_model(run_dir: str | Path) -> RunModel:
    """Rebuild the network of `run_dir` from model.json and best.safetensors (no pickle is ever loaded)."""
    run_dir = Path(run_dir)
    card_path, weights_path = run_dir / "model.json", run_dir / "best.safetensors"
    for path in (card_path, weights_path):
        if not path.is_file():
            raise ConfigError(f"{run_dir}: missing {path.name}; is this a finished `blastscan train` run folder?")
    card = json.loads(card_path.read_text())
    model = create(card["name"], pretrained=None, num_classes=int(card["num_classes"]), **card.get("options", {}))
    try:
        model.load_state_dict(load_file(weights_path))
    except RuntimeError as exc:
        raise ConfigError(f"{weights_path}: the weights do not fit {card['name']} ({str(exc)[:300]})") from None
    model.eval()
    stain_path = run_dir / "stain.json"
    stain_state = json.loads(stain_path.read_text()) if stain_path.is_file() else None
    normalize = BatchAugment(AugmentConfig(enabled=False), card["mean"], card["std"])
    return RunModel(run_dir, model, card, normalize, stain_state)


def cache_for(run_model: RunModel, manifest: Manifest, cache_dir: str | Path | None = None) -> ImageCache:
    """The image cache a run's model reads: its size, and its stain normalisation when it was trained with one."""
    if run_model.stain_state is None:
        cache = ImageCache(manifest, size=run_model.image_size, cache_dir=cache_dir)
    else:
        normalizer = stain_method_from_dict(run_model.stain_state)
        cache = ImageCache(
            manifest,
            size=run_model.image_size,
            cache_dir=cache_dir,
            transform=normalizer.normalize,
            transform_key=run_model.stain_state,
        )
    cache.build()
    return cache


def _dihedral(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/quarter-turns of a (B,3,H,W) batch: cells have no orientation, so each is an equal view."""
    views = []
    for flipped in (images, images.flip(-1)):
        views.extend(torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4))
    return views


@torch.inference_mode()
def predict_logits(
    run_model: RunModel, cache: ImageCache, rows: np.ndarray, batch_size: int = 64, tta: bool = False
) -> np.ndarray:
    """(N, 2) logits for cache rows `rows`; with `tta`, the mean logits over the 8 dihedral views."""
    outputs = []
    array = cache.array()
    for start in range(0, len(rows), batch_size):
        chunk = np.asarray(rows[start : start + batch_size])
        images = torch.from_numpy(np.ascontiguousarray(array[chunk])).permute(0, 3, 1, 2)
        batch = run_model.normalize(images, train=False)
        if tta:
            logits = torch.stack([run_model.model(view) for view in _dihedral(batch)]).mean(dim=0)
        else:
            logits = run_model.model(batch)
        outputs.append(logits.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 2), dtype=np.float32)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Class-1 probabilities from (N, 2) logits."""
    return torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(dim=1)[:, 1].numpy()
