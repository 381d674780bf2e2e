"""`Predictor`: what every backend shares - reading, preparing and batching images, TTA, streaming.

A backend subclass says how one prepared uint8 batch becomes logits (`logits_of_batch`); everything else lives
here, in NumPy, so that this module imports no torch: the slim deployment install (`blastscan[serve]`) runs the
ONNX Runtime backend through it. Images are prepared exactly as in training (`blastscan.imaging.preprocess`:
resize, the run's stain normalisation, then `(x / 255 - mean) / std`).
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from blastscan.data.cache import ImageCache
from blastscan.data.manifest import Manifest
from blastscan.errors import BlastscanError, ConfigError, DatasetError
from blastscan.imaging.cell_focus import CellFocus
from blastscan.imaging.preprocess import (
    ImageSource,
    prepare_image_and_flag,
    prepare_with_cell_mask,
    prepared_cache,
)
from blastscan.imaging.stain import stain_method_from_dict
from blastscan.inference.ood import OodProfile
from blastscan.registry import Registry
from blastscan.runs import FOR_INFERENCE, ExportFolder, RunFolder

#: Inference backends by name: each is a callable (run, device=..., **options) -> Predictor.
BACKENDS: Registry[Callable[..., Predictor]] = Registry("inference backend")

#: Devices `--device` accepts besides an explicit torch device string such as "cuda:1".
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), capped by OMP_NUM_THREADS when
    it is set (the thread budget the user gave every library, which ONNX Runtime's own pool would not read)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        cores = os.cpu_count() or 1
    budget = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(budget))) if budget.isdigit() and int(budget) > 0 else cores


@dataclass(frozen=True)
class InputSpec:
    """What a network expects: square side, per-channel mean and std (on 0-1 pixels), stain normalisation, and
    the cell framing (`blastscan.imaging.cell_focus`) it was trained with."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stain_state: dict[str, Any] | None = None
    cell_focus: dict[str, Any] | None = None

    @classmethod
    def of_run(cls, run: RunFolder) -> InputSpec:
        """The spec in a run's model card and stain state."""
        card = run.model_card()
        try:
            return cls(
                int(card["image_size"]),
                tuple(card["mean"]),
                tuple(card["std"]),
                run.stain_state(),
                card.get("cell_focus"),
            )
        except KeyError as exc:
            raise ConfigError(f"{run.model_card_path}: no {exc} field; the model card is incomplete") from None

    @classmethod
    def of_preprocessing(cls, preprocessing: dict[str, Any], source: str = "preprocessing.json") -> InputSpec:
        """The spec an export's preprocessing.json declares."""
        try:
            contract = preprocessing["input"]
            return cls(
                int(contract["size"]),
                tuple(contract["mean"]),
                tuple(contract["std"]),
                preprocessing.get("stain_normalisation"),
                preprocessing.get("cell_focus"),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{source}: no input {exc} field; the file is incomplete, re-export the model") from None


@dataclass
class ScoredBatch:
    """One streamed batch: the sources that were read with their logits, and those that could not be read.

    `probabilities` are calibrated by the predictor's `temperature` (1: as the network gives them)."""

    sources: list[Any]
    logits: np.ndarray
    failures: list[tuple[Any, str]] = field(default_factory=list)
    #: Per source read: whether the model's cell focus found a cell to frame (all True without a focus).
    cell_found: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: Per source read: the in-distribution score (`blastscan.inference.ood`; NaN when the model has no profile).
    ood_score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: Per source read: True where `ood_score` is above the profile's validation-chosen threshold.
    out_of_distribution: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: With TTA: the standard deviation of the class-1 probability over the 8 views (NaN without TTA).
    tta_spread: np.ndarray = field(default_factory=lambda: np.zeros(0))
    temperature: float = 1.0

    @property
    def probabilities(self) -> np.ndarray:
        """Class-1 probabilities of `logits`, temperature-scaled."""
        return probabilities(self.logits, self.temperature)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class-1 probabilities from (N, 2) logits divided by `temperature` (softmax in float64)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, 1] / e.sum(axis=1)


def calibrated_threshold(threshold: float, temperature: float) -> float:
    """The threshold on temperature-scaled probabilities that makes the same calls as `threshold` on raw ones.

    With two classes p = sigmoid((z1 - z0) / T), so a cut at margin m = logit(threshold) is a cut at sigmoid(m / T)
    once scaled: temperature scaling changes the probabilities a user reads, never a call."""
    t = float(threshold)
    if t <= 0.0 or t >= 1.0 or float(temperature) == 1.0:
        return t
    margin = np.log(t) - np.log1p(-t)
    return float(1.0 / (1.0 + np.exp(-margin / float(temperature))))


