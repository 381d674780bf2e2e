"""How much of a class-activation map falls on the cell: a number for "does the model look at the leukocyte?".

CAMs come in as plain arrays (e.g. from `blastscan.explain.cam.compute_cams`), masks as boolean arrays (e.g.
`blastscan.imaging.segmentation.segment_cell(...).cell`), so the measure works for any CAM method.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["cam_energy_in_mask", "localisation_summary", "resize_mask"]


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) mask resampled to `shape` by nearest neighbour (each target pixel takes the source pixel
    under its centre), so a mask never gains values it did not have."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.shape == tuple(shape):
        return mask
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def cam_energy_in_mask(cam: np.ndarray, mask: np.ndarray) -> float:
    """The share of the CAM's energy (its sum) inside `mask`: sum(cam[mask]) / sum(cam), in [0, 1].

    `cam` is a non-negative (H, W) map; `mask` a boolean (h, w) mask, resized to (H, W) by nearest neighbour when
    the sizes differ. Negative CAM values are clipped to 0 and NaNs count as 0. Returns NaN when the CAM has no
    energy (all zero), because "where the model looked" is then undefined, not 0.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"a CAM must be 2-D (H, W), got shape {cam.shape}")
    cam = np.clip(np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
    total = cam.sum()
    if total <= 0:
        return float("nan")
    inside = cam[resize_mask(mask, cam.shape)].sum()
    return float(inside / total)


def localisation_summary(
    cams: np.ndarray | Sequence[np.ndarray],
    masks: np.ndarray | Sequence[np.ndarray],
    labels: Sequence | np.ndarray,
    method: str,
) -> pd.DataFrame:
    """Per class, the CAM energy share inside the masks: one row per label with columns method, label, mean, sd,
    n (images with a defined share) and n_undefined (all-zero CAMs, left out of mean and sd).

    `cams` are (B, H, W) maps, `masks` (B, h, w) boolean masks and `labels` B class labels, in the same order.
    `sd` is the sample standard deviation (NaN for a single image).
    """
    labels = np.asarray(labels)
    if not (len(cams) == len(masks) == len(labels)):
        raise ValueError(f"cams, masks and labels differ in length ({len(cams)}, {len(masks)}, {len(labels)})")
    shares = np.array([cam_energy_in_mask(cam, mask) for cam, mask in zip(cams, masks, strict=True)], dtype=float)
    rows = []
    for label in pd.unique(labels):
        values = shares[labels == label]
        defined = values[np.isfinite(values)]
        rows.append(
            {
                "method": method,
                "label": label.item() if isinstance(label, np.generic) else label,
                "mean": float(defined.mean()) if len(defined) else float("nan"),
                "sd": float(defined.std(ddof=1)) if len(defined) > 1 else float("nan"),
                "n": len(defined),
                "n_undefined": len(values) - len(defined),
            }
        )
    return pd.DataFrame(rows, columns=["method", "label", "mean", "sd", "n", "n_undefined"])
