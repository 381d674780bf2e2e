"""Images per second of the inference backends on this CPU, side by side in one run, plus single-image latency.

  torch NCHW           the run's network, eager, contiguous NCHW float batch
  torch channels_last  the same in channels_last (what TorchPredictor runs on a CPU)
  onnx fp32            ONNX Runtime on the export's model.onnx (the Predictor's CPU default)
  onnx int8            ONNX Runtime on the export's model.int8.onnx (static QDQ, per-channel)

All four at batch 1 and batch 32, at the run's input size and at 224 px (at 224 the network is exported and
quantised again here, calibrated on the run's training images resized to 224 with the export's INT8 recipe), on
`--threads` CPU threads (default 2). Inputs are normalised real cells of the run's test split (the same batch for
every backend). Passes alternate between backends and the median of `--repeats` is reported. Single-image latency
(batch 1, median ms) of the ONNX models is measured on 1 and 2 threads: the phone-sized model's figures. The
export's measured AUROCs (parity.json) are copied beside the speeds. Writes JSON (default
benchmarks/results/inference_backends.json).

    python benchmarks/inference_backends.py RUN EXPORT [--threads 2] [--repeats 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from blastscan.data.images import load_resized
from blastscan.imaging.preprocess import normalize_array
from blastscan.inference.onnx_export import export_onnx, quantize_int8
from blastscan.runs import ExportFolder, RunFolder

REPO_ROOT = Path(__file__).resolve().parent.parent


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _images(run: RunFolder, size: int, rows: np.ndarray, mean, std) -> np.ndarray:
    paths = run.manifest().absolute_paths()
    return normalize_array(np.stack([load_resized(paths[i], size) for i in rows]), mean, std)


def _mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 2)


def _rate(function: Callable[[], object], images: int, seconds: float) -> float:
    """Images per second of `function` over at least `seconds` (and at least 3 calls)."""
    function()  # warm-up: allocations, oneDNN / ORT kernel selection
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        function()
        calls += 1
    return calls * images / (time.perf_counter() - start)


def _latency_ms(session: ort.InferenceSession, image: np.ndarray, calls: int = 50) -> float:
    session.run(None, {"image": image})
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, {"image": image})
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _models_at(size: int, run: RunFolder, export: ExportFolder, workdir: Path, recipe: str) -> tuple[Path, Path]:
    """(fp32, int8) ONNX files at input `size`: the export's own at the run's size, made here otherwise."""
    if size == export.preprocessing()["input"]["size"]:
        return export.model_path, export.int8_path
    fp32 = export_onnx(run.load_model(), size, workdir / f"model-{size}.onnx")
    pre = export.preprocessing()["input"]
    train = run.rows("train")[:: max(1, len(run.rows("train")) // 256)][:256]
    images = _images(run, size, train, pre["mean"], pre["std"])
    batches = iter([images[i : i + 16] for i in range(0, len(images), 16)])
    return fp32, quantize_int8(fp32, workdir / f"model-{size}.int8.onnx", batches, recipe)


def measure(run: RunFolder, export: ExportFolder, size: int, args: argparse.Namespace, workdir: Path) -> dict:
    pre = export.preprocessing()["input"]
    parity = json.loads(export.parity_path.read_text())
    recipe = parity["checks"]["int8_auroc"]["recipe"]
    fp32_file, int8_file = _models_at(size, run, export, workdir, recipe)
    test = run.rows("test")[:32]
    batch32 = _images(run, size, test, pre["mean"], pre["std"])
    batch1 = batch32[:1]
    torch.set_num_threads(args.threads)
    model = run.load_model().eval()
    model_cl = run.load_model().eval().to(memory_format=torch.channels_last)
    sessions = {"onnx fp32": _session(fp32_file, args.threads), "onnx int8": _session(int8_file, args.threads)}

    def runners(x: np.ndarray) -> dict[str, Callable[[], object]]:
        nchw = torch.from_numpy(x)
        cl = nchw.contiguous(memory_format=torch.channels_last)

        def eager(m: torch.nn.Module, t: torch.Tensor) -> Callable[[], object]:
            return lambda: torch.inference_mode()(m)(t)

        return {
            "torch NCHW": eager(model, nchw),
            "torch channels_last": eager(model_cl, cl),
            **{name: (lambda s=s: s.run(None, {"image": x})) for name, s in sessions.items()},
        }

    rates: dict[str, dict[str, float]] = {}
    for batch, x in (("batch 1", batch1), ("batch 32", batch32)):
        passes: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, function in runners(x).items():  # alternate backends within each pass
                passes.setdefault(name, []).append(_rate(function, len(x), args.seconds))
        rates[batch] = {name: round(statistics.median(values), 1) for name, values in passes.items()}
    latency = {}
    for name, path in (("onnx fp32", fp32_file), ("onnx int8", int8_file)):
        latency[name] = {f"{t} thread{'s' if t > 1 else ''}": round(_latency_ms(_session(path, t), batch1), 2)
                         for t in (1, 2)}  # fmt: skip
    b32 = rates["batch 32"]
    return {
        "size": size,
        "img_per_s": rates,
        "single_image_latency_ms": latency,
        "ratios_batch_32": {
            "onnx fp32 / torch NCHW": round(b32["onnx fp32"] / b32["torch NCHW"], 2),
            "onnx fp32 / torch channels_last": round(b32["onnx fp32"] / b32["torch channels_last"], 2),
            "onnx int8 / onnx fp32": round(b32["onnx int8"] / b32["onnx fp32"], 2),
        },
        "model_mb": {"fp32": _mb(fp32_file), "int8": _mb(int8_file)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (its test images are the inputs)")
    parser.add_argument("export", type=Path, help="its export folder (blastscan export RUN --int8)")
    parser.add_argument("--sizes", type=int, nargs="*", help="input sizes (default: the run's and 224)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per measurement")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "inference_backends.json")
    args = parser.parse_args()
    run, export = RunFolder.open(args.run), ExportFolder.open(args.export)
    parity = json.loads(export.parity_path.read_text())
    sizes = args.sizes or sorted({export.preprocessing()["input"]["size"], 224})
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(run, export, size, args, Path(tmp)) for size in sizes]
    report = {
        "run": run.name,
        "model": run.model_card().get("name"),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "auroc_on_test": {name: m["auroc"] for name, m in parity["models"].items()},
        "int8_auroc_difference": parity["checks"].get("int8_auroc", {}).get("auroc_difference"),
        "results": results,
    }
    for result in results:
        print(f"\n{result['size']} px, {args.threads} threads: img/s")
        for batch, rates in result["img_per_s"].items():
            print(f"  {batch:9s} " + "  ".join(f"{name} {rate:7.1f}" for name, rate in rates.items()))
        print("  ratios at batch 32: " + ", ".join(f"{k} {v}x" for k, v in result["ratios_batch_32"].items()))
        print(f"  single-image latency (ms): {result['single_image_latency_ms']}; model MB {result['model_mb']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
