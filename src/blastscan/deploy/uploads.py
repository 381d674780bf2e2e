"""Uploaded images for the service: read with a size limit, decoded with a pixel limit, checked for their use.

Decoding is `blastscan.data.images.decode_rgb`, the in-memory twin of the `load_rgb` every command reads files with,
so an upload gives the pixels the same file gives `predict` and `analyze`: a cell crop may be decoded at reduced
JPEG scale no smaller than the network's input (as `Predictor` reads a file), RGBA loses its alpha, 16-bit and
palette images become 8-bit RGB. On top of that the service refuses what it cannot read meaningfully: images smaller
than a cell (`MIN_CELL_SIDE`) or a field (`MIN_FIELD_SIDE`), and images without colour (the network and the
leukocyte finder both read the stain's colours, so a grey-scale or blank image would be scored as if it were a
stained smear). Every refusal is an `UploadError` carrying the HTTP status and a message that names the file and
says what to do. This module knows nothing of HTTP frameworks: it takes bytes and file objects.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from blastscan.data.images import decode_rgb
from blastscan.errors import BlastscanError, DatasetError
from blastscan.smear.analysis import MIN_FIELD_SIDE, check_colour_image, check_field

__all__ = [
    "MIN_CELL_SIDE",
    "UploadError",
    "decode_cell",
    "decode_field",
    "display_name",
    "read_limited",
]

#: A cell crop's shorter side must reach this (pixels): below it there is no cell to see, only an upscaled smudge.
MIN_CELL_SIDE = 16
#: The longest file name repeated in a message (a multipart header can carry any name).
NAME_CHARACTERS = 120


class UploadError(BlastscanError):
    """An upload the service refuses: `status` is the HTTP status to answer with, the message says why."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def display_name(filename: str | None, index: int) -> str:
    """The name an upload is called by in answers: its file name (shortened), or `file <n>` when it has none."""
    name = (filename or "").strip()
    if not name:
        return f"file {index + 1}"
    return name if len(name) <= NAME_CHARACTERS else name[: NAME_CHARACTERS - 3] + "..."


def read_limited(handle: BinaryIO, name: str, max_bytes: int) -> bytes:
    """The upload's bytes; UploadError 413 when it holds more than `max_bytes` (never reads more than one byte past)."""
    data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UploadError(
            f"{name}: the file is larger than the {max_bytes:,} bytes accepted; send a smaller image", 413
        )
    return data


def _decode(data: bytes, name: str, max_pixels: int, min_side: int | None = None) -> np.ndarray:
    try:
        return decode_rgb(data, name, min_side=min_side, max_pixels=max_pixels)
    except DatasetError as exc:
        raise UploadError(str(exc)) from exc
    except Exception as exc:
        # A decoder failing in a way Pillow does not document (hostile bytes reach code paths files rarely do) is
        # still a file the service cannot read, not a fault of the service.
        raise UploadError(
            f"{name}: cannot decode the image ({type(exc).__name__}); send a JPEG, PNG, TIFF or BMP"
        ) from exc


def decode_cell(data: bytes, name: str, max_pixels: int, input_side: int) -> np.ndarray:
    """One cell crop as (H, W, 3) uint8 RGB, decoded as `Predictor` decodes a file for an `input_side` network."""
    image = _decode(data, name, max_pixels, min_side=input_side)
    try:
        return check_colour_image(
            image,
            name,
            MIN_CELL_SIDE,
            "a cell crop",
            "the model reads the stain's colours, so send the colour original",
        )
    except DatasetError as exc:
        raise UploadError(str(exc)) from exc


def decode_field(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """One whole smear field as (H, W, 3) uint8 RGB, with the checks `blastscan analyze` makes (`load_field`)."""
    image = _decode(data, name, max_pixels)
    try:
        return check_field(image, name)
    except DatasetError as exc:
        small = min(image.shape[:2]) < MIN_FIELD_SIDE
        raise UploadError(f"{exc}{'; send a single cell crop to /v1/cells instead' if small else ''}") from exc
