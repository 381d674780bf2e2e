"""What a model is fed, the same in training and inference: one function per step.

1. `prepare_image`: decode (or take an array), frame it on its cell when the run was trained with a cell focus
   (`blastscan.imaging.cell_focus`: crop, then after normalisation blank the background for `mask`), resize to the
   model's square size with Pillow's LANCZOS, and apply the run's stain normalisation when it was trained with one.
   `prepared_cache` stores exactly this for a whole manifest (rows are `load_resized` + the normaliser as the cache
   transform, or this function itself with a cell focus); training and `Predictor` both read it, so a file scored
   by `Predictor` and the same file read from a training cache are the same uint8 pixels.
2. `normalize_array`: (N, H, W, 3) prepared uint8 images to the float32 (N, 3, H, W) `(x / 255 - mean) / std`
   batch, in NumPy (the ONNX Runtime backend); `blastscan.imaging.augment.normalize_batch` is the same on torch
   tensors, on whatever device the batch is on (training and the torch backend).

This module imports no torch: the slim deployment install (`blastscan[serve]`) prepares images with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from blastscan.data.cache import ImageCache
from blastscan.data.images import load_resized, load_rgb, resize_rgb
from blastscan.data.manifest import Manifest
from blastscan.errors import DatasetError
from blastscan.imaging.cell_focus import CellFocus, resize_cell_mask
from blastscan.imaging.segmentation import WORKING_SIZE, segment_cell

#: With a cell focus, files are decoded with at least this many times the model's side (the crop is then cut at
#: that resolution and resized down, so framing loses no detail).
FOCUS_DECODE_FACTOR = 2

#: What `prepare_image` accepts: a file path, an (H, W, 3) uint8 RGB array, or a PIL image.
ImageSource = str | Path | np.ndarray | Image.Image


class StainNormalizer(Protocol):
    """Anything with `normalize(uint8 image) -> uint8 image` (a fitted Reinhard or Macenko normaliser)."""

    def normalize(self, image: np.ndarray) -> np.ndarray: ...


def as_rgb_array(image: np.ndarray | Image.Image, name: str = "image") -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a PIL image or an array (greyscale is repeated, RGBA loses alpha)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DatasetError(f"{name}: expected an (H, W, 3) RGB image, got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        raise DatasetError(f"{name}: expected uint8 pixels (0-255), got {array.dtype}")
    return np.ascontiguousarray(array[..., :3])


def _prepare_framed(
    source: ImageSource, size: int, stain: StainNormalizer | None, focus: CellFocus
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """With an active focus: the prepared image, its cell mask at (size, size) (None when no cell was found), and
    whether one was found. Crop at full resolution, resize, normalise the stain, then blank the background."""
    from_file = isinstance(source, str | Path)
    full = load_rgb(source, min_side=FOCUS_DECODE_FACTOR * size) if from_file else as_rgb_array(source)
    framed = focus.frame(full)
    image = resize_rgb(framed.image, size)
    if stain is not None:
        image = stain.normalize(image)
    mask = None if framed.mask is None else resize_cell_mask(framed.mask, (size, size))
    if focus.mode == "mask" and mask is not None:
        image = focus.fill(image, mask)
    return image, mask, framed.ok


def prepare_image_and_flag(
    source: ImageSource, size: int, stain: StainNormalizer | None = None, focus: CellFocus | None = None
) -> tuple[np.ndarray, bool]:
    """`prepare_image`'s image and whether its cell focus found a cell (always True without a focus)."""
    if focus is not None and focus.active:
        image, _, ok = _prepare_framed(source, size, stain, focus)
        return image, ok
    from_file = isinstance(source, str | Path)
    image = load_resized(source, size) if from_file else resize_rgb(as_rgb_array(source), size)
    return (stain.normalize(image) if stain is not None else image), True


def prepare_image(
    source: ImageSource, size: int, stain: StainNormalizer | None = None, focus: CellFocus | None = None
) -> np.ndarray:
    """`source` as the model sees it before normalisation: (size, size, 3) uint8, framed on its cell if `focus`,
    stain-normalised if `stain`."""
    return prepare_image_and_flag(source, size, stain, focus)[0]


def prepare_with_cell_mask(
    source: ImageSource, size: int, stain: StainNormalizer | None = None, focus: CellFocus | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """`prepare_image`'s image and the segmented cell's mask aligned with it ((size, size) bool; None when no cell
    was found): where explanations and the shortcut audit look for the cell in what the model saw. Without a focus
    the cell is segmented on the decoded image at the segmentation's working size."""
    if focus is not None and focus.active:
        image, mask, _ = _prepare_framed(source, size, stain, focus)
        return image, mask
    from_file = isinstance(source, str | Path)
    raw = load_rgb(source, min_side=WORKING_SIZE) if from_file else as_rgb_array(source)
    seg = segment_cell(resize_rgb(raw, WORKING_SIZE))
    return prepare_image(source, size, stain), resize_cell_mask(seg.cell, (size, size)) if seg.ok else None


def prepared_cache(
    manifest: Manifest,
    size: int,
    stain: StainNormalizer | None = None,
    stain_state: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    focus: CellFocus | None = None,
) -> ImageCache:
    """The built image cache of `manifest` prepared as `prepare_image` does; `stain_state` (the normaliser's
    `to_dict()`) and the focus are part of the cache key, so each fitted normaliser has its own entries. With a
    focus, the cache's `row_flags()` say which rows had a cell to frame."""
    if focus is not None and focus.active:
        cache = ImageCache(
            manifest,
            size=size,
            cache_dir=cache_dir,
            decode=lambda path: prepare_image_and_flag(path, size, stain, focus),
            decode_key={"cell_focus": focus.to_dict(), "stain": stain_state, "decode_factor": FOCUS_DECODE_FACTOR},
        )
    elif stain is None:
        cache = ImageCache(manifest, size=size, cache_dir=cache_dir)
    else:
        cache = ImageCache(
            manifest, size=size, cache_dir=cache_dir, transform=stain.normalize, transform_key=stain_state
        )
    cache.build(workers=workers)
    return cache


def normalize_array(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, H, W, 3) uint8 prepared images -> float32 (N, 3, H, W) `(x / 255 - mean) / std` (the network's input)."""
    batch = np.asarray(images)
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise DatasetError(f"expected a batch of (N, H, W, 3) images, got shape {batch.shape}")
    mean_ = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, 3)
    std_ = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, 3)
    normalized = (batch.astype(np.float32) / np.float32(255.0) - mean_) / std_
    return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2))
