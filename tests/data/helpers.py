"""Small image files the tests write, in real dataset layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Path:
    """Write a small random image (format from the suffix); returns the path."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def write_truncated(path: Path, seed: int = 0) -> Path:
    """A JPEG cut off halfway: opens, but does not decode."""
    write_image(path.with_suffix(".full.jpg"), seed=seed, size=(64, 64))
    data = path.with_suffix(".full.jpg").read_bytes()
    path.with_suffix(".full.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])
    return path
