"""In-distribution scores: how unlike the training cells an image looks to the network, and when to say so.

`OodProfile` is fitted once per run on the training split's feature statistics (`fit`), its flag threshold set on
the validation split (the `percentile`-th percentile of validation scores, so about 1% of in-distribution images
are flagged by design), and stored in the run folder. The features are, per network stage, each channel's spatial
mean and standard deviation (`torch_backend.logits_and_block_statistics`; the ONNX export's `features_*` outputs),
so torch and ONNX Runtime flag the same images. Higher scores mean "less like the training data".

Methods (`OOD_METHODS`), all in NumPy so that the torch-free install scores them:
- "mahalanobis": per stage, the smallest class-conditional Mahalanobis distance to the class means with one
  covariance shared by the classes, shrunk by Ledoit-Wolf (stages have up to 2,048 statistics, more than a small
  training split has images for a plain estimate); each stage's distance is standardised by its validation mean and
  spread, and the stages are summed: the feature ensemble of Lee et al. 2018, without their OOD-tuned weights.
  Early stages see stain, texture and scale, which the classifier's last layer learns to ignore.
- "mahalanobis-last": the same on the last stage alone, what most toolkits do.
- "energy": the free energy of the logits, -logsumexp(z) (Liu et al. 2020): needs no features.
- "msp": one minus the maximum softmax probability (Hendrycks & Gimpel 2017), the usual baseline.
Which one a run flags with is `method`; `blastscan evaluate-ood` measures them all side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blastscan.errors import ConfigError
from blastscan.runs import read_arrays, write_arrays

#: The safetensors metadata entry that holds the profile's header.
METADATA_KEY = "blastscan_ood"

OOD_METHODS = ("mahalanobis", "mahalanobis-last", "energy", "msp")
#: The method a new profile flags with: the one `blastscan evaluate-ood` measured best (README, "When blastscan
#: says review").
DEFAULT_OOD_METHOD = "mahalanobis"
#: The validation percentile above which an image is flagged out of distribution.
DEFAULT_PERCENTILE = 99.0


def energy_score(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits) per row: higher for inputs the network has less evidence for."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


def msp_score(logits: np.ndarray) -> np.ndarray:
    """1 - the largest softmax probability per row."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return 1.0 - (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """The smallest squared Mahalanobis distance of each feature row to a class mean (shared precision matrix)."""
    f = np.asarray(features, dtype=np.float64)
    distances = []
    for mean in np.asarray(means, dtype=np.float64):
        centred = f - mean
        distances.append(np.einsum("nd,nd->n", centred @ precision, centred))
    return np.min(np.stack(distances), axis=0)


@dataclass
class OodProfile:
    """A fitted in-distribution scorer: class means and shared precision of the training features, and for each
    method the validation-percentile threshold above which an image is flagged."""

    method: str = DEFAULT_OOD_METHOD
    percentile: float = DEFAULT_PERCENTILE
    #: Per stage: the class means (classes, D), the shared precision (D, D), and the validation distances' mean and
    #: standard deviation that standardise the stage before the stages are summed.
    means_: list[np.ndarray] = field(default_factory=list)
    precisions_: list[np.ndarray] = field(default_factory=list)
    loc_: np.ndarray | None = None
    scale_: np.ndarray | None = None
    thresholds_: dict[str, float] = field(default_factory=dict)
    fitted_on_: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in OOD_METHODS:
            raise ConfigError(f"OOD method {self.method!r}: choose one of {', '.join(OOD_METHODS)}")
        if not 50.0 <= float(self.percentile) < 100.0:
            raise ConfigError(f"OOD percentile {self.percentile!r}: choose a value in [50, 100)")

    # ------------------------------------------------------------------------------------------------ fitting

    def fit(
        self,
        train_features: list[np.ndarray],
        train_targets: np.ndarray,
        val_features: list[np.ndarray],
        val_logits: np.ndarray,
    ) -> OodProfile:
        """Per stage, class means and a Ledoit-Wolf shared covariance from the training split; the stage
        standardisation and every method's flag threshold from the validation split."""
        from sklearn.covariance import LedoitWolf  # only fitting needs it; scoring is plain NumPy

        targets = np.asarray(train_targets)
        classes = np.unique(targets)
        if not train_features or any(len(stage) != len(targets) for stage in train_features) or len(targets) < 3:
            raise ConfigError(
                f"an in-distribution profile needs per-stage training features with a label each; got "
                f"{[len(stage) for stage in train_features]} feature rows and {len(targets)} labels"
            )
        self.means_, self.precisions_ = [], []
        for stage in train_features:
            features = np.asarray(stage, dtype=np.float64)
            means = np.stack([features[targets == c].mean(axis=0) for c in classes])
            centred = features - means[np.searchsorted(classes, targets)]
            self.means_.append(means)
            self.precisions_.append(LedoitWolf(assume_centered=True).fit(centred).precision_)
        distances = self._stage_distances(val_features)
        self.loc_ = distances.mean(axis=1)
        self.scale_ = np.maximum(distances.std(axis=1), 1e-12)
        val = {method: self.scores(val_features, val_logits, method) for method in OOD_METHODS}
        self.thresholds_ = {method: float(np.percentile(s, self.percentile)) for method, s in val.items()}
        self.fitted_on_ = {
            "train_images": len(targets),
            "val_images": len(val_logits),
            "stages": [int(m.shape[1]) for m in self.means_],
        }
        return self

    # ------------------------------------------------------------------------------------------------ scoring

    @property
    def fitted(self) -> bool:
        return bool(self.means_) and bool(self.thresholds_)

    @property
    def threshold(self) -> float:
        """The flag threshold of `method`."""
        return float(self.thresholds_[self.method])

    def _stage_distances(self, features: list[np.ndarray]) -> np.ndarray:
        """(stages, N) Mahalanobis distances of each stage's statistics."""
        if len(features) != len(self.means_):
            raise ConfigError(
                f"the model gives {len(features)} feature stages but the in-distribution profile was fitted on "
                f"{len(self.means_)}; delete ood.safetensors to refit it for these weights"
            )
        return np.stack(
            [mahalanobis_score(f, m, p) for f, m, p in zip(features, self.means_, self.precisions_, strict=True)]
        )

    def scores(self, features: list[np.ndarray] | None, logits: np.ndarray, method: str | None = None) -> np.ndarray:
        """(N,) scores by `method` (default: the profile's); NaN for the Mahalanobis methods without features."""
        method = method or self.method
        if method == "energy":
            return energy_score(logits)
        if method == "msp":
            return msp_score(logits)
        if method not in ("mahalanobis", "mahalanobis-last"):
            raise ConfigError(f"OOD method {method!r}: choose one of {', '.join(OOD_METHODS)}")
        if not self.means_:
            raise ConfigError("the in-distribution profile is not fitted; call fit() first")
        if features is None:
            return np.full(len(logits), np.nan)
        distances = self._stage_distances(features)
        if method == "mahalanobis-last":
            return distances[-1]
        if self.loc_ is None or self.scale_ is None:  # while fitting: the stages are not standardised yet
            return distances.sum(axis=0)
        return ((distances - self.loc_[:, None]) / self.scale_[:, None]).sum(axis=0)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is above the validation-chosen threshold (NaN scores are never flagged)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(scores) > self.threshold

    @property
    def needs_features(self) -> bool:
        return self.method.startswith("mahalanobis")

    # -------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """The profile as one safetensors file: the arrays as tensors, the rest as JSON in its metadata."""
        if not self.fitted:
            raise ConfigError("the in-distribution profile is not fitted; nothing to save")
        header = {
            "method": self.method,
            "percentile": self.percentile,
            "thresholds": self.thresholds_,
            "fitted_on": self.fitted_on_,
            "stages": len(self.means_),
            "loc": np.asarray(self.loc_).tolist(),
            "scale": np.asarray(self.scale_).tolist(),
        }
        arrays = {f"means_{i}": m.astype(np.float32) for i, m in enumerate(self.means_)}
        arrays |= {f"precision_{i}": p.astype(np.float32) for i, p in enumerate(self.precisions_)}
        return write_arrays(path, arrays, METADATA_KEY, header)

    @classmethod
    def load(cls, path: str | Path) -> OodProfile:
        """A profile written by `save` (nothing is unpickled)."""
        path = Path(path)
        try:
            header, arrays = read_arrays(path, METADATA_KEY)
            stages = range(int(header["stages"]))
            means = [arrays[f"means_{i}"].astype(np.float64) for i in stages]
            precisions = [arrays[f"precision_{i}"].astype(np.float64) for i in stages]
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such in-distribution profile") from None
        except (ValueError, KeyError) as exc:
            detail = str(exc) if isinstance(exc, ValueError) else f"KeyError: {exc}"  # ValueError names its cause
            raise ConfigError(
                f"{path}: not a readable in-distribution profile ({detail}); delete it and "
                "it is fitted again from the run's training split"
            ) from None
        profile = cls(method=header["method"], percentile=float(header["percentile"]))
        profile.means_, profile.precisions_ = means, precisions
        profile.loc_, profile.scale_ = np.asarray(header["loc"]), np.asarray(header["scale"])
        profile.thresholds_ = {k: float(v) for k, v in header["thresholds"].items()}
        profile.fitted_on_ = header.get("fitted_on", {})
        return profile

    def summary(self) -> dict[str, Any]:
        """What a predictions header or a model card says about the flag."""
        return {
            "method": self.method,
            "threshold": self.threshold,
            "percentile": self.percentile,
            "fitted_on": self.fitted_on_,
        }
