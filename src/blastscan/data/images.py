"""Decoding images into RGB uint8 arrays, with errors that name the file."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from blastscan.errors import DatasetError

#: File endings the readers treat as images.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})


def is_image_file(path: Path) -> bool:
    """True for a regular file whose ending is one of `IMAGE_SUFFIXES` (hidden files excluded)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


@dataclass(frozen=True)
class ImageInfo:
    """What a full decode of an image file found."""

    width: int
    height: int
    mode: str


def _open_decoded(path: Path, target: int | None = None) -> Image.Image:
    """Open and fully decode `path`; with `target`, let JPEG decode at a reduced scale no smaller than it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if target is not None and image.format == "JPEG":
                # DCT-domain downscaling: decodes a 2592x1944 field ~8x faster and still reads every byte,
                # so a truncated file is still detected.
                image.draft("RGB", (target, target))
            image.load()
        return image
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found; re-scan the dataset or fix the manifest's root") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(
            f"{path}: cannot decode image ({exc}); replace the file or scan with --skip-bad to leave it out"
        ) from exc


def inspect_image(path: str | Path) -> ImageInfo:
    """Fully decode `path` (so truncated files are caught) and return its true size and mode."""
    path = Path(path)
    try:
        with Image.open(path) as probe:
            width, height, mode = probe.width, probe.height, probe.mode
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc}); replace it or scan with --skip-bad") from exc
    _open_decoded(path, target=max(64, min(width, height) // 8))
    return ImageInfo(width=width, height=height, mode=mode)


def load_rgb(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode `path` into an (H, W, 3) uint8 RGB array.

    With `min_side`, JPEGs may be decoded at a reduced scale whose shorter side is still >= `min_side`
    (for callers that resize down anyway). Greyscale, palette, 16-bit and RGBA images are converted to RGB.
    """
    path = Path(path)
    image = _open_decoded(path, target=min_side)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = (255.0 * array / max(float(array.max()), 1.0)).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size, 3) with antialiasing (no crop, no padding)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def load_resized(path: str | Path, size: int) -> np.ndarray:
    """`path` decoded and resized to (size, size, 3) uint8: what the image cache stores and what a model is fed."""
    return resize_rgb(load_rgb(path, min_side=size), size)
