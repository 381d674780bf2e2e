"""The ONNX Runtime backend: `OnnxPredictor` runs an exported network (float32 or INT8) with no torch at all.

It is the default on the CPU whenever onnxruntime is installed (several times faster than torch eager there; see
benchmarks/inference_backends.py). A run folder is exported on first use and the file cached in the run folder,
named by the weights' SHA-256 (`RunFolder.onnx_cache_path`), so a retrained run never reuses a stale export; an
export folder (`blastscan export`) is read as it is. Only making an export needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blastscan.errors import ConfigError
from blastscan.imaging.preprocess import normalize_array
from blastscan.inference.core import InputSpec, Predictor, installed, usable_cpus
from blastscan.runs import ExportFolder, RunFolder

#: The names of the exported graph's input and output (the input contract in preprocessing.json).
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: The further outputs `features_0`, `features_1`, ...: per network stage, each channel's mean and standard deviation
#: (what the in-distribution score reads; `torch_backend.logits_and_block_statistics`). Older exports lack them.
FEATURES_PREFIX = "features_"


def _session(model_file: Path, threads: int | None, device: str) -> Any:
    """An ONNX Runtime session on the CPU (or CUDA when asked for and the installed runtime has it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "onnxruntime is not installed; `pip install onnxruntime` (or blastscan[serve]), or use backend='torch'"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads)) if threads else usable_cpus()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if str(device).lower().startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(
                f"--device {device}: this onnxruntime has no CUDA provider; use --backend torch for the GPU"
            )
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for damaged files
        raise ConfigError(f"{model_file}: not a loadable ONNX model ({str(exc)[:300]}); re-export it") from None


class OnnxPredictor(Predictor):
    """A Predictor whose network is an ONNX file run by ONNX Runtime (thread-safe: one session, many callers)."""

    backend = "onnx"

    def __init__(
        self,
        model_file: str | Path,
        spec: InputSpec,
        device: str = "cpu",
        batch_size: int = 64,
        tta: bool = False,
        workers: int = 2,
        threads: int | None = None,
        precision: str = "auto",
    ) -> None:
        """`threads`: ONNX Runtime's intra-op threads (default: the cores this process may use). `precision` is
        accepted for the torch backend's signature; the file decides (float32 or INT8)."""
        super().__init__(spec, batch_size, tta, workers)
        self.model_file = Path(model_file)
        self.device = "cpu" if str(device).lower() == "auto" else str(device)
        self.session = _session(self.model_file, threads, self.device)
        names = [output.name for output in self.session.get_outputs() if output.name.startswith(FEATURES_PREFIX)]
        self.feature_outputs = sorted(names, key=lambda name: int(name[len(FEATURES_PREFIX) :]))

    @classmethod
    def from_export(
        cls, folder: str | Path | ExportFolder, model_file: str | None = None, device: str = "cpu", **options: Any
    ) -> OnnxPredictor:
        """The predictor of an export folder: model.onnx, or `model_file` (e.g. model.int8.onnx) in it."""
        export = folder if isinstance(folder, ExportFolder) else ExportFolder.open(folder)
        spec = InputSpec.of_preprocessing(export.preprocessing(), str(export.preprocessing_path))
        path = export.path / model_file if model_file else export.model_path
        if not path.is_file():
            raise ConfigError(f"{path}: no such model file in the export folder")
        return cls(path, spec, device=device, **options)

    def logits_of_batch(self, images: np.ndarray) -> np.ndarray:
        """(n, 2) float32 logits of one batch of prepared uint8 images."""
        batch = normalize_array(images, self.spec.mean, self.spec.std)
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], dtype=np.float32)

    def outputs_of_batch(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """(n, 2) float32 logits and the per-stage feature statistics (None for an export made before them)."""
        if not self.feature_outputs:
            return self.logits_of_batch(images), None
        batch = normalize_array(images, self.spec.mean, self.spec.std)
        logits, *statistics = self.session.run([OUTPUT_NAME, *self.feature_outputs], {INPUT_NAME: batch})
        return np.asarray(logits, dtype=np.float32), [np.asarray(block, dtype=np.float32) for block in statistics]


def run_onnx_file(run: RunFolder, remake: bool = False) -> Path:
    """The run's cached ONNX export, made (with torch) when the weights have none yet, or with `remake`."""
    path = run.onnx_cache_path()
    if path.is_file() and not remake:
        return path
    if not installed("torch"):
        raise ConfigError(
            f"{run.path}: no ONNX export of these weights is cached and PyTorch is not installed to make one; "
            f"export the run where blastscan[full] is installed (`blastscan export {run.path} --out DIR`) and "
            "use the export folder"
        )
    from blastscan.inference.onnx_export import export_onnx

    return export_onnx(run.load_model(), InputSpec.of_run(run).image_size, path)


def onnx_predictor(run: RunFolder, device: str = "auto", **options: Any) -> OnnxPredictor:
    """The OnnxPredictor of a run folder (exported on first use, cached in the run folder; a cached file that
    does not load is made again, once)."""
    spec = InputSpec.of_run(run)
    try:
        return OnnxPredictor(run_onnx_file(run), spec, device=device, **options)
    except ConfigError:
        if not installed("torch"):
            raise
        return OnnxPredictor(run_onnx_file(run, remake=True), spec, device=device, **options)
