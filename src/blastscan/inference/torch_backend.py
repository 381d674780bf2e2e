"""The PyTorch backend: `TorchPredictor` runs a run's network eagerly on CUDA, Apple MPS or the CPU.

Hardware: `device="auto"` picks CUDA, then Apple MPS, then the CPU. On CUDA the model runs under autocast (bf16
where the GPU supports it, else fp16) in `channels_last`, with uint8 batches copied from pinned memory and
normalised on the GPU; on the CPU it runs in float32, `channels_last`, under `torch.inference_mode`. Decoding,
batching and streaming are the shared `Predictor`'s. This is the backend for GPUs, for explanations (Grad-CAM needs
the module) and for pooled features (`embed`); the CPU default is ONNX Runtime (`onnx_backend`).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from blastscan.errors import ConfigError, DatasetError
from blastscan.imaging.augment import channel_tensor, normalize_batch
from blastscan.imaging.preprocess import ImageSource
from blastscan.inference.core import DEVICE_CHOICES, InputSpec, Predictor, raise_failures, usable_cpus
from blastscan.runs import RunFolder


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> CUDA if visible, else MPS, else CPU; an explicit device that is not there raises ConfigError."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a device; choose one of {', '.join(DEVICE_CHOICES)}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device auto or cpu")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: Apple MPS is not available here; use --device auto or cpu")
    return chosen


def has_feature_head(model: nn.Module) -> bool:
    """True when `model` splits like a timm network: forward_intermediates (every stage's map) -> forward_head."""
    return all(callable(getattr(model, name, None)) for name in ("forward_intermediates", "forward_head"))


def logits_and_block_statistics(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and, per network stage, each channel's spatial mean and standard deviation (N, 2 x channels), in
    one pass (timm's `forward_intermediates` then `forward_head`).

    These statistics are what the in-distribution profile reads (`blastscan.inference.ood`): the early stages carry
    stain, texture and magnification, which the classifier's last layer has learned to ignore."""
    final, maps = model.forward_intermediates(batch)
    statistics = [torch.cat([m.mean(dim=(2, 3)), m.std(dim=(2, 3), correction=0)], dim=1) for m in maps]
    return model.forward_head(final), statistics


def pooled_features(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(N, D) pooled penultimate features: timm's `forward_head(forward_features(x), pre_logits=True)`; the
    model's `get_classifier()` maps them to its logits."""
    return model.forward_head(model.forward_features(batch), pre_logits=True).flatten(1)


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/quarter-turns of a (B, 3, H, W) batch: cells have no orientation, so each is an equal view."""
    views = []
    for flipped in (images, images.flip(-1)):
        views.extend(torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4))
    return views


class TorchPredictor(Predictor):
    """A torch network in eval mode on a device, with the preprocessing it was trained with.

    Besides the shared `Predictor` API: `model` (the nn.Module, for CAMs), `to_input` / `forward` on normalised
    tensors, and `embed(images)` -> (N, D) pooled penultimate features.
    """

    backend = "torch"

    def __init__(
        self,
        model: nn.Module,
        spec: InputSpec,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        tta: bool = False,
        precision: str = "auto",
        workers: int = 2,
        threads: int | None = None,
    ) -> None:
        """`precision`: "auto" (bf16/fp16 autocast on CUDA, float32 elsewhere) or "fp32". `threads`: CPU threads
        for the forward pass (default: torch's, capped at the cores this process may use)."""
        if precision not in ("auto", "fp32"):
            raise ConfigError(f"precision {precision!r}: choose auto or fp32")
        super().__init__(spec, batch_size, tta, workers)
        self.device = resolve_device(device)
        self._mean = channel_tensor(spec.mean, self.device)
        self._std = channel_tensor(spec.std, self.device)
        self.autocast_dtype: torch.dtype | None = None
        if self.device.type == "cuda" and precision == "auto":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.device.type == "cpu":
            wanted = threads if threads is not None else min(torch.get_num_threads(), usable_cpus())
            if wanted != torch.get_num_threads():
                torch.set_num_threads(max(1, int(wanted)))
        # NHWC suits oneDNN's CPU convolutions and cuDNN's tensor cores; batches arrive NHWC from the decoder anyway.
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)

    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) prepared uint8 images (or float 0-255) -> the normalised (N, 3, S, S) batch on the device."""
        batch = torch.as_tensor(images)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise DatasetError(f"expected a batch of (N, H, W, 3) images, got shape {tuple(batch.shape)}")
        batch = batch.permute(0, 3, 1, 2)  # a channels-last view: no copy
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return normalize_batch(batch, self._mean, self._std)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------------------------------- the network

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Logits of a normalised batch; with TTA, the mean logits over the 8 dihedral views."""
        if self.tta if tta is None else tta:
            return self.forward_plain_and_tta(batch)[1]
        with self._autocast():
            return self.model(batch).float()

    @torch.inference_mode()
    def forward_plain_and_tta(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain logits, TTA logits) of a normalised batch in 8 forward passes: the first view is the batch itself."""
        with self._autocast():
            views = torch.stack([self.model(view) for view in dihedral_views(batch)]).float()
        return views[0], views.mean(dim=0)

    @torch.inference_mode()
    def forward_with_statistics(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(logits, per-stage feature statistics) of a normalised batch in one pass (`logits_and_block_statistics`);
        None for a network without timm's forward_intermediates / forward_head."""
        if not has_feature_head(self.model):
            return self.forward(batch, tta=False), None
        with self._autocast():
            logits, statistics = logits_and_block_statistics(self.model, batch)
        return logits.float(), [block.float() for block in statistics]

    def outputs_of_batch(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """(n, 2) float32 logits and the per-stage feature statistics of one batch of prepared uint8 images."""
        logits, statistics = self.forward_with_statistics(self.to_input(images))
        return logits.cpu().numpy(), None if statistics is None else [block.cpu().numpy() for block in statistics]

    def logits_of_batch(self, images: np.ndarray) -> np.ndarray:
        """(n, 2) float32 logits of one batch of prepared uint8 images."""
        return self.forward(self.to_input(images), tta=False).cpu().numpy()

    def dihedral_logits_of_batch(self, images: np.ndarray) -> np.ndarray:
        """(8, n, 2) logits of the 8 dihedral views of one prepared batch, the views made on the device."""
        batch = self.to_input(images)
        with torch.inference_mode(), self._autocast():
            views = torch.stack([self.model(view) for view in dihedral_views(batch)]).float()
        return views.cpu().numpy()

    def plain_and_tta_of_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(plain, TTA) logits of one prepared batch, the 8 views made on the device."""
        plain, tta = self.forward_plain_and_tta(self.to_input(images))
        return plain.cpu().numpy(), tta.cpu().numpy()

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features of a normalised batch (timm's `forward_head(..., pre_logits=True)`)."""
        for method in ("forward_features", "forward_head"):
            if not callable(getattr(self.model, method, None)):
                raise ConfigError(f"{type(self.model).__name__} has no {method}(); pooled features cannot be read")
        with self._autocast():
            features = pooled_features(self.model, batch)
        return features.float()

    def embed_prepared(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, D) pooled features of prepared images (uint8, or float 0-255), in batches."""
        outputs = [
            self.embed_batch(self.to_input(images[start : start + self.batch_size])).cpu().numpy()
            for start in range(0, len(images), self.batch_size)
        ]
        if not outputs:
            return np.zeros((0, int(getattr(self.model, "num_features", 0))), dtype=np.float32)
        return np.concatenate(outputs)

    def embed(self, images: Iterable[ImageSource]) -> np.ndarray:
        """(N, D) pooled penultimate features of images (paths, arrays or PIL images)."""
        outputs = []
        for _, prepared, failures, _ in self.prepared_batches(images):
            raise_failures(failures)
            outputs.append(self.embed_prepared(prepared))
        return np.concatenate(outputs) if outputs else self.embed_prepared(np.zeros((0, 1, 1, 3), dtype=np.uint8))


def torch_predictor(run: RunFolder, device: str | torch.device = "auto", **options: Any) -> TorchPredictor:
    """The TorchPredictor of a run folder: its network rebuilt from model.json and best.safetensors."""
    return TorchPredictor(run.load_model(), InputSpec.of_run(run), device=device, **options)
