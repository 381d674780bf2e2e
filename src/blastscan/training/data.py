"""The data side of training: cached uint8 images -> batches, with epoch-seeded sampling.

Images come from the memory-mapped `ImageCache` as uint8 and stay uint8 until they reach the device, where
`BatchAugment` scales, augments and normalises whole batches at once; that keeps the loader cheap on a 2-core
machine. Every random draw is a function of (seed, epoch), so a run resumed from an epoch checkpoint replays
exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from blastscan.data.cache import ImageCache


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

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        return iter(order.tolist())


class CellDataModule(L.LightningDataModule):
    """Train/val/test loaders over one image cache."""

    def __init__(
        self,
        cache: ImageCache,
        split_rows: dict[str, np.ndarray],
        targets: np.ndarray,
        batch_size: int,
        num_workers: int,
        seed: int,
        sample_weights: Sequence[float] | None = None,
    ) -> None:
        """`sample_weights`, one per training row, switch the training sampler to weighted draws."""
        super().__init__()
        self.cache = cache
        self.split_rows = split_rows
        self.targets = targets
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.sample_weights = sample_weights

    def _dataset(self, split: str) -> CachedCells:
        rows = self.split_rows[split]
        return CachedCells(self.cache, rows, self.targets[rows])

    def _loader(self, split: str, sampler: Sampler[int] | None = None, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        size = len(self.split_rows["train"])
        weights = self.sample_weights
        if self.trainer is not None and self.trainer.world_size > 1 and weights is None:
            # Data-parallel: Lightning swaps in a DistributedSampler (seeded, set_epoch per epoch) for shuffle=True.
            return self._loader("train", shuffle=True)
        return self._loader("train", EpochSeededSampler(size, self.seed, weights))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
