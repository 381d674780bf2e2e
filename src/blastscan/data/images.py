"""Decoding images into RGB uint8 arrays, with errors that name the file."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from blastscan.errors import DatasetError

#: The default pixel limit (width x height): 10,000 x 10,000, 300 MB decoded. The largest smear fields here have 5e6
#: pixels (2592 x 1944); Pillow's own default warns at 8.9e7. Raise it with $BLASTSCAN_MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = 100_000_000
#: The environment variable that overrides MAX_IMAGE_PIXELS.
PIXEL_LIMIT_ENV = "BLASTSCAN_MAX_IMAGE_PIXELS"

# blastscan checks every image's size against its own limit before decoding (`_check_pixels`), so Pillow's global
# check is turned off: Pillow's limit is a module attribute and its first stage is a warning, and turning that
# warning into an error with `warnings.catch_warnings()` changes process-wide state, which races between the
# decoding threads. Set once, at import, never toggled.
Image.MAX_IMAGE_PIXELS = None

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


def max_image_pixels() -> int:
    """The largest image (width x height) blastscan decodes: $BLASTSCAN_MAX_IMAGE_PIXELS, default MAX_IMAGE_PIXELS.

    Larger files are refused before any pixel is decoded (a "decompression bomb" can claim gigabytes)."""
    text = os.environ.get(PIXEL_LIMIT_ENV, "")
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(float(text))
    except ValueError:
        raise DatasetError(f"${PIXEL_LIMIT_ENV}={text!r}: not a number of pixels (e.g. 200000000)") from None
    if limit < 1:
        raise DatasetError(f"${PIXEL_LIMIT_ENV}={text!r}: must be a positive number of pixels")
    return limit


def _check_pixels(path: Path, image: Image.Image) -> None:
    limit = max_image_pixels()
    if image.width * image.height > limit:
        raise DatasetError(
            f"{path}: {image.width}x{image.height} = {image.width * image.height:,} pixels is more than the "
            f"{limit:,} blastscan decodes (a possible decompression bomb); shrink or remove the file, or raise the "
            f"limit with ${PIXEL_LIMIT_ENV}"
        )


def _open_header(path: Path) -> Image.Image:
    """`Image.open(path)` (header only) with the pixel limit checked; errors name the file."""
    try:
        image = Image.open(path)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found; re-scan the dataset or fix the manifest's root") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc}); replace or remove the file") from exc
    _check_pixels(path, image)
    return image


def _open_decoded(path: Path, target: int | None = None) -> Image.Image:
    """Open and fully decode `path`; with `target`, let JPEG decode at a reduced scale no smaller than it."""
    image = _open_header(path)
    try:
        if target is not None and image.format == "JPEG":
            # DCT-domain downscaling: decodes a 2592x1944 field ~8x faster and still reads every byte,
            # so a truncated file is still detected.
            image.draft("RGB", (target, target))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc}); replace or remove the file") from exc


def inspect_image(path: str | Path) -> ImageInfo:
    """Fully decode `path` (so truncated files are caught) and return its true size and mode."""
    path = Path(path)
    with _open_header(path) as probe:
        width, height, mode = probe.width, probe.height, probe.mode
    _open_decoded(path, target=max(64, min(width, height) // 8))
    return ImageInfo(width=width, height=height, mode=mode)


def load_rgb(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode `path` into an (H, W, 3) uint8 RGB array.

    With `min_side`, JPEGs may be decoded at a reduced scale whose shorter side is still >= `min_side`
    (for callers that resize down anyway). Greyscale, palette, 16-bit and RGBA images are converted to RGB.
    """
    return _as_rgb(_open_decoded(Path(path), target=min_side))


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size, 3) with antialiasing (no crop, no padding)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def load_resized(path: str | Path, size: int) -> np.ndarray:
    """`path` decoded and resized to (size, size, 3) uint8: what the image cache stores and what a model is fed."""
    return resize_rgb(load_rgb(path, min_side=size), size)


#: The Pillow formats `decode_rgb` opens: those of IMAGE_SUFFIXES (Pillow's JPEG opener also gives camera MPO files).
UPLOAD_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")


def decode_rgb(data: bytes, name: str, min_side: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image held in memory (an upload) into an (H, W, 3) uint8 RGB array, as `load_rgb` decodes a file.

    The same checks and conversions as `load_rgb`: the size is read from the header and checked against
    `max_pixels` (default `max_image_pixels()`) before any pixel is decoded, so a decompression bomb costs nothing;
    the whole image is then decoded, so a truncated file is refused; with `min_side` a JPEG may be decoded at a
    reduced scale whose shorter side is still >= `min_side`; greyscale, palette, 16-bit and RGBA images are converted
    to RGB (alpha dropped). Every error is a DatasetError whose message starts with `name`.
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if not data:
        raise DatasetError(f"{name}: the file is empty; send the image's bytes")
    try:
        # Only the formats of IMAGE_SUFFIXES: bytes from anywhere must not reach a decoder nobody here needs (EPS
        # would even start Ghostscript).
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{name}: not a readable image; send a JPEG, PNG, TIFF or BMP file") from exc
    if image.width * image.height > limit:
        raise DatasetError(
            f"{name}: {image.width}x{image.height} = {image.width * image.height:,} pixels is more than the "
            f"{limit:,} accepted (a possible decompression bomb); send a smaller image"
        )
    try:
        if min_side is not None and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))  # as `_open_decoded`: the same pixels `load_rgb` gives
        image.load()
        return _as_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DatasetError(f"{name}: cannot decode the image ({exc}); send the complete file") from exc


def _as_rgb(image: Image.Image) -> np.ndarray:
    """A decoded image as (H, W, 3) uint8 RGB (16-bit scaled to its max; palette, grey and RGBA converted)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = (255.0 * array / max(float(array.max()), 1.0)).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)
