"""Batched training augmentation on the device: uint8 (B, 3, H, W) batch in, normalised float32 batch out.

`BatchAugment` runs in the LightningModule's `on_after_batch_transfer`, on whole batches, so the data path stays a
cheap uint8 copy. In order: flips and multiples of 90 degrees, one `grid_sample` for rotation + zoom (the flips and
quarter turns are folded into the same matrix when it runs; without rotation or zoom they are exact pixel moves),
stain jitter (`StainJitter`; before the camera-like changes, because stain varies in the slide and brightness in
the acquisition), brightness and contrast, clamp to [0, 1], then `(x - mean) / std`. What rotation and zoom-out
bring in from outside the image takes the image's border colour: pale glass on smears, black for cells on black.

Randomness: every per-image parameter comes from one `torch.rand((B, 12))` drawn with the `generator` argument on
that generator's own device (CPU when it is None), worked out there and moved to the batch's device in one
asynchronous copy. Use a CPU `torch.Generator` (recommended, also for CUDA batches): its state is a small CPU tensor
to checkpoint, the same seed draws the same parameters on any device, and the per-image arithmetic stays off the
GPU's launch queue. A generator on the batch's device works too. The same generator state gives the same output
(bit-identical on one device), which is what exactly-reproducible resumed training needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from blastscan.errors import ConfigError
from blastscan.imaging.stain import StainJitter

__all__ = ["AugmentConfig", "BatchAugment", "augmentation_grid", "save_augmentation_grid"]

#: Columns of the per-batch uniform draw: hflip, vflip, rot90, rotation, zoom, brightness, contrast,
#: 3 stain scales, 2 stain shifts. Always all of them, so a config change never shifts the stream's meaning.
_N_DRAWS = 12


class AugmentConfig(BaseModel):
    """Training-time augmentation of blood-cell images; every amount 0 (or `enabled: false`) turns it off."""

    model_config = ConfigDict(extra="forbid")

    hflip: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Probability of a left-right flip.")
    vflip: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Probability of an up-down flip.")
    rot90: bool = Field(
        True,
        description="Turn each image by a random multiple of 90 degrees (cells have no orientation); "
        "non-square images get 0 or 180 only.",
    )
    rotation: float = Field(
        20.0,
        ge=0.0,
        le=180.0,
        allow_inf_nan=False,
        description="Largest further rotation in degrees, drawn uniformly in [-rotation, rotation] (0 = off).",
    )
    zoom: tuple[float, float] = Field(
        (0.9, 1.1),
        description="Scale range (low, high) drawn uniformly; > 1 enlarges the cell, < 1 shows more background "
        "(filled with the image's border colour). (1, 1) = off.",
    )
    brightness: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Largest additive brightness change, as a fraction of the intensity range [0, 1].",
    )
    contrast: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Largest contrast change: pixels move away from / towards the image mean by a factor in "
        "[1 - contrast, 1 + contrast].",
    )
    stain_jitter: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Sigma of StainJitter's per-stain optical-density scale and shift (0 = off); background "
        "(glass, black surround) is left alone.",
    )
    stain_shift: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Largest StainJitter shift of each stain's concentration; default: `stain_jitter` (a strong, "
        "calibrated scale usually wants a small shift).",
    )
    enabled: bool = Field(True, description="False: no augmentation at all, only scaling and normalisation.")

    @model_validator(mode="after")
    def _check_zoom(self) -> AugmentConfig:
        low, high = self.zoom
        if not (math.isfinite(low) and math.isfinite(high) and 0.0 < low <= high <= 4.0):
            raise ValueError(f"zoom must be (low, high) with 0 < low <= high <= 4, got {self.zoom}")
        return self

    @property
    def shift_sigma(self) -> float:
        """The stain shift actually used: `stain_shift`, or `stain_jitter` when it is not set."""
        return self.stain_jitter if self.stain_shift is None else self.stain_shift

    @property
    def active(self) -> bool:
        """True when training batches would be changed at all."""
        return self.enabled and (
            self.hflip > 0
            or self.vflip > 0
            or self.rot90
            or self.rotation > 0
            or self.zoom != (1.0, 1.0)
            or self.brightness > 0
            or self.contrast > 0
            or self.stain_jitter > 0
        )


class _Params(NamedTuple):
    """One batch's per-image parameters, on the batch's device, in the form the batch operations use."""

    transpose: torch.Tensor  # (B,) bool; then flip_rows, then flip_cols: the flips + quarter turn, exactly
    flip_rows: torch.Tensor
    flip_cols: torch.Tensor
    coef_x: torch.Tensor  # (B, 2): the sampling grid is coef_x * x_out + coef_y * y_out (grid_sample coordinates)
    coef_y: torch.Tensor
    brightness: torch.Tensor  # (B,)
    contrast: torch.Tensor  # (B,)
    stain_alpha: torch.Tensor  # (B, 3)
    stain_beta: torch.Tensor  # (B, 3), residual shift 0


def _channel_stats(values: Sequence[float], what: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"BatchAugment {what} must be three numbers (R, G, B), got {values!r}") from exc
    if tensor.shape != (3,) or not bool(torch.isfinite(tensor).all()):
        raise ConfigError(f"BatchAugment {what} must be three finite numbers (R, G, B), got {values!r}")
    return tensor.view(1, 3, 1, 1)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"BatchAugment expects a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"BatchAugment expects a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"BatchAugment expects uint8 images (0-255) as the cache stores them, got {images.dtype}")
    return images


#: The fill colour is this quantile (per channel) of the image's outermost pixel ring. Glass is the brightest thing
#: on a smear, so a high quantile is glass even where red cells cover most of the ring (a median there gives a
#: darker, visible patch); it is still black for cells on black (C-NMC) unless they cover a quarter of the ring.
FILL_QUANTILE = 0.75


def _border_colour(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1, 1) float (0-255): the `FILL_QUANTILE` colour of each image's outermost pixel ring."""
    # Column slices are copied contiguous first: torch.cat on strided slices is ~100x slower on CPU.
    columns = [images[:, :, 1:-1, 0].contiguous(), images[:, :, 1:-1, -1].contiguous()]
    ring = torch.cat([images[:, :, 0, :], images[:, :, -1, :], *columns], dim=2)
    k = max(1, math.ceil(FILL_QUANTILE * ring.shape[2]))
    return ring.kthvalue(k, dim=2).values[:, :, None, None].float()


