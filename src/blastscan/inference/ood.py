"""In-distribution scores: how unlike the training cells an image looks to the network, and when to say so.

`OodProfile` is fitted once per run on the training split's penultimate features and logits (`fit`), its flag
threshold set on the validation split (the `percentile`-th percentile of validation scores, so about 1% of
in-distribution images are flagged by design), and stored in the run folder. Every backend's `Predictor` computes
the score from the same two arrays, so torch and ONNX Runtime flag the same images. Higher scores mean "less like
the training data".

Methods (`OOD_METHODS`), all in NumPy so that the torch-free install scores them:
- "mahalanobis": the smallest class-conditional Mahalanobis distance of the features to the class means, with one
  covariance shared by the classes (Lee et al. 2018), shrunk by Ledoit-Wolf because the features have more
  dimensions (1,280 for Lite0) than a small training split has images for a plain estimate.
- "energy": the free energy of the logits, -logsumexp(z) (Liu et al. 2020): needs no features.
- "msp": one minus the maximum softmax probability (Hendrycks & Gimpel 2017), the usual baseline.
Which one a run uses is `method`; `blastscan evaluate-ood` measures them all side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blastscan.errors import ConfigError

OOD_METHODS = ("mahalanobis", "energy", "msp")
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
    means_: np.ndarray | None = None
    precision_: np.ndarray | None = None
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
        train_features: np.ndarray,
        train_targets: np.ndarray,
        val_features: np.ndarray,
        val_logits: np.ndarray,
    ) -> OodProfile:
        """Class means and Ledoit-Wolf shared covariance from the training split; every method's flag threshold
        from the validation split's scores."""
        from sklearn.covariance import LedoitWolf  # only fitting needs it; scoring is plain NumPy

        features = np.asarray(train_features, dtype=np.float64)
        targets = np.asarray(train_targets)
        classes = np.unique(targets)
        if len(features) != len(targets) or len(classes) < 1 or len(features) < 3:
            raise ConfigError(
                f"an in-distribution profile needs training features with a label each; got {len(features)} "
                f"feature rows and {len(targets)} labels"
            )
        self.means_ = np.stack([features[targets == c].mean(axis=0) for c in classes])
        centred = features - self.means_[np.searchsorted(classes, targets)]
        self.precision_ = LedoitWolf(assume_centered=True).fit(centred).precision_
        val = {method: self.scores(val_features, val_logits, method) for method in OOD_METHODS}
        self.thresholds_ = {method: float(np.percentile(s, self.percentile)) for method, s in val.items()}
        self.fitted_on_ = {"train_images": len(features), "val_images": len(val_logits)}
        return self

    # ------------------------------------------------------------------------------------------------ scoring

    @property
    def fitted(self) -> bool:
        return self.means_ is not None and bool(self.thresholds_)

    @property
    def threshold(self) -> float:
        """The flag threshold of `method`."""
        return float(self.thresholds_[self.method])

    def scores(self, features: np.ndarray | None, logits: np.ndarray, method: str | None = None) -> np.ndarray:
        """(N,) scores by `method` (default: the profile's); NaN for Mahalanobis when there are no features."""
        method = method or self.method
        if method == "energy":
            return energy_score(logits)
        if method == "msp":
            return msp_score(logits)
        if method != "mahalanobis":
            raise ConfigError(f"OOD method {method!r}: choose one of {', '.join(OOD_METHODS)}")
        if self.means_ is None or self.precision_ is None:
            raise ConfigError("the in-distribution profile is not fitted; call fit() first")
        if features is None:
            return np.full(len(logits), np.nan)
        return mahalanobis_score(features, self.means_, self.precision_)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is above the validation-chosen threshold (NaN scores are never flagged)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(scores) > self.threshold

    @property
    def needs_features(self) -> bool:
        return self.method == "mahalanobis"

    # -------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """The profile as one safetensors file: the arrays as tensors, the rest as JSON in its metadata."""
        from safetensors.numpy import save_file

        if not self.fitted:
            raise ConfigError("the in-distribution profile is not fitted; nothing to save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "method": self.method,
            "percentile": self.percentile,
            "thresholds": self.thresholds_,
            "fitted_on": self.fitted_on_,
        }
        part = path.with_name(path.name + ".part")
        arrays = {"means": self.means_.astype(np.float32), "precision": self.precision_.astype(np.float32)}
        save_file(arrays, str(part), metadata={"blastscan_ood": json.dumps(header)})
        part.replace(path)  # never a half-written profile where a reader would take it for a finished one
        return path

    @classmethod
    def load(cls, path: str | Path) -> OodProfile:
        """A profile written by `save` (nothing is unpickled)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as handle:
                header = json.loads((handle.metadata() or {})["blastscan_ood"])
                means, precision = handle.get_tensor("means"), handle.get_tensor("precision")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such in-distribution profile") from None
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
            raise ConfigError(
                f"{path}: not a readable in-distribution profile ({type(exc).__name__}: {exc}); delete it and "
                "it is fitted again from the run's training split"
            ) from None
        profile = cls(method=header["method"], percentile=float(header["percentile"]))
        profile.means_ = means.astype(np.float64)
        profile.precision_ = precision.astype(np.float64)
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
