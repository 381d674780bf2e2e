"""`Predictor`: load a trained run and score images, fast, on whatever hardware is there.

Every command that runs a trained model goes through here: `predict`, `evaluate`, `explain`, `audit-shortcuts`,
the CNN embeddings of `baselines`, and `crossval` / `transfer` through `evaluate`. Images are prepared exactly as
in training (`blastscan.imaging.preprocess`: resize, the run's stain normalisation, then `(x / 255 - mean) / std`).

Hardware: `device="auto"` picks CUDA, then Apple MPS, then the CPU. On CUDA the model runs under autocast (bf16
where the GPU supports it, else fp16) in `channels_last`, with uint8 batches copied from pinned memory and
normalised on the GPU; on the CPU it runs in float32, `channels_last`, under `torch.inference_mode`. Files are
decoded by a small thread pool one batch ahead of the model, so decoding overlaps the forward pass, and memory
stays bounded by a few batches however many images stream through.

`backend` names how the network runs; "torch" is the one built in. The registry `BACKENDS` is where another
runtime (ONNX Runtime, for deployment) plugs in without any caller changing.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from blastscan.data.cache import ImageCache
from blastscan.data.manifest import Manifest
from blastscan.errors import BlastscanError, ConfigError, DatasetError
from blastscan.imaging.preprocess import (
    ImageSource,
    channel_tensor,
    normalize_batch,
    prepare_image,
    prepared_cache,
)
from blastscan.imaging.stain import stain_method_from_dict
from blastscan.registry import Registry
from blastscan.runs import FOR_INFERENCE, RunFolder

#: Inference backends by name: each is a callable (run, device=..., **options) -> Predictor.
BACKENDS: Registry[Callable[..., Predictor]] = Registry("inference backend")

#: Devices `--device` accepts besides an explicit torch device string such as "cuda:1".
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


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


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


@dataclass(frozen=True)
class InputSpec:
    """What a network expects: square side, per-channel mean and std (on 0-1 pixels), and stain normalisation."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stain_state: dict[str, Any] | None = None

    @classmethod
    def of_run(cls, run: RunFolder) -> InputSpec:
        """The spec in a run's model card and stain state."""
        card = run.model_card()
        try:
            return cls(int(card["image_size"]), tuple(card["mean"]), tuple(card["std"]), run.stain_state())
        except KeyError as exc:
            raise ConfigError(f"{run.model_card_path}: no {exc} field; the model card is incomplete") from None


@dataclass
class ScoredBatch:
    """One streamed batch: the sources that were read with their logits, and those that could not be read."""

    sources: list[Any]
    logits: np.ndarray
    failures: list[tuple[Any, str]] = field(default_factory=list)

    @property
    def probabilities(self) -> np.ndarray:
        """Class-1 probabilities of `logits`."""
        return probabilities(self.logits)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Class-1 probabilities from (N, 2) logits (softmax in float64)."""
    return torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(dim=1)[:, 1].numpy()


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/quarter-turns of a (B, 3, H, W) batch: cells have no orientation, so each is an equal view."""
    views = []
    for flipped in (images, images.flip(-1)):
        views.extend(torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4))
    return views


