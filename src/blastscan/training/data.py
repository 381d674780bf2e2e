"""The data side of training: cached uint8 images -> batches, with epoch-seeded sampling.

Images come from the memory-mapped `ImageCache` as uint8 and stay uint8 until they reach the device, where
`BatchAugment` scales, augments and normalises whole batches at once; that keeps the loader cheap on a 2-core
machine. Every random draw is a function of (seed, epoch), so a run resumed from an epoch checkpoint replays
exactly what an uninterrupted run would have done.

Two ways to the device, chosen once per fit (`choose_data_path`, logged on `blastscan.training`):

  device-resident  the split's uint8 rows are uploaded once; `DeviceBatches` gathers each batch by index there
                   (no workers, no per-batch host copy). Used when the split fits in `device_cache_share` of the
                   device's free memory, on CUDA with `device_cache: auto`, on any device with `on`.
  DataLoader       `CachedCells` read from the memory map in the host process or its workers, then copied over.

Both take their order from the same `EpochSeededSampler`, so the same seed gives the same batches either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from blastscan.data.cache import ImageCache
from blastscan.training.config import DeviceCacheMode

log = logging.getLogger("blastscan.training")


class CachedCells(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Rows `indices` of an image cache with their class labels, as (uint8 HWC image, label) pairs."""

    def __init__(self, cache: ImageCache, indices: Sequence[int], labels: Sequence[int]) -> None:
        if len(indices) != len(labels):
            raise ValueError("indices and labels differ in length")
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.cache[int(self.indices[item])])), self.labels[item]

    def __getitems__(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One fancy-indexed read of the memmap per batch instead of one copy per image.
        rows = self.indices[np.asarray(items)]
        order = np.argsort(rows)  # sorted reads are sequential on disk
        batch = np.empty((len(rows), *self.cache.array().shape[1:]), dtype=np.uint8)
        batch[order] = self.cache.array()[rows[order]]
        return torch.from_numpy(batch), self.labels[np.asarray(items)]


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`__getitems__` already returns a batch: (B,H,W,3) uint8 -> (B,3,H,W) uint8 (a view), labels."""
    images, labels = batch
    return images.permute(0, 3, 1, 2), labels


class EpochSeededSampler(Sampler[int]):
    """Shuffles (or, with `weights`, draws with replacement) from a generator seeded by (seed, epoch).

    Lightning calls `set_epoch` at each epoch start, so the order of epoch k never depends on what ran before.
    """

    def __init__(self, size: int, seed: int, weights: Sequence[float] | None = None) -> None:
        self.size = size
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def order(self) -> torch.Tensor:
        """This epoch's (size,) int64 row order, on the CPU."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            return torch.randperm(self.size, generator=generator)
        return torch.multinomial(self.weights, self.size, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


class DeviceBatches:
    """The batches a DataLoader over `CachedCells` would yield, gathered by index from a split already on the device.

    `images` is (N, H, W, 3) uint8 and `labels` (N,) int64, both on the device. Each epoch moves its order there
    once (N int64); no batch touches the host. `sampler` orders the rows (Lightning calls its `set_epoch`, as for a
    DataLoader's); without one the rows come in order, as validation reads them.
    """

    #: Lightning reads `sampler` and `batch_sampler` as it does a DataLoader's (for `set_epoch`, shuffle checks).
    batch_sampler = None

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, sampler: EpochSeededSampler | None = None
    ) -> None:
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.sampler = sampler

    def __len__(self) -> int:
        size = len(self.labels) if self.sampler is None else len(self.sampler)
        return -(-size // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.arange(len(self.labels)) if self.sampler is None else self.sampler.order()
        order = order.to(self.labels.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            # (B,H,W,3) -> (B,3,H,W) as a view, exactly as `collate_batch` returns it.
            yield self.images.index_select(0, index).permute(0, 3, 1, 2), self.labels.index_select(0, index)


def upload_rows(cache: ImageCache, rows: np.ndarray, device: torch.device, chunk: int = 1024) -> torch.Tensor:
    """Rows `rows` of `cache` as one (N, H, W, 3) uint8 tensor on `device`, copied `chunk` rows at a time (the
    host holds one chunk beyond the memory map, never the whole split)."""
    array = cache.array()
    out = torch.empty((len(rows), *array.shape[1:]), dtype=torch.uint8, device=device)
    for start in range(0, len(rows), chunk):
        part = np.asarray(rows[start : start + chunk])
        out[start : start + len(part)] = torch.from_numpy(np.ascontiguousarray(array[part]))
    return out


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: `torch.cuda.mem_get_info` on CUDA, the host's available memory on the CPU; None when
    it cannot be told (other accelerators)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class DataPath:
    """How batches reach the device in one fit, and why."""

    device_resident: bool
    reason: str

    def describe(self) -> str:
        """The log line: which path runs and why."""
        way = "device-resident (batches gathered on the device)" if self.device_resident else "DataLoader"
        return f"training data: {way}; {self.reason}"


def choose_data_path(
    nbytes: int,
    device: torch.device,
    mode: DeviceCacheMode,
    share: float,
    world_size: int = 1,
    free_bytes: int | None = None,
) -> DataPath:
    """Whether `nbytes` of uint8 images go onto `device` once (see the module docstring), given `free_bytes` free
    there (None: unknown)."""
    size = _megabytes(nbytes)
    if mode == "off":
        return DataPath(False, "data.device_cache is off")
    if world_size > 1:
        return DataPath(False, f"data-parallel over {world_size} processes: each reads its own shard of the split")
    if mode == "auto" and device.type != "cuda":
        return DataPath(False, f"data.device_cache: auto keeps the split on CUDA only, and this run is on {device}")
    if free_bytes is None:
        return DataPath(False, f"the free memory on {device} is unknown")
    limit = share * free_bytes
    if nbytes > limit:
        return DataPath(
            False,
            f"the split ({size}) does not fit in {share:.0%} of the {_megabytes(free_bytes)} free on {device} "
            "(data.device_cache_share)",
        )
    return DataPath(True, f"the split ({size}) fits in {share:.0%} of the {_megabytes(free_bytes)} free on {device}")


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


#: The splits each Lightning stage reads.
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class CellDataModule(L.LightningDataModule):
    """Train/val/test batches over one image cache: device-resident when the split fits there, else DataLoaders."""

    def __init__(
        self,
        cache: ImageCache,
        split_rows: dict[str, np.ndarray],
        targets: np.ndarray,
        batch_size: int,
        num_workers: int,
        seed: int,
        sample_weights: Sequence[float] | None = None,
        eval_batch_size: int | None = None,
        device_cache: DeviceCacheMode = "auto",
        device_cache_share: float = 0.5,
    ) -> None:
        """`sample_weights`, one per training row, switch the training sampler to weighted draws.
        `eval_batch_size` (default `batch_size`) batches validation and test."""
        super().__init__()
        self.cache = cache
        self.split_rows = split_rows
        self.targets = targets
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.sample_weights = sample_weights
        self.device_cache = device_cache
        self.device_cache_share = device_cache_share
        self.data_path: DataPath | None = None  # set by `setup`
        self._resident: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, stage: str) -> None:
        """Choose the data path for this stage's splits (one log line) and upload them when they go on the device."""
        splits = _STAGE_SPLITS.get(stage, ())
        if not splits:
            return
        device, world_size, rank_zero = torch.device("cpu"), 1, True
        if self.trainer is not None:
            device, world_size = self.trainer.strategy.root_device, self.trainer.world_size
            rank_zero = self.trainer.is_global_zero
        row_bytes = int(np.prod(self.cache.array().shape[1:]))
        nbytes = sum(len(self.split_rows[split]) for split in splits) * row_bytes
        free = free_memory(device) if self.device_cache != "off" else None
        self.data_path = choose_data_path(nbytes, device, self.device_cache, self.device_cache_share, world_size, free)
        if rank_zero:
            log.info("%s", self.data_path.describe())
        if self.data_path.device_resident:
            for split in splits:
                rows = self.split_rows[split]
                labels = torch.as_tensor(np.asarray(self.targets[rows], dtype=np.int64), device=device)
                self._resident[split] = (upload_rows(self.cache, rows, device), labels)

    def teardown(self, stage: str) -> None:
        for split in _STAGE_SPLITS.get(stage, ()):
            self._resident.pop(split, None)

    def _dataset(self, split: str) -> CachedCells:
        rows = self.split_rows[split]
        return CachedCells(self.cache, rows, self.targets[rows])

    def _loader(
        self, split: str, batch_size: int, sampler: Sampler[int] | None = None, shuffle: bool = False
    ) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size,
            sampler=sampler,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        size = len(self.split_rows["train"])
        weights = self.sample_weights
        if self.trainer is not None and self.trainer.world_size > 1 and weights is None:
            # Data-parallel: Lightning swaps in a DistributedSampler (seeded, set_epoch per epoch) for shuffle=True.
            return self._loader("train", self.batch_size, shuffle=True)
        sampler = EpochSeededSampler(size, self.seed, weights)
        if "train" in self._resident:
            return DeviceBatches(*self._resident["train"], self.batch_size, sampler)
        return self._loader("train", self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._eval_batches("val")

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._eval_batches("test")

    def _eval_batches(self, split: str) -> DataLoader | DeviceBatches:
        if split in self._resident:
            return DeviceBatches(*self._resident[split], self.eval_batch_size)
        return self._loader(split, self.eval_batch_size)