class BatchAugment(torch.nn.Module):
    """Random augmentation and normalisation of a uint8 image batch, vectorised on the batch's device.

    `forward(images_uint8, generator, train)` returns float32 `((x / 255) - mean) / std`; with `train=True` and an
    enabled config the images are augmented first (see the module docstring). `mean` and `std` are buffers, so the
    module follows `.to(device)` as a submodule of the LightningModule; they are not saved in state dicts.
    """

    mean: torch.Tensor
    std: torch.Tensor
    _inv_std: torch.Tensor
    _low: torch.Tensor
    _high: torch.Tensor

    def __init__(self, config: AugmentConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        try:
            self.config = AugmentConfig.model_validate(config)
        except ValidationError as exc:
            raise ConfigError(f"augment config: {exc}") from None
        std_t = _channel_stats(std, "std")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"BatchAugment std must be positive, got {list(std)}")
        mean_t = _channel_stats(mean, "mean")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        # For the fused photometric + normalise step: x / std - mean / std, clamped to the image of [0, 1].
        self.register_buffer("_inv_std", 1.0 / std_t, persistent=False)
        self.register_buffer("_low", -mean_t / std_t, persistent=False)
        self.register_buffer("_high", (1.0 - mean_t) / std_t, persistent=False)
        self._grid_axes: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        sigma = self.config.stain_jitter
        self.stain = StainJitter(sigma_alpha=sigma, sigma_beta=self.config.shift_sigma) if sigma > 0 else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float [0, 1] batch -> `(x - mean) / std`."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """A normalised batch back to float [0, 1] RGB (clamped), for figures."""
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp(0.0, 1.0)

    def forward(
        self, images_uint8: torch.Tensor, generator: torch.Generator | None = None, train: bool = True
    ) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, H, W) float32 normalised; augmented first when `train` and enabled.

        `generator` (CPU or on the batch's device; None = torch's default CPU generator) is the only source of
        randomness: the same generator state gives the same output. With `train=False` the result is exactly
        `(images_uint8.float() / 255 - mean) / std`.
        """
        images = _check_images(images_uint8)
        if not (train and self.config.active) or images.shape[0] == 0:
            return normalize_batch(images, self.mean, self.std)
        cfg = self.config
        params = self._draw(images.shape, generator, images.device)
        if cfg.rotation > 0 or cfg.zoom != (1.0, 1.0):
            x = self._affine(images, params)
        else:  # flips and quarter turns only: exact pixel moves, done on uint8 (4x less memory to move)
            x = self._dihedral(images, params).float().div_(255.0)
        if self.stain is not None:
            x = self.stain.apply_batch_with(x, params.stain_alpha, params.stain_beta)
        return self._photometric_and_normalize(x, params)

    # -----------------------------------------------------------------------------------------------------------

    def _draw(self, shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> _Params:
        """Every per-image parameter from one uniform draw, worked out on the generator's device and moved in one
        copy: the batch's device then runs only whole-batch operations (few kernel launches per batch)."""
        cfg = self.config
        n, _, height, width = shape
        draw_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((n, _N_DRAWS), generator=generator, device=draw_device, dtype=torch.float64)
        hflip = u[:, 0] < cfg.hflip
        vflip = u[:, 1] < cfg.vflip
        if not cfg.rot90:
            turns = torch.zeros_like(u[:, 2], dtype=torch.long)
        elif height == width:
            turns = (u[:, 2] * 4).long().clamp_max(3)
        else:  # a quarter turn would change the shape; half turns only
            turns = 2 * (u[:, 2] * 2).long().clamp_max(1)
        # The flips, then torch.rot90(k), as (transpose, flip rows, flip columns) applied in that order:
        # rot90(k=1) = flip rows after a transpose, k=2 = both flips, k=3 = flip columns after a transpose; a
        # transpose swaps which of the earlier flips acts on rows and which on columns.
        transpose = turns % 2 == 1
        flip_rows = ((turns == 1) | (turns == 2)) ^ torch.where(transpose, hflip, vflip)
        flip_cols = ((turns == 2) | (turns == 3)) ^ torch.where(transpose, vflip, hflip)

        # Output -> input coordinates in pixel units (x along columns), rows (x, y) of the matrix: rotation and
        # zoom, then mirror (x by flip_cols, y by flip_rows), then swap x and y when transposed.
        angle = math.radians(cfg.rotation) * (2 * u[:, 3] - 1)
        low, high = cfg.zoom
        scale = low + (high - low) * u[:, 4]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        sign_x, sign_y = 1 - 2 * flip_cols.double(), 1 - 2 * flip_rows.double()
        row_x = torch.stack([sign_x * cos, -sign_x * sin], 1)
        row_y = torch.stack([sign_y * sin, sign_y * cos], 1)
        row_x, row_y = torch.where(transpose[:, None], row_y, row_x), torch.where(transpose[:, None], row_x, row_y)
        # grid_sample's coordinates run from -1 to 1 on both axes: theta = D^-1 M D with D = diag(W, H), so that
        # non-square images turn rigidly.
        coef_x = torch.stack([row_x[:, 0], row_y[:, 0] * (width / height)], 1)  # multiplies output x
        coef_y = torch.stack([row_x[:, 1] * (height / width), row_y[:, 1]], 1)  # multiplies output y

        brightness = cfg.brightness * (2 * u[:, 5] - 1)
        contrast = 1 + cfg.contrast * (2 * u[:, 6] - 1)  # exactly 1 when contrast is off
        # Same law as StainJitter.apply_batch: scales U(1 +- sigma) for 2 stains + residual, shifts U(+- shift)
        # for the 2 stains only.
        alpha = 1 + cfg.stain_jitter * (2 * u[:, 7:10] - 1)
        beta = F.pad(cfg.shift_sigma * (2 * u[:, 10:12] - 1), (0, 1))

        flags = torch.stack([transpose, flip_rows, flip_cols], 1).double()
        packed = torch.cat([flags, coef_x, coef_y, brightness[:, None], contrast[:, None], alpha, beta], 1).float()
        if packed.device != device and device.type == "cuda":
            # From pinned memory the copy is asynchronous; from pageable memory it would wait for the GPU's queue.
            packed = packed.pin_memory().to(device, non_blocking=True)
        packed = packed.to(device)
        flags = packed[:, :3] > 0.5
        return _Params(
            transpose=flags[:, 0],
            flip_rows=flags[:, 1],
            flip_cols=flags[:, 2],
            coef_x=packed[:, 3:5],
            coef_y=packed[:, 5:7],
            brightness=packed[:, 7],
            contrast=packed[:, 8],
            stain_alpha=packed[:, 9:12],
            stain_beta=packed[:, 12:15],
        )

    def _dihedral(self, x: torch.Tensor, p: _Params) -> torch.Tensor:
        """Per-image flips and quarter turns as exact pixel moves (torch.where over the batch, no loop)."""
        cfg = self.config
        if cfg.rot90 and x.shape[2] == x.shape[3]:
            x = torch.where(p.transpose[:, None, None, None], x.transpose(2, 3), x)
        if cfg.vflip > 0 or cfg.rot90:
            x = torch.where(p.flip_rows[:, None, None, None], x.flip(2), x)
        if cfg.hflip > 0 or cfg.rot90:
            x = torch.where(p.flip_cols[:, None, None, None], x.flip(3), x)
        return x

    def _affine(self, images: torch.Tensor, p: _Params) -> torch.Tensor:
        """Flips, quarter turns, rotation and zoom as one bilinear resampling of the uint8 batch -> float [0, 1].

        Pixels from outside the image take the image's border colour (pale glass, or C-NMC black), not black.
        """
        height, width = images.shape[2:]
        key = (height, width, images.device)
        if key not in self._grid_axes:
            # Pixel centres in grid_sample's coordinates (align_corners=False), as affine_grid makes them.
            xs = (torch.arange(width, device=images.device, dtype=torch.float32) * 2 + 1) / width - 1
            ys = (torch.arange(height, device=images.device, dtype=torch.float32) * 2 + 1) / height - 1
            self._grid_axes[key] = (xs[None, None, :, None], ys[None, :, None, None])
        xs, ys = self._grid_axes[key]
        # affine_grid's grid as a sum of two broadcast terms: several times faster than its batched matmul on CPU.
        grid = torch.addcmul(xs * p.coef_x[:, None, None, :], ys, p.coef_y[:, None, None, :])
        fill = _border_colour(images)
        # grid_sample is linear and pads with zeros, so sampling (x - fill) and adding fill back pads with fill
        # and blends smoothly into it at the edges, without a mask channel.
        x = F.grid_sample(images.float().sub_(fill), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x.add_(fill).div_(255.0)

    def _photometric_and_normalize(self, x: torch.Tensor, p: _Params) -> torch.Tensor:
        """Brightness, contrast, clamp to [0, 1] and `(x - mean) / std`, in two passes over the batch.

        (x - m) * c + m + b, clamped, then normalised, is one per-image, per-channel multiply-add followed by a
        clamp to the normalised image of [0, 1].
        """
        if not (self.config.brightness > 0 or self.config.contrast > 0):
            # Same arithmetic as eval: pure pixel moves (flips, quarter turns) give bit-identical values.
            return self.normalize(x.clamp_(0.0, 1.0))
        contrast, offset = p.contrast[:, None, None, None], p.brightness[:, None, None, None]
        if self.config.contrast > 0:
            offset = torch.addcmul(offset, x.mean(dim=(1, 2, 3), keepdim=True), 1 - contrast)
        bias = torch.addcmul(self._low, offset, self._inv_std)  # (offset - mean) / std
        y = torch.addcmul(bias, x, contrast * self._inv_std)
        return y.clamp_(self._low, self._high)


def augmentation_grid(
    images_uint8: torch.Tensor, augment: BatchAugment, n_variants: int = 6, seed: int = 0, gap: int = 2
) -> np.ndarray:
    """An (N*H + (N-1)*gap, (1+n_variants)*W + n_variants*gap, 3) uint8 RGB grid for the run folder.

    Row i is image i: first its original, then `n_variants` training augmentations of it (drawn with a CPU
    generator seeded with `seed`, so the figure is the same every time), separated by white lines `gap` wide.
    """
    images = _check_images(images_uint8)
    if n_variants < 0 or gap < 0:
        raise ValueError(f"n_variants and gap must be >= 0, got {n_variants} and {gap}")
    n, _, height, width = images.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    variants = images.new_empty((0, 3, height, width))
    if n_variants:
        with torch.no_grad():
            # All variants in one batch: variant-major, so row i of every variant block is image i.
            batch = images.to(augment.mean.device).repeat(n_variants, 1, 1, 1)
            out = augment.unnormalize(augment(batch, generator=generator, train=True))
            variants = (out * 255).round().to(torch.uint8)
    tiles = torch.cat([images.cpu()[None], variants.cpu().view(n_variants, n, 3, height, width)], dim=0)
    tiles_np = tiles.permute(1, 0, 3, 4, 2).numpy()  # (N, 1 + V, H, W, 3)
    columns = 1 + n_variants
    grid = np.full((n * height + (n - 1) * gap, columns * width + (columns - 1) * gap, 3), 255, dtype=np.uint8)
    for row in range(n):  # a figure, not the training path: a loop over tiles is fine
        for col in range(columns):
            top, left = row * (height + gap), col * (width + gap)
            grid[top : top + height, left : left + width] = tiles_np[row, col]
    return grid


def save_augmentation_grid(
    path: str | Path, images_uint8: torch.Tensor, augment: BatchAugment, n_variants: int = 6, seed: int = 0
) -> Path:
    """Write `augmentation_grid(...)` as a PNG at `path` (parent folders made); returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(augmentation_grid(images_uint8, augment, n_variants=n_variants, seed=seed)).save(path, "PNG")
    return path


def channel_tensor(values: Sequence[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 3, 1, 1) float32 tensor of per-channel `values` (a mean or a std)."""
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(1, 3, 1, 1)


def normalize_batch(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 (or float 0-255) -> float32 `(x / 255 - mean) / std`; `mean`/`std` are (1, 3, 1, 1)."""
    return (images.float() / 255.0 - mean.to(images.device)) / std.to(images.device)