def _raise_failures(failures: list[tuple[Any, str]]) -> None:
    """For callers that want every image scored: the first reasons as one DatasetError."""
    if failures:
        raise DatasetError("; ".join(reason for _, reason in failures[:5]))


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class Predictor:
    """A network in eval mode on a device, with the preprocessing it was trained with.

    `predict(images)` -> (N,) class-1 probabilities and `embed(images)` -> (N, D) pooled features take any
    iterable of paths, (H, W, 3) uint8 arrays or PIL images; `stream(images)` yields `ScoredBatch`es and lists
    unreadable files instead of raising. The `*_prepared` methods take images already prepared (an image cache's
    rows: resized and stain-normalised uint8).
    """

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
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if precision not in ("auto", "fp32"):
            raise ConfigError(f"precision {precision!r}: choose auto or fp32")
        self.spec = spec
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.workers = max(1, int(workers))
        self.stain = stain_method_from_dict(spec.stain_state) if spec.stain_state is not None else None
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

    @classmethod
    def from_run(
        cls, run: str | Path | RunFolder, device: str | torch.device = "auto", backend: str = "torch", **options: Any
    ) -> Predictor:
        """The predictor of a trained run folder (model.json + best.safetensors + stain.json), on `device`."""
        return BACKENDS.get(backend)(RunFolder.open(run, need=FOR_INFERENCE), device=device, **options)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    # ------------------------------------------------------------------------------------------- preparing

    def prepare(self, source: ImageSource) -> np.ndarray:
        """One image as the network sees it before normalisation: (S, S, 3) uint8, stain-normalised."""
        return prepare_image(source, self.image_size, self.stain)

    def image_cache(self, manifest: Manifest, cache_dir: str | Path | None = None, workers: int = 2) -> ImageCache:
        """The (built) image cache of `manifest`'s images prepared for this network: its size, its stain."""
        return prepared_cache(manifest, self.image_size, self.stain, self.spec.stain_state, cache_dir, workers)

    def _row_batches(self, cache: ImageCache, rows: np.ndarray) -> Iterator[torch.Tensor]:
        """Normalised input batches of cache rows `rows`, read from the memory map one batch at a time."""
        array = cache.array()
        for start in range(0, len(rows), self.batch_size):
            yield self.to_input(np.ascontiguousarray(array[np.asarray(rows[start : start + self.batch_size])]))

    def logits_of_rows(self, cache: ImageCache, rows: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """(N, 2) logits of cache rows `rows`, read one batch at a time."""
        outputs = [self.forward(batch, tta).cpu().numpy() for batch in self._row_batches(cache, rows)]
        return np.concatenate(outputs) if outputs else np.zeros((0, 2), dtype=np.float32)

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

    def logits_of_rows_with_tta(self, cache: ImageCache, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(plain, TTA) (N, 2) logits of cache rows `rows`, both from one pass over the 8 views."""
        plain, tta = [np.zeros((0, 2), dtype=np.float32)], [np.zeros((0, 2), dtype=np.float32)]
        for batch in self._row_batches(cache, rows):
            one, mean = self.forward_plain_and_tta(batch)
            plain.append(one.cpu().numpy())
            tta.append(mean.cpu().numpy())
        return np.concatenate(plain), np.concatenate(tta)

    def logits_prepared(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """(N, 2) logits of (N, S, S, 3) prepared uint8 images, in batches."""
        outputs = [
            self.forward(self.to_input(np.ascontiguousarray(images[start : start + self.batch_size])), tta)
            .cpu()
            .numpy()
            for start in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(outputs) if outputs else np.zeros((0, 2), dtype=np.float32)

    def predict_prepared(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """(N,) class-1 probabilities of prepared images."""
        return probabilities(self.logits_prepared(images, tta))

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features of a normalised batch (timm's `forward_head(..., pre_logits=True)`)."""
        for method in ("forward_features", "forward_head"):
            if not callable(getattr(self.model, method, None)):
                raise ConfigError(f"{type(self.model).__name__} has no {method}(); pooled features cannot be read")
        with self._autocast():
            features = self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
        return features.flatten(1).float()

    def embed_prepared(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, D) pooled features of prepared images (uint8, or float 0-255), in batches."""
        outputs = [
            self.embed_batch(self.to_input(images[start : start + self.batch_size])).cpu().numpy()
            for start in range(0, len(images), self.batch_size)
        ]
        if not outputs:
            return np.zeros((0, int(getattr(self.model, "num_features", 0))), dtype=np.float32)
        return np.concatenate(outputs)

    # --------------------------------------------------------------------------------------------- streaming

    def _read(self, source: Any) -> np.ndarray | str:
        """The prepared image, or why it could not be read."""
        try:
            return self.prepare(source)
        except BlastscanError as exc:
            # The reader's message ends with advice for `data scan` ("; ... --skip-bad"); predict skips anyway.
            return str(exc).rsplit("; ", 1)[0]
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return f"{source}: not a readable image ({type(exc).__name__}: {exc})"

    def prepared_batches(self, sources: Iterable[Any]) -> Iterator[tuple[list[Any], np.ndarray, list[tuple]]]:
        """(sources read, their (n, S, S, 3) prepared images, [(source, reason) unreadable]) per batch.

        Decoding runs on `workers` threads one batch ahead of the caller; at most three batches are held."""
        size = self.image_size
        with ThreadPoolExecutor(self.workers, thread_name_prefix="blastscan-decode") as pool:
            pending: deque[tuple[list[Any], list[Future]]] = deque()
            for chunk in _chunks(sources, self.batch_size):
                pending.append((chunk, [pool.submit(self._read, source) for source in chunk]))
                if len(pending) > 2:
                    yield self._collect(*pending.popleft(), size)
            while pending:
                yield self._collect(*pending.popleft(), size)

    @staticmethod
    def _collect(chunk: list[Any], futures: list[Future], size: int) -> tuple[list[Any], np.ndarray, list[tuple]]:
        read, images, failures = [], [], []
        for source, future in zip(chunk, futures, strict=True):
            result = future.result()
            if isinstance(result, str):
                failures.append((source, result))
            else:
                read.append(source)
                images.append(result)
        stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
        return read, stacked, failures

    def stream(self, sources: Iterable[Any], tta: bool | None = None) -> Iterator[ScoredBatch]:
        """Score any number of images in constant memory, one `ScoredBatch` per batch; unreadable ones are listed
        in the batch's `failures`, never raised."""
        for read, images, failures in self.prepared_batches(sources):
            logits = self.logits_prepared(images, tta) if len(images) else np.zeros((0, 2), dtype=np.float32)
            yield ScoredBatch(read, logits, failures)

    def _all(self, sources: Sequence[Any] | Iterable[Any], tta: bool | None) -> np.ndarray:
        logits = []
        for batch in self.stream(sources, tta):
            _raise_failures(batch.failures)
            logits.append(batch.logits)
        return np.concatenate(logits) if logits else np.zeros((0, 2), dtype=np.float32)

    def predict_logits(self, images: Iterable[ImageSource], tta: bool | None = None) -> np.ndarray:
        """(N, 2) logits of images (paths, arrays or PIL images); an unreadable image raises DatasetError."""
        return self._all(images, tta)

    def predict(self, images: Iterable[ImageSource], tta: bool | None = None) -> np.ndarray:
        """(N,) class-1 probabilities of images (paths, arrays or PIL images)."""
        return probabilities(self._all(images, tta))

    def embed(self, images: Iterable[ImageSource]) -> np.ndarray:
        """(N, D) pooled penultimate features of images (paths, arrays or PIL images)."""
        outputs = []
        for _, prepared, failures in self.prepared_batches(images):
            _raise_failures(failures)
            outputs.append(self.embed_prepared(prepared))
        return np.concatenate(outputs) if outputs else self.embed_prepared(np.zeros((0, 1, 1, 3), dtype=np.uint8))


@BACKENDS.register("torch", description="PyTorch eager on CUDA, MPS or CPU")
def _torch_backend(run: RunFolder, device: str | torch.device = "auto", **options: Any) -> Predictor:
    return Predictor(run.load_model(), InputSpec.of_run(run), device=device, **options)