def dihedral_arrays(images: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/quarter-turns of an (N, H, W, 3) batch, in the order of the torch backend's `dihedral_views`:
    cells have no orientation, so each is an equal view."""
    views = []
    for flipped in (images, images[:, :, ::-1]):
        views.extend(np.ascontiguousarray(np.rot90(flipped, k, axes=(1, 2))) for k in range(4))
    return views


def raise_failures(failures: list[tuple[Any, str]]) -> None:
    """For callers that want every image scored: the first reasons as one DatasetError."""
    if failures:
        raise DatasetError("; ".join(reason for _, reason in failures[:5]))


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def join_stages(batches: list[list[np.ndarray]]) -> list[np.ndarray] | None:
    """Per-stage feature statistics of several batches joined into one array per stage (None for no batches)."""
    if not batches:
        return None
    return [np.concatenate([batch[stage] for batch in batches]) for stage in range(len(batches[0]))]


def _empty_logits() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.float32)


class Predictor(ABC):
    """A trained network with the preprocessing it was trained with, on some backend.

    `predict(images)` -> (N,) class-1 probabilities takes any iterable of paths, (H, W, 3) uint8 arrays or PIL
    images; `stream(images)` yields `ScoredBatch`es and lists unreadable files instead of raising. The `*_prepared`
    methods take images already prepared (an image cache's rows: resized and stain-normalised uint8).
    `Predictor.open(path)` loads a run folder, an export folder or an .onnx file of one on the best backend there is.
    """

    #: The backend's name in BACKENDS.
    backend: ClassVar[str] = ""

    def __init__(self, spec: InputSpec, batch_size: int = 64, tta: bool = False, workers: int = 2) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.spec = spec
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.workers = max(1, int(workers))
        self.stain = stain_method_from_dict(spec.stain_state) if spec.stain_state is not None else None
        self.focus = CellFocus.from_dict(spec.cell_focus)
        #: The in-distribution profile `stream` scores every image with (None: no score; see `ood`).
        self.ood: OodProfile | None = None
        #: The calibration temperature `stream` and `predict` scale probabilities by (fitted on validation).
        self.temperature = 1.0

    @classmethod
    def from_run(
        cls, run: str | Path | RunFolder, device: str = "auto", backend: str = "auto", **options: Any
    ) -> Predictor:
        """The predictor of a trained run folder (model.json + best.safetensors + stain.json), on `device`.

        `backend="auto"`: ONNX Runtime on the CPU when onnxruntime is installed (the run's export is made on first
        use and cached in the run folder), PyTorch on a GPU or when onnxruntime is missing."""
        folder = RunFolder.open(run, need=FOR_INFERENCE)
        return BACKENDS.get(choose_backend(backend, device))(folder, device=device, **options)

    @classmethod
    def open(cls, path: str | Path, device: str = "auto", backend: str = "auto", **options: Any) -> Predictor:
        """The predictor of a run folder, an export folder (`blastscan export`), or one .onnx file in an export
        folder (model.int8.onnx picks the quantised model). Export folders run on ONNX Runtime."""
        from blastscan.inference.onnx_backend import OnnxPredictor  # it builds on this module

        export = ExportFolder.named_by(path)
        if export is not None:
            folder, model_file = export
            return OnnxPredictor.from_export(folder, model_file=model_file, device=device, **options)
        return cls.from_run(path, device=device, backend=backend, **options)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    # ------------------------------------------------------------------------------------------- preparing

    def prepare(self, source: ImageSource) -> np.ndarray:
        """One image as the network sees it before normalisation: (S, S, 3) uint8, framed and stain-normalised."""
        return self.prepare_and_flag(source)[0]

    def prepare_and_flag(self, source: ImageSource) -> tuple[np.ndarray, bool]:
        """`prepare(source)` and whether the cell focus found a cell (True without a focus)."""
        return prepare_image_and_flag(source, self.image_size, self.stain, self.focus)

    def prepare_with_cell_mask(self, source: ImageSource) -> tuple[np.ndarray, np.ndarray | None]:
        """`prepare(source)` and the cell's (S, S) mask in it (None when no cell was found)."""
        return prepare_with_cell_mask(source, self.image_size, self.stain, self.focus)

    def image_cache(self, manifest: Manifest, cache_dir: str | Path | None = None, workers: int = 2) -> ImageCache:
        """The (built) image cache of `manifest`'s images prepared for this network: its size, framing, stain."""
        return prepared_cache(
            manifest, self.image_size, self.stain, self.spec.stain_state, cache_dir, workers, self.focus
        )

    # ------------------------------------------------------------------------------------------- the network

    @abstractmethod
    def outputs_of_batch(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """(n, 2) float32 logits and, per network stage, an (n, D_stage) array of feature statistics (None when the
        network does not expose its stages) of one batch of (n, S, S, 3) prepared uint8 images (n <= batch_size).
        The statistics feed the in-distribution score (`blastscan.inference.ood`)."""

    def logits_of_batch(self, images: np.ndarray) -> np.ndarray:
        """(n, 2) float32 logits of one batch of prepared uint8 images."""
        return self.outputs_of_batch(images)[0]

    def dihedral_logits_of_batch(self, images: np.ndarray) -> np.ndarray:
        """(8, n, 2) logits of the 8 dihedral views of one prepared batch; the first view is the batch itself."""
        return np.stack([self.logits_of_batch(view) for view in dihedral_arrays(images)])

    def plain_and_tta_of_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(plain, TTA) logits of one prepared batch: TTA is the mean logit over the 8 dihedral views, and the
        first view is the batch itself."""
        views = self.dihedral_logits_of_batch(images)
        return views[0], views.mean(axis=0)

    def _batch_logits(self, images: np.ndarray, tta: bool | None) -> np.ndarray:
        if self.tta if tta is None else tta:
            return self.plain_and_tta_of_batch(images)[1]
        return self.logits_of_batch(images)

    def logits_prepared(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """(N, 2) logits of (N, S, S, 3) prepared uint8 images, in batches."""
        outputs = [
            self._batch_logits(np.ascontiguousarray(images[start : start + self.batch_size]), tta)
            for start in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(outputs) if outputs else _empty_logits()

    def predict_prepared(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """(N,) class-1 probabilities of prepared images."""
        return probabilities(self.logits_prepared(images, tta), self.temperature)

    def _row_batches(self, cache: ImageCache, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Prepared uint8 batches of cache rows `rows`, read from the memory map one batch at a time."""
        array = cache.array()
        for start in range(0, len(rows), self.batch_size):
            yield np.ascontiguousarray(array[np.asarray(rows[start : start + self.batch_size])])

    def logits_of_rows(self, cache: ImageCache, rows: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """(N, 2) logits of cache rows `rows`, read one batch at a time."""
        outputs = [self._batch_logits(batch, tta) for batch in self._row_batches(cache, rows)]
        return np.concatenate(outputs) if outputs else _empty_logits()

    def logits_of_rows_with_tta(self, cache: ImageCache, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(plain, TTA) (N, 2) logits of cache rows `rows`, both from one pass over the 8 views."""
        plain, tta = [_empty_logits()], [_empty_logits()]
        for batch in self._row_batches(cache, rows):
            one, mean = self.plain_and_tta_of_batch(batch)
            plain.append(one)
            tta.append(mean)
        return np.concatenate(plain), np.concatenate(tta)

    def outputs_of_rows(self, cache: ImageCache, rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """(N, 2) plain logits and the per-stage feature statistics (or None) of cache rows `rows`, one batch at a
        time."""
        logits, features = [_empty_logits()], []
        for batch in self._row_batches(cache, rows):
            batch_logits, batch_features = self.outputs_of_batch(batch)
            logits.append(batch_logits)
            if batch_features is not None:
                features.append(batch_features)
        return np.concatenate(logits), join_stages(features)

    def ood_scores(self, logits: np.ndarray, features: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, flags) of plain logits and features by the predictor's in-distribution profile; NaN scores and
        no flags when it has none."""
        if self.ood is None:
            return np.full(len(logits), np.nan), np.zeros(len(logits), dtype=bool)
        scores = self.ood.scores(features, logits)
        return scores, self.ood.flags(scores)

    def embed(self, images: Iterable[ImageSource]) -> np.ndarray:
        """(N, D) pooled penultimate features; only the torch backend has them."""
        raise ConfigError(f"the {self.backend} backend gives no pooled features; open the run with backend='torch'")

    # --------------------------------------------------------------------------------------------- streaming

    def _read(self, source: Any) -> tuple[np.ndarray, bool] | str:
        """The prepared image and whether its cell was found, or why it could not be read."""
        try:
            return self.prepare_and_flag(source)
        except BlastscanError as exc:
            # The reader's message ends with advice for `data scan` ("; ... --skip-bad"); predict skips anyway.
            return str(exc).rsplit("; ", 1)[0]
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return f"{source}: not a readable image ({type(exc).__name__}: {exc})"

    def prepared_batches(
        self, sources: Iterable[Any]
    ) -> Iterator[tuple[list[Any], np.ndarray, list[tuple], np.ndarray]]:
        """(sources read, their (n, S, S, 3) prepared images, [(source, reason) unreadable], (n,) cell found) per
        batch.

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
    def _collect(
        chunk: list[Any], futures: list[Future], size: int
    ) -> tuple[list[Any], np.ndarray, list[tuple], np.ndarray]:
        read, images, failures, found = [], [], [], []
        for source, future in zip(chunk, futures, strict=True):
            result = future.result()
            if isinstance(result, str):
                failures.append((source, result))
            else:
                read.append(source)
                images.append(result[0])
                found.append(result[1])
        stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
        return read, stacked, failures, np.asarray(found, dtype=bool)

    def score_prepared_batch(self, images: np.ndarray, tta: bool | None = None) -> ScoredBatch:
        """Everything `stream` reports for one prepared batch (n <= batch_size), with no sources: logits
        (TTA-averaged with TTA), the in-distribution score and flag (always of the plain view), and with TTA the
        spread of the views' probabilities."""
        n = len(images)
        if n == 0:
            return ScoredBatch([], _empty_logits(), temperature=self.temperature)
        use_tta = self.tta if tta is None else tta
        needs_features = self.ood is not None and self.ood.needs_features
        plain, features = self.outputs_of_batch(images) if needs_features or not use_tta else (None, None)
        logits, spread = plain, np.full(n, np.nan)
        if use_tta:
            views = self.dihedral_logits_of_batch(images)
            plain, logits = views[0], views.mean(axis=0)
            spread = np.stack([probabilities(view, self.temperature) for view in views]).std(axis=0)
        scores, flags = self.ood_scores(plain, features)
        return ScoredBatch([], logits, [], np.ones(n, dtype=bool), scores, flags, spread, self.temperature)

    def stream(self, sources: Iterable[Any], tta: bool | None = None) -> Iterator[ScoredBatch]:
        """Score any number of images in constant memory, one `ScoredBatch` per batch; unreadable ones are listed
        in the batch's `failures`, never raised."""
        for read, images, failures, found in self.prepared_batches(sources):
            yield replace(self.score_prepared_batch(images, tta), sources=read, failures=failures, cell_found=found)

    def _all(self, sources: Sequence[Any] | Iterable[Any], tta: bool | None) -> np.ndarray:
        logits = []
        for batch in self.stream(sources, tta):
            raise_failures(batch.failures)
            logits.append(batch.logits)
        return np.concatenate(logits) if logits else _empty_logits()

    def predict_logits(self, images: Iterable[ImageSource], tta: bool | None = None) -> np.ndarray:
        """(N, 2) logits of images (paths, arrays or PIL images); an unreadable image raises DatasetError."""
        return self._all(images, tta)

    def predict(self, images: Iterable[ImageSource], tta: bool | None = None) -> np.ndarray:
        """(N,) class-1 probabilities of images (paths, arrays or PIL images), scaled by `temperature`."""
        return probabilities(self._all(images, tta), self.temperature)


def installed(module: str) -> bool:
    """True when `module` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        return False


def choose_backend(backend: str, device: str) -> str:
    """The backend "auto" stands for: ONNX Runtime for the CPU when it is installed, PyTorch for a GPU (and
    wherever onnxruntime is missing); a named backend is returned as it is."""
    if backend != "auto":
        return backend
    wants_gpu = str(device).lower() not in ("auto", "cpu")
    if not wants_gpu and str(device).lower() == "auto" and installed("torch"):
        import torch  # only to ask whether there is a GPU: the slim install has no torch, and no GPU path

        wants_gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    if not wants_gpu and installed("onnxruntime"):
        return "onnx"
    return "torch"
