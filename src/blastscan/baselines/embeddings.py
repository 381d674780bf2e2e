"""CNN embeddings as a scikit-learn transformer: images in, pooled penultimate features out.

The "hybrid" baselines of the seed paper feed CNN features to a classical classifier. `CnnEmbeddings` is that
feature extractor as a stateless sklearn transformer, so `Pipeline([("cnn", CnnEmbeddings()), ("rf", ...)])`
is an ordinary image classifier. The network is either an ImageNet backbone (`backbone`, `pretrained`) or the
network of a trained blastscan run (`run_dir`), with the input size, normalisation and stain normalisation that
run was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin
from torch import nn

from blastscan.errors import ConfigError


def _check_images(X: Any) -> np.ndarray:
    images = np.asarray(X)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"CnnEmbeddings expects uint8 images of shape (N, H, W, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ConfigError(f"CnnEmbeddings expects uint8 images (0-255), got dtype {images.dtype}")
    return images


class CnnEmbeddings(BaseEstimator, TransformerMixin):
    """Pooled penultimate features of a CNN: (N, H, W, 3) uint8 images -> (N, D) float32.

    With `run_dir` (a finished `blastscan train` run folder) the run's own network is used, at the run's image
    size, with its normalisation and, when it was trained with one, its stain normalisation; `backbone`,
    `pretrained` and `image_size` are then ignored. Otherwise the features come from `backbone` built with
    `blastscan.models.create(backbone, pretrained=pretrained, num_classes=0)` at `image_size` x `image_size`.
    Images of another size are resized (bilinear, antialiased). Nothing is learnt: `fit` only returns self.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str | None = "package",
        image_size: int = 128,
        batch_size: int = 64,
    ) -> None:
        self.run_dir = run_dir
        self.backbone = backbone
        self.pretrained = pretrained
        self.image_size = image_size
        self.batch_size = batch_size

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: transform works on an unfitted instance
        return tags

    def fit(self, X: Any, y: Any = None) -> CnnEmbeddings:
        """Nothing to learn; returns self."""
        return self

    @torch.inference_mode()
    def transform(self, X: Any) -> np.ndarray:
        """(N, D) float32 pooled features of the images X, computed in batches of `batch_size`."""
        images = _check_images(X)
        network = self._network()
        size, stain = network["size"], network["stain"]
        model, mean, std = network["model"], network["mean"], network["std"]
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        outputs = []
        for start in range(0, len(images), int(self.batch_size)):
            batch = torch.from_numpy(np.array(images[start : start + int(self.batch_size)]))  # a writable copy
            x = batch.permute(0, 3, 1, 2).float()
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                if stain is not None:  # the stain normaliser works on uint8 images, as in the run's image cache
                    x = x.round_().clamp_(0, 255)
            if stain is not None:
                rows = x.permute(0, 2, 3, 1).to(torch.uint8).numpy()
                x = torch.from_numpy(np.stack([stain.normalize(row) for row in rows])).permute(0, 3, 1, 2).float()
            x = (x / 255.0 - mean) / std
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            outputs.append(features.flatten(1).float().numpy())
        if not outputs:
            return np.zeros((0, self._n_features(model)), dtype=np.float32)
        return np.concatenate(outputs)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """`cnn0`, `cnn1`, ... one per embedding dimension."""
        return np.array([f"cnn{i}" for i in range(self._n_features(self._network()["model"]))], dtype=object)

    # -- the network, loaded once per instance and never part of the parameters or the pickle ---------------

    def _network(self) -> dict[str, Any]:
        key = (str(self.run_dir) if self.run_dir is not None else None, self.backbone, self.pretrained, self.image_size)
        cached = self.__dict__.get("_loaded")
        if cached is not None and cached[0] == key:
            return cached[1]
        network = self._load_run() if self.run_dir is not None else self._load_backbone()
        self.__dict__["_loaded"] = (key, network)
        return network

    def _load_run(self) -> dict[str, Any]:
        from blastscan.data.stain import stain_method_from_dict
        from blastscan.evaluation.predict import load_run_model

        run_model = load_run_model(self.run_dir)
        stain = stain_method_from_dict(run_model.stain_state) if run_model.stain_state is not None else None
        card = run_model.card
        return self._prepared(run_model.model, run_model.image_size, card["mean"], card["std"], stain)

    def _load_backbone(self) -> dict[str, Any]:
        from blastscan.models import create, preprocessing_for

        if int(self.image_size) < 1:
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
        model = create(self.backbone, pretrained=self.pretrained, num_classes=0)
        pre = preprocessing_for(self.backbone, self.pretrained)
        return self._prepared(model, int(self.image_size), pre["mean"], pre["std"], None)

    @staticmethod
    def _prepared(model: nn.Module, size: int, mean: Any, std: Any, stain: Any) -> dict[str, Any]:
        for method in ("forward_features", "forward_head"):
            if not callable(getattr(model, method, None)):
                raise ConfigError(f"{type(model).__name__} has no {method}(); pooled features cannot be read from it")
        model.eval()
        return {
            "model": model,
            "size": int(size),
            "mean": torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
            "std": torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
            "stain": stain,
        }

    @staticmethod
    def _n_features(model: nn.Module) -> int:
        return int(model.num_features)

    def describe(self) -> dict[str, Any]:
        """What produces the features (JSON-ready): the run and its weights file's fingerprint, or the backbone."""
        if self.run_dir is not None:
            run = Path(self.run_dir)
            weights = run / "best.safetensors"
            stat = weights.stat() if weights.is_file() else None
            card = json.loads((run / "model.json").read_text()) if (run / "model.json").is_file() else {}
            return {
                "run": str(run.resolve()),
                "weights": [stat.st_size, stat.st_mtime_ns] if stat else None,
                "card": card,
            }
        return {"backbone": self.backbone, "pretrained": self.pretrained, "image_size": int(self.image_size)}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_loaded", None)  # rebuilt from the parameters; a pickle should not carry the weights
        return state
