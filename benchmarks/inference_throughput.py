"""Images per second of `Predictor` vs the bare model forward, side by side in one run, at two input sizes.

  bare NCHW          model(x) on a float batch already in memory, contiguous NCHW (how evaluation ran before)
  bare channels_last the same, model and batch in channels_last (the best bare torch forward on a CPU)
  predictor prepared Predictor.logits_prepared on uint8 images already prepared (evaluate's path: cache rows)
  predictor files    Predictor.predict_logits on image files: decode + resize + normalise + forward (predict's path)
  predictor TTA      logits_prepared with TTA (8 views), reported per view: evaluate --tta's cost per forward

The model is EfficientNet-Lite0 (ImageNet weights from the packaged file, 2 classes), in eval mode, batch 32, on the
device `--device` picks (auto: CUDA, then MPS, then CPU). Passes alternate and the median is reported. Images are
real DeepAPL cells from $BLASTSCAN_DATA when present, else SYNTHETIC cells. Writes JSON (default
benchmarks/results/inference_throughput.json).

    python benchmarks/inference_throughput.py [--sizes 96 224] [--batches 4] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blastscan.data.images import load_resized
from blastscan.data.synthetic import generate_dataset
from blastscan.inference import InputSpec
from blastscan.inference.torch_backend import TorchPredictor, resolve_device
from blastscan.models import create, preprocessing_for

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "tf_efficientnet_lite0"


def _image_files(count: int, workdir: Path) -> tuple[list[Path], str]:
    data = Path(os.environ.get("BLASTSCAN_DATA", REPO_ROOT.parent / "shared" / "datasets")) / "DeepAPL" / "Data"
    files = sorted(data.rglob("*.jpg"))[:count] if data.is_dir() else []
    if len(files) == count:
        return files, "DeepAPL cells (360x363 JPEG)"
    generate_dataset(workdir / "synthetic", n_patients=4, cells_per_patient=count // 4 + 1, size=128, seed=0)
    return sorted((workdir / "synthetic" / "images").rglob("*.png"))[:count], "SYNTHETIC cells (128 px PNG)"


def _timed(function, images: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def measure(size: int, files: list[Path], batch: int, repeats: int, device: torch.device) -> dict:
    """Median images/s of each path at `size` px."""
    pre = preprocessing_for(MODEL, "package")
    model = create(MODEL, pretrained="package", num_classes=2).eval().to(device)
    predictor = TorchPredictor(model, InputSpec(size, pre["mean"], pre["std"]), device=device, batch_size=batch)
    prepared = np.stack([load_resized(p, size) for p in files])
    nchw = predictor.to_input(prepared).contiguous()
    channels_last = nchw.contiguous(memory_format=torch.channels_last)
    n = len(files)

    @torch.inference_mode()
    def bare(x: torch.Tensor, memory_format: torch.memory_format) -> None:
        model.to(memory_format=memory_format)
        with predictor._autocast():
            for start in range(0, n, batch):
                model(x[start : start + batch])

    def through_predictor() -> None:
        model.to(memory_format=torch.channels_last)  # as the Predictor keeps it (bare NCHW switched it back)
        predictor.logits_prepared(prepared)

    paths = {
        "bare_nchw": lambda: bare(nchw, torch.contiguous_format),
        "bare_channels_last": lambda: bare(channels_last, torch.channels_last),
        "predictor_prepared": lambda: (
            model.to(memory_format=torch.channels_last),
            predictor.logits_prepared(prepared),
        ),
        "predictor_files": lambda: predictor.predict_logits(files),
    }
    tta = lambda: predictor.logits_prepared(prepared[: max(batch, n // 4)], tta=True)  # noqa: E731
    bare(channels_last[:batch], torch.channels_last)  # warm-up: kernel selection, allocator
    predictor.logits_prepared(prepared[:batch])
    samples: dict[str, list[float]] = {key: [] for key in [*paths, "predictor_tta_per_view"]}
    for _ in range(repeats):
        for key, function in paths.items():
            samples[key].append(_timed(function, n))
        samples["predictor_tta_per_view"].append(_timed(tta, 8 * max(batch, n // 4)))
    model.to(memory_format=torch.channels_last)
    medians = {key: round(statistics.median(values), 1) for key, values in samples.items()}
    best_bare = max(medians["bare_nchw"], medians["bare_channels_last"])
    return {
        "image_size": size,
        "images": n,
        "img_per_s": medians,
        "ratios": {
            "predictor_prepared / best bare": round(medians["predictor_prepared"] / best_bare, 3),
            "predictor_files / best bare": round(medians["predictor_files"] / best_bare, 3),
            "predictor_prepared / bare NCHW (the old evaluation path)": round(
                medians["predictor_prepared"] / medians["bare_nchw"], 3
            ),
            "predictor TTA per view / best bare": round(medians["predictor_tta_per_view"] / best_bare, 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="batches of images per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "inference_throughput.json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        files, source = _image_files(args.batch * args.batches, Path(tmp))
        results = [measure(size, files, args.batch, args.repeats, device) for size in args.sizes]
    report = {
        "benchmark": "inference_throughput",
        "model": MODEL,
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "images": source,
        "batch": args.batch,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for result in results:
        print(f"{result['image_size']} px, {result['images']} images on {device}:")
        for key, value in result["img_per_s"].items():
            print(f"  {key:24s} {value:8.1f} img/s")
        for key, value in result["ratios"].items():
            print(f"  {key}: {value:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
