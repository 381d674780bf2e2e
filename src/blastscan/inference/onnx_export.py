"""Making ONNX files from a torch network: the float32 export and the INT8 static quantisation.

`export_onnx` uses torch's TorchScript-based exporter (`dynamo=False`: it needs no onnxscript and gives a plain
opset-17 graph that ONNX Runtime and mobile runtimes read) with a dynamic batch axis. `quantize_int8` is ONNX
Runtime's `quantize_static` in QDQ format with per-channel int8 weights, after ONNX Runtime's own pre-processing
(`quant_pre_process`: shape inference and graph optimisation), calibrated on the images it is given by one of
`INT8_RECIPES` - the caller passes training-split images, never test images. Files are written under a temporary
name and renamed, so a crash never leaves a half-written model where a reader would take it for a finished one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blastscan.errors import ConfigError
from blastscan.inference.onnx_backend import FEATURES_PREFIX, INPUT_NAME, OUTPUT_NAME
from blastscan.inference.torch_backend import has_feature_head, logits_and_block_statistics

#: The ONNX opset: 17 is read by every ONNX Runtime since 1.11 and by ONNX Runtime Mobile.
OPSET = 17


def _temporary_beside(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".onnx.part", dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp makes it private; a model file is read by services running as other users
    return Path(name)


class _LogitsAndStatistics(nn.Module):
    """A timm-style network with its per-stage feature statistics as further outputs (the in-distribution score)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, statistics = logits_and_block_statistics(self.model, x)
        return (logits, *statistics)


def export_onnx(model: nn.Module, image_size: int, path: str | Path) -> Path:
    """`model` as a float32 ONNX file at `path`: input `image` (N, 3, S, S) normalised, outputs `logits` (N, 2)
    and, for networks that expose their stages, `features_0`, `features_1`, ... (per-stage feature statistics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A copy: the caller's module (a TorchPredictor's, in channels_last, maybe on a GPU) is left as it was.
    model = copy.deepcopy(model).eval().to("cpu", memory_format=torch.contiguous_format)
    outputs = [OUTPUT_NAME]
    if has_feature_head(model):
        with torch.no_grad():
            stages = len(logits_and_block_statistics(model, torch.zeros(1, 3, image_size, image_size))[1])
        model = _LogitsAndStatistics(model).eval()
        outputs = [OUTPUT_NAME, *(f"{FEATURES_PREFIX}{i}" for i in range(stages))]
    example = torch.zeros(2, 3, image_size, image_size)
    part = _temporary_beside(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                model,
                (example,),
                str(part),
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over normalised (N, 3, S, S) batches."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


#: The INT8 recipes `quantize_int8` knows: how activation ranges are calibrated, and whether the classifier head
#: (the Gemm/MatMul nodes) stays float32. MinMax takes the extreme activations, which a few outliers stretch;
#: Percentile (99.99th) clips them; a float head keeps the last layer's few, decisive weights exact.
INT8_RECIPES = ("minmax", "percentile", "minmax-float-head", "percentile-float-head")


def quantize_int8(
    fp32_file: str | Path, path: str | Path, calibration: Iterator[np.ndarray], recipe: str = "percentile"
) -> Path:
    """The static INT8 model of `fp32_file` at `path` (QDQ, per-channel int8 weights, uint8 activations),
    calibrated on the normalised batches `calibration` yields, by one of INT8_RECIPES."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if recipe not in INT8_RECIPES:
        raise ConfigError(f"INT8 recipe {recipe!r}: choose one of {', '.join(INT8_RECIPES)}")
    path = Path(path)
    prepared = _temporary_beside(path)
    part = _temporary_beside(path)
    try:
        quant_pre_process(str(fp32_file), str(prepared), skip_symbolic_shape=True)
        head = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Gemm", "MatMul")]
        percentile = recipe.startswith("percentile")
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            quantize_static(
                str(prepared),
                str(part),
                _Calibration(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.Percentile if percentile else CalibrationMethod.MinMax,
                extra_options={"CalibPercentile": 99.99} if percentile else {},
                nodes_to_exclude=head if recipe.endswith("float-head") else [],
            )
        os.replace(part, path)
    finally:
        prepared.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    return path
