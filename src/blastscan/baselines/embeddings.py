"""CNN embeddings as a scikit-learn transformer: images in, pooled penultimate features out.

The "hybrid" baselines of the seed paper feed CNN features to a classical classifier. `CnnEmbeddings` is that
feature extractor as a stateless sklearn transformer, so `Pipeline([("cnn", CnnEmbeddings()), ("rf", ...)])`
is an ordinary image classifier. The network is either an ImageNet backbone (`backbone`, `pretrained`) or the
network of a trained blastscan run (`run_dir`), with the input size, normalisation and stain normalisation that
run was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin

from blastscan.errors import ConfigError
from blastscan.inference import InputSpec, Predictor
from blastscan.inference.torch_backend import TorchPredictor
from blastscan.models import create, preprocessing_for
from blastscan.runs import RunFolder


def embedding_predictor(
    run_dir: str | Path | None = None,
    backbone: str = "tf_efficientnet_lite0",
    pretrained: str | None = "package",
    image_size: int = 128,
    batch_size: int = 64,
    device: str = "auto",
) -> TorchPredictor:
    """The torch predictor whose `embed_prepared` gives pooled features: the network of the run `run_dir` (its own
    image size, normalisation, stain normalisation and cell framing), or else `backbone` built headless with
    `pretrained` weights at `image_size` with that backbone's normalisation."""
    if run_dir is not None:
        return Predictor.from_run(run_dir, device=device, backend="torch", batch_size=int(batch_size))
    if int(image_size) < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    model = create(backbone, pretrained=pretrained, num_classes=0)
    pre = preprocessing_for(backbone, pretrained)
    spec = InputSpec(int(image_size), tuple(pre["mean"]), tuple(pre["std"]))
    return TorchPredictor(model, spec, device=device, batch_size=int(batch_size))


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
        device: str = "auto",
    ) -> None:
        self.run_dir = run_dir
        self.backbone = backbone
        self.pretrained = pretrained
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: transform works on an unfitted instance
        return tags

    def fit(self, X: Any, y: Any = None) -> CnnEmbeddings:
        """Nothing to learn; returns self."""
        return self

    def transform(self, X: Any) -> np.ndarray:
        """(N, D) float32 pooled features of the images X, computed in batches of `batch_size`."""
        images = _check_images(X)
        predictor = self._predictor()
        size, stain = predictor.image_size, predictor.stain
        outputs = []
        for start in range(0, len(images), predictor.batch_size):
            batch = torch.from_numpy(np.array(images[start : start + predictor.batch_size]))  # a writable copy
            x = batch.permute(0, 3, 1, 2).float()
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                if stain is not None:  # the stain normaliser works on uint8 images, as in the run's image cache
                    x = x.round_().clamp_(0, 255)
            if stain is not None:
                rows = x.permute(0, 2, 3, 1).to(torch.uint8).numpy()
                x = torch.from_numpy(np.stack([stain.normalize(row) for row in rows])).permute(0, 3, 1, 2).float()
            outputs.append(predictor.embed_prepared(x.permute(0, 2, 3, 1)))
        if not outputs:
            return predictor.embed_prepared(np.zeros((0, size, size, 3), dtype=np.uint8))
        return np.concatenate(outputs)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """`cnn0`, `cnn1`, ... one per embedding dimension."""
        return np.array([f"cnn{i}" for i in range(int(self._predictor().model.num_features))], dtype=object)

    # -- the network, loaded once per instance and never part of the parameters or the pickle ---------------

    def _predictor(self) -> TorchPredictor:
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        key = (
            str(self.run_dir) if self.run_dir is not None else None,
            self.backbone,
            self.pretrained,
            self.image_size,
            self.batch_size,
            self.device,
        )
        cached = self.__dict__.get("_loaded")
        if cached is not None and cached[0] == key:
            return cached[1]
        predictor = embedding_predictor(
            self.run_dir, self.backbone, self.pretrained, self.image_size, self.batch_size, self.device
        )
        self.__dict__["_loaded"] = (key, predictor)
        return predictor

    def describe(self) -> dict[str, Any]:
        """What produces the features (JSON-ready): the run and its weights file's fingerprint, or the backbone."""
        if self.run_dir is not None:
            run = RunFolder(self.run_dir)
            stat = run.weights_path.stat() if run.weights_path.is_file() else None
            card = run.model_card() if run.model_card_path.is_file() else {}
            return {
                "run": str(run.path.resolve()),
                "weights": [stat.st_size, stat.st_mtime_ns] if stat else None,
                "card": card,
            }
        return {"backbone": self.backbone, "pretrained": self.pretrained, "image_size": int(self.image_size)}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_loaded", None)  # rebuilt from the parameters; a pickle should not carry the weights
        return state
