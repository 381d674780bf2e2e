"""Inference: `Predictor` loads a trained run or an exported model and scores images, fast, on whatever is there.

Every command that runs a trained model goes through here: `predict`, `analyze`, `serve`, `evaluate`, `explain`,
`audit-shortcuts`, the CNN embeddings of `baselines`, and `crossval` / `transfer` through `evaluate`.

Backends (`BACKENDS`): "onnx" (`onnx_backend.OnnxPredictor`, ONNX Runtime: the CPU default whenever onnxruntime is
installed) and "torch" (`torch_backend.TorchPredictor`: GPUs, Grad-CAM, pooled features). `Predictor.from_run(run,
backend="auto")` picks between them; importing this package imports neither torch nor onnxruntime, so the slim
`blastscan[serve]` install can use it.
"""

from __future__ import annotations

from typing import Any

from blastscan.inference.core import (
    BACKENDS,
    DEVICE_CHOICES,
    InputSpec,
    Predictor,
    ScoredBatch,
    calibrated_threshold,
    choose_backend,
    dihedral_arrays,
    probabilities,
    usable_cpus,
)
from blastscan.runs import RunFolder

__all__ = [
    "BACKENDS",
    "DEVICE_CHOICES",
    "InputSpec",
    "Predictor",
    "ScoredBatch",
    "calibrated_threshold",
    "choose_backend",
    "dihedral_arrays",
    "probabilities",
    "usable_cpus",
]


# The builders import their runtime when called, so registering them here costs no import of torch or onnxruntime.
@BACKENDS.register("torch", description="PyTorch eager on CUDA, MPS or CPU (explanations and features need it)")
def _torch(run: RunFolder, device: str = "auto", **options: Any) -> Predictor:
    from blastscan.inference.torch_backend import torch_predictor

    return torch_predictor(run, device=device, **options)


@BACKENDS.register("onnx", description="ONNX Runtime on the CPU: the run exported on first use and cached")
def _onnx(run: RunFolder, device: str = "auto", **options: Any) -> Predictor:
    from blastscan.inference.onnx_backend import onnx_predictor

    return onnx_predictor(run, device=device, **options)
